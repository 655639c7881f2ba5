"""Judging what a file says about its model and data (a weights file's metadata, a trainer's ``args``, a model
folder's ``config.json``), in one place, before anything is built or read from it: a file is data, never code. Every
refusal names the file, the field, the value and what would work. A leaf module: models and sources both ask it."""

from __future__ import annotations

__all__ = ["check_buildable", "dataset", "model_args", "model_name", "parse_json"]

import inspect
import json
import logging
import math
import re
from collections.abc import Callable

import torch

_logger = logging.getLogger(__name__)

#: Where weights come from, and how they are loaded: the caller's to say, never a file's.
LOCATION_FIELDS = frozenset(
    "file url hf_hub_id hf_hub_filename source state_dict checkpoint_path custom_load pretrained pretrained_cfg "
    "pretrained_cfg_overlay pretrained_model_args pretrained_strict cache_dir features_only device dtype".split()
)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # pipe:, http:, s3:, ... (a Windows drive is no concern here)
_LOCAL_DATASETS = ("imagefolder", "cifar10", "cifar100", "fashion_mnist", "synthetic")
_TIMM_PREFIXES = ("tar", "wds/", "torch/", "hfds/")
MAX_ELEMENTS = 1 << 30  # parameters and buffers a file's arguments may build: 4 GiB of float32, 9x the zoo's largest


def model_name(value: object, where: str) -> str:
    """``value`` if it is a registered timm model name (optionally ``NAME.TAG``), else a ValueError."""
    import timm

    name = value.split(".")[0] if isinstance(value, str) else None
    if not name or ":" in value or not timm.is_model(name):
        raise ValueError(
            f"{where}: field 'model' is {value!r}, not a registered timm model name; a file cannot name code to "
            "run: give the model yourself (--model NAME, or package.module:factory)"
        )
    return name


def model_args(family: type | None, args: object, where: str, form: bool = False) -> dict:
    """Constructor arguments recorded in a file, checked against ``family``'s constructor: a JSON object whose keys
    are its parameters (no location field; ``deploy`` only where the file records its weights' ``form``: a folder
    timm's ``save_for_hf`` wrote) with values of their types. ``family`` None (a model outside the zoo): only
    ``num_classes`` and ``in_chans``."""
    if not isinstance(args, dict):
        raise ValueError(f"{where}: constructor arguments must be a JSON object, got {args!r:.200}")
    params = _parameters(family)
    for key, value in args.items():
        if key == "deploy" and form and isinstance(value, bool):
            continue
        if key in LOCATION_FIELDS or key == "deploy":
            raise ValueError(
                f"{where}: field {key!r} ({value!r:.100}) is not read from a file (it says where weights come from, "
                "or their form); give it yourself"
            )
        if key not in params:
            raise ValueError(f"{where}: unknown constructor argument {key!r}; the model takes {', '.join(params)}")
        if not _fits(value, params[key]) or (key in ("num_classes", "in_chans") and value < (key == "in_chans")):
            raise ValueError(
                f"{where}: field {key!r} is {value!r:.100}, not a valid {params[key]}; fix the file or give "
                f"--model-kwargs '{{\"{key}\": ...}}'"
            )
    return dict(args)


def check_buildable(build: Callable[[], torch.nn.Module], where: str) -> None:
    """Build the model a file's arguments describe on the meta device, where nothing is allocated, and refuse what
    its constructor raises or a model of over :data:`MAX_ELEMENTS` (a recorded ``num_classes`` of 10**7 would
    allocate 20 GB before any check of the file's tensors)."""
    try:
        with torch.device("meta"):
            numel = sum(t.numel() for t in build().state_dict().values())
    except Exception as err:  # noqa: BLE001 - whatever a constructor raises, the file's arguments are at fault
        raise ValueError(f"{where}: cannot build the model: {type(err).__name__}: {err}") from None
    if numel > MAX_ELEMENTS:
        raise ValueError(
            f"{where}: the model would have {numel:,} parameters and buffers, over the {MAX_ELEMENTS:,} a file's "
            "arguments may ask for; check them (a model that large, if you mean it, loads with "
            "repmlp.load_checkpoint(model, file))"
        )


def parse_json(text: object, where: str) -> object:
    """A JSON field of a file's metadata, parsed; a ValueError naming it otherwise."""
    try:
        return json.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than the parser goes
        raise ValueError(f"{where} is not JSON ({err}): {text!r:.100}") from None


def dataset(dataset: object, root: object, where: str) -> tuple[str | None, str | None]:
    """(dataset, root) a file records, if they name a known dataset and a local path; else (None, None) with a
    warning that names them (the user must give --dataset / --data-root)."""
    known = isinstance(dataset, str) and (
        dataset in _LOCAL_DATASETS or any(dataset.startswith(p) for p in _TIMM_PREFIXES)
    )
    local = root is None or (isinstance(root, str) and root not in ("", "-") and not _SCHEME.match(root))
    if dataset is None or (known and local):
        return dataset, root
    _logger.warning(
        "%s: recorded dataset %r with root %r not used (a known dataset on a local path only); "
        "give --dataset and --data-root",
        where,
        dataset,
        root,
    )
    return None, None


def _parameters(family: type | None) -> dict[str, str]:
    if family is None:
        return {"num_classes": "int", "in_chans": "int"}
    signature = inspect.signature(family.__init__)
    return {
        p.name: p.annotation if isinstance(p.annotation, str) else type(p.default).__name__
        for p in signature.parameters.values()
        if p.name not in ("self", "deploy", "device", "dtype") and p.kind is p.POSITIONAL_OR_KEYWORD
    }


def _fits(value: object, annotation: str) -> bool:
    """Whether a JSON value fits a constructor's annotation (the few types the zoo's constructors take)."""
    for kind in (k.strip() for k in re.split(r"\|(?![^\[]*\])", annotation)):  # 'int | tuple[int, int]': top level
        inner = kind[kind.index("[") + 1 : -1] if "[" in kind else "int"
        if kind == "None" and value is None:
            return True
        if kind == "bool" and isinstance(value, bool):
            return True
        if kind == "str" and isinstance(value, str):
            return True
        if kind in ("int", "float") and isinstance(value, (int, float)) and not isinstance(value, bool):
            return isinstance(value, int) or (kind == "float" and math.isfinite(value))  # JSON takes NaN
        if kind.split("[")[0] in ("Sequence", "tuple", "list", "_Size") and isinstance(value, list):
            if all(_fits(v, inner.split(",")[0].strip()) for v in value):
                return True
    return False
