"""Weights on disk: safetensors with metadata, foreign checkpoints, strict loading with clear errors."""

from __future__ import annotations

__all__ = [
    "PLAIN_STATE_DICT",
    "checkpoint_filter_fn",
    "file_form",
    "load_checkpoint",
    "prepare_state_dict",
    "read_checkpoint",
    "read_metadata",
    "read_state_dict",
    "save_checkpoint",
    "write_folder",
]

import argparse
import copy
import functools
import json
import logging
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from timm.models import adapt_input_conv, clean_state_dict
from torch import nn

from .convert import convert_to_deploy, is_deploy_form, reparameterizable
from .guards import atomic_write
from .locations import WEIGHT_NAMES
from .preprocess import input_metadata
from .shipped import _SOURCE_KEYS, WEIGHTS_NAME, sha256, weights_file

_logger = logging.getLogger(__name__)
_PLAIN_KEYS = ("state_dict", "model")  # trainers' entries for the weights, in timm's order of preference
_EMA_KEYS = ("state_dict_ema", "model_ema")  # ... and for their EMA weights
_WRAPPER_PREFIXES = {"module.": "'module.' (DistributedDataParallel)", "_orig_mod.": "'_orig_mod.' (torch.compile)"}
# What timm's loader unpickles besides tensors and containers (timm.models._helpers._torch_load): train.py's args.
_SAFE_GLOBALS = [argparse.Namespace]
_LIGHTNING_KEY = "pytorch-lightning_version"  # the entry that marks a Lightning checkpoint
PLAIN_STATE_DICT = "a state dict"  # what read_checkpoint says of a file that holds nothing else


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    model_name: str | None = None,
    form: str | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``model``'s state dict as safetensors, atomically, recording model name and form.

    Args:
        model: the model to save.
        path: destination ``.safetensors`` file.
        model_name: timm name; default: ``model.pretrained_cfg['architecture']`` when present.
        form: 'train' or 'deploy'; default: detected from the model.
        metadata: further string metadata (over the class names and input settings recorded from the model,
            :func:`repmlp.preprocess.input_metadata`, which let ``repmlp-predict`` run the file alone).

    Raises:
        ValueError: ``path`` does not end in ``.safetensors`` (the format it is written in).
    """
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes safetensors: name the file *.safetensors, got {str(path)!r}")
    if model_name is None:
        model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    form = form or ("deploy" if is_deploy_form(model) else "train")
    if form not in ("train", "deploy"):
        raise ValueError(f"form must be 'train' or 'deploy', got {form!r}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    recorded = {**_constructor_metadata(model), **input_metadata(model), **(metadata or {})}
    meta = {"model": model_name, "form": form, "format": "pt", **recorded}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=meta))


def _constructor_metadata(model: nn.Module) -> dict[str, str]:
    """num_classes and constructor arguments of a zoo model, so that the file alone rebuilds it."""
    args = dict(getattr(model, "init_args", None) or {})
    if not args:
        return {}
    kwargs = {k: v for k, v in args.items() if k not in ("deploy", "num_classes")}
    return {"num_classes": str(args.get("num_classes", 0)), "model_kwargs": json.dumps(kwargs)}


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Metadata of a safetensors file or model folder; for a timm ``train.py`` checkpoint, the model, classes and
    constructor arguments its ``args`` record (:func:`_trainer_record`); {} for other formats."""
    path = weights_file(path)
    if not str(path).endswith(".safetensors"):
        return _trainer_record(path)
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _trainer_record(path: Path) -> dict[str, str]:
    """``model`` (untagged), ``num_classes`` and ``model_kwargs`` (with ``in_chans``) of a timm ``train.py``
    checkpoint, as our files record them, from the arguments it stores; {} for any other file (and an unreadable
    one: :func:`read_checkpoint` says why when it is loaded)."""
    try:
        content = _torch_load(path)
    except Exception:  # noqa: BLE001 - see the docstring
        return {}
    args = content.get("args") if isinstance(content, dict) else None
    name = str(getattr(args, "model", "") or "") if isinstance(args, argparse.Namespace) else ""
    if not name or ":" in name:  # not train.py's, or an hf-hub:/local-dir: source rather than a name
        return {}
    record = {"model": name.split(".")[0]}
    if getattr(args, "num_classes", None):
        record["num_classes"] = str(args.num_classes)
    kwargs = dict(getattr(args, "model_kwargs", None) or {})
    if getattr(args, "in_chans", None):
        kwargs["in_chans"] = args.in_chans
    try:
        record["model_kwargs"] = json.dumps(kwargs)
    except TypeError:  # arguments JSON cannot hold: the caller's arguments must name them
        pass
    return record


def _torch_load(path: Path) -> object:
    """``torch.load`` with ``weights_only=True`` and timm's one allowance (:data:`_SAFE_GLOBALS`). Files in the zip
    format (every ``torch.save`` since PyTorch 1.6) are memory-mapped: tensors read from the page cache instead
    of being copied into fresh memory first (loading copies them into the model's own tensors)."""
    with torch.serialization.safe_globals(_SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def read_state_dict(path: str | os.PathLike, use_ema: bool = False) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``), logging what the file held
    where it held more than a state dict.

    See :func:`read_checkpoint`, which also returns that description.
    """
    state, held = read_checkpoint(path, use_ema)
    if held != PLAIN_STATE_DICT:
        _logger.info("%s: %s", path, held)
    return state


def read_checkpoint(path: str | os.PathLike, use_ema: bool = False) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of a weights file, and what the file held (e.g. ``timm train.py checkpoint (arch ..., epoch
    3); loaded 'state_dict'; it also holds EMA weights 'state_dict_ema' (use_ema=True loads them)``).

    A torch file is read with ``weights_only=True``, allowing the one type timm's loader allows besides tensors
    and containers (``argparse.Namespace``: timm's ``train.py`` stores its arguments); nothing that runs code is
    unpickled. A safetensors file whose metadata names another format than weights' (our training state) is refused.

    Trainers' checkpoints are unwrapped: ``state_dict`` or ``model`` by default (as timm's scripts do), their EMA
    weights ``state_dict_ema`` or ``model_ema`` with ``use_ema``; a Lightning checkpoint's LightningModule state
    dict loses the prefix of the attribute that holds the model when all its keys share it. A ``module.``
    (DistributedDataParallel) or ``_orig_mod.`` (``torch.compile``) prefix is stripped (timm's
    ``clean_state_dict``). A model folder (timm's ``local-dir:`` layout) names its weights file by timm's names
    (:func:`repmlp.locations.folder_weights`: ``model.safetensors``, ``pytorch_model.bin``, ...); a file
    whose folder lists its sha256 (a shipped file) is checked against it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupted, truncated or not a checkpoint, or holds no EMA weights though
            ``use_ema`` asks for them (the message names the file and what it holds).
    """
    path = weights_file(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"weights path {path} is a directory and no model folder; give the weights file (.safetensors or .pth) "
            f"or a folder holding one of timm's weight files ({', '.join(WEIGHT_NAMES)}; beside timm's "
            "config.json, any *.safetensors, *.pth, *.bin)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            content = safetensors.torch.load_file(str(path))
        else:
            content = _torch_load(path)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err):
            raise ValueError(_needs_unpickling(path, err)) from None
        raise ValueError(f"cannot read weights file {path}: corrupted, truncated or not a checkpoint ({err})") from err
    except Exception as err:  # noqa: BLE001 - whatever a parser raises (a text file: KeyError) means a bad file
        raise ValueError(
            f"cannot read weights file {path}: corrupted, truncated or not a checkpoint ({type(err).__name__}: {err})"
        ) from err
    if path.suffix == ".safetensors":
        _refuse_other_formats(path)
    state, held = _unwrap(content, path, use_ema)
    cleaned = clean_state_dict(state)
    removed = {k[: len(k) - len(c)] for k, c in zip(state, cleaned) if k != c}  # e.g. 'module._orig_mod.'
    if removed:
        wrappers = [w for prefix, w in _WRAPPER_PREFIXES.items() if any(prefix in r for r in removed)]
        held += f"; stripped the {' and '.join(wrappers)} prefix"
    return cleaned, held


def _refuse_other_formats(path: Path) -> None:
    """A ValueError for a safetensors file that its metadata says holds something else than weights (e.g. our
    training state, whose tensors are numbered): weights files say format 'pt' (or, from other frameworks, 'np',
    'tf', 'flax'), or nothing."""
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    fmt = meta.get("format", "pt")
    if fmt not in ("pt", "np", "tf", "flax", "mlx"):
        what = (
            " (a training state of tools/train.py: resume it with --resume; the run's weights are its "
            "model_train.safetensors)"
            if "state" in meta
            else ""
        )
        raise ValueError(f"weights file {path} is not a state dict: its metadata says format {fmt!r}{what}")


def _unwrap(content: object, path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a file's content (itself, or a trainer checkpoint's entry) and what the file held."""

    def tensors(value: object) -> bool:
        return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())

    if tensors(content):
        if use_ema:
            raise ValueError(f"use_ema=True, but {path} holds a plain state dict, no EMA weights; drop use_ema")
        return content, PLAIN_STATE_DICT
    if not isinstance(content, dict):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors (it holds a {type(content)})")
    ema = next((k for k in _EMA_KEYS if tensors(content.get(k))), None)
    plain = next((k for k in _PLAIN_KEYS if tensors(content.get(k))), None)
    what = _describe_trainer_file(content)
    if plain is None and ema is None:
        raise ValueError(
            f"weights file {path} does not hold a state dict of tensors: {what}, none of {_PLAIN_KEYS + _EMA_KEYS} "
            "holds tensors"
        )
    if use_ema and ema is None:
        raise ValueError(f"use_ema=True, but {path} holds no EMA weights ({what}); drop use_ema to load {plain!r}")
    key = ema if use_ema or plain is None else plain
    held = f"{what}; loaded {key!r}"
    if key == plain and ema is not None:
        held += f"; it also holds EMA weights {ema!r} (use_ema=True, or --ema in our tools, loads them)"
    elif key == ema and plain is None:
        held += " (the only weights in it)"
    if _LIGHTNING_KEY in content:
        return _lightning_module_weights(content[key], held)
    return content[key], held


def _lightning_module_weights(state: dict[str, torch.Tensor], held: str) -> tuple[dict[str, torch.Tensor], str]:
    """A Lightning checkpoint holds its LightningModule's state dict: the model's keys under the attribute that holds
    it (``model.``). That prefix is stripped when every key has it (the module holds nothing else)."""
    attributes = {k.split(".", 1)[0] for k in state}
    if len(attributes) != 1 or not all("." in k for k in state):
        return state, f"{held}; keys of the LightningModule under {sorted(attributes)}, not stripped"
    prefix = f"{attributes.pop()}."
    return {k[len(prefix) :]: v for k, v in state.items()}, f"{held}; stripped the LightningModule's {prefix!r} prefix"


def _describe_trainer_file(content: dict) -> str:
    """What a trainer's checkpoint is: timm's (``train.py`` records ``args``; its ``CheckpointSaver`` the ``saver``
    bookkeeping, ``arch`` and ``version``) or another's, by its entries."""
    if isinstance(content.get("args"), argparse.Namespace) or "saver" in content:
        facts = ", ".join(f"{k} {content[k]}" for k in ("arch", "epoch", "metric") if k in content)
        who = "timm train.py" if isinstance(content.get("args"), argparse.Namespace) else "timm CheckpointSaver"
        return f"a {who} checkpoint ({facts})"
    if _LIGHTNING_KEY in content:
        facts = ", ".join(f"{k} {content[k]}" for k in ("epoch", "global_step") if k in content)
        return f"a Lightning checkpoint ({facts})"
    return f"a checkpoint with entries {sorted(map(str, content))}"


def _needs_unpickling(path: Path, err: Exception) -> str:
    """What a torch file holds that ``weights_only=True`` (with timm's one allowance) does not read, and what to do."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    try:  # reads the pickle's opcodes, runs nothing
        found = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) if g not in allowed]
    except Exception:  # noqa: BLE001 - the listing is a courtesy; the refusal stands without it
        found = re.findall(r"unsupported GLOBAL (\S+)", str(err), flags=re.IGNORECASE)
    what = f"a {found[0]} object" if len(found) == 1 else f"{', '.join(found)} objects" if found else "Python objects"
    return (
        f"cannot read weights file {path}: it holds {what} besides tensors and plain containers, and is not "
        f"unpickled (that can run code; only {', '.join(sorted(allowed))} is, as timm's loader allows). If you trust "
        "it, save its state dict alone and load that: torch.save(torch.load(path, weights_only=False)['state_dict'], "
        "'weights.pth') (or the key that holds the tensors)"
    )


def file_form(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    train_model_factory: Callable[[], nn.Module] | None = None,
) -> str | None:
    """The form of a state dict, judged against ``model``'s structure (the one rule for it, which
    :func:`prepare_state_dict` and the tools both apply): 'train' when, renamed into our layout, it has the keys of
    the train-form twin; 'deploy' when it has them of a twin with some or all blocks re-parameterized (our deploy
    form, the authors' inference forms); None when it matches neither (a strict load then lists the mismatches)."""
    filter_fn = filter_fn or getattr(model, "checkpoint_filter_fn", None)
    state = filter_fn(state, model) if filter_fn is not None else state
    twin, reparameterized = _matching_twin(model, state, train_model_factory)
    if twin is None:
        return None
    return "deploy" if reparameterized else "train"


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    train_model_factory: Callable[[], nn.Module] | None = None,
    allow_nonfinite: bool = False,
    use_ema: bool = False,
) -> nn.Module:
    """Load weights strictly into ``model`` (train or deploy form), in place; returns ``model``.

    The one path every loader takes (``create_model(pretrained=True)``, the tools, training): see
    :func:`prepare_state_dict` for what is converted, adapted and refused.

    Args:
        model: destination.
        path: ``.safetensors``, ``.pth`` or ``.pt`` file: ours, the authors', a plain ``torch.save`` of a state
            dict (of a DDP or ``torch.compile`` wrapper too) or a trainer's checkpoint (timm ``train.py``'s,
            Lightning's, ...); torch files are read with ``weights_only=True`` (see :func:`read_checkpoint`).
        filter_fn: key renames of foreign layouts (default: ``model.checkpoint_filter_fn``).
        train_model_factory: builds the train-form twin (default: ``model.train_form_twin``).
        allow_nonfinite: accept NaN/Inf weights (for debugging a diverged run).
        use_ema: load a trainer checkpoint's EMA weights (``state_dict_ema``; see :func:`read_checkpoint`).
    """
    state = read_state_dict(path, use_ema)
    state = prepare_state_dict(state, model, filter_fn, train_model_factory, allow_nonfinite, source=str(path))
    _strict_load(model, state, str(path))
    return model


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Filter for ``timm.models.load_checkpoint(model, path, filter_fn=repmlp.checkpoint_filter_fn)``: the same
    decisions as :func:`load_checkpoint`, returning the state dict for ``model.load_state_dict``."""
    return prepare_state_dict(state_dict, model)


def prepare_state_dict(
    state: dict[str, torch.Tensor],
    model: nn.Module,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    train_model_factory: Callable[[], nn.Module] | None = None,
    allow_nonfinite: bool = False,
    source: str = "state dict",
) -> dict[str, torch.Tensor]:
    """A state dict in ``model``'s form and layout, from ours or a foreign one, train or deploy form.

    Steps: rename keys (``filter_fn``); check values (an integer tensor for a float parameter, NaN or Inf are
    errors); adapt for fine-tuning as timm does (another ``num_classes`` keeps the model's fresh classifier,
    another ``in_chans`` adapts the first conv; weights trained at another number of partitions keep the model's
    fresh global perceptrons, see :func:`_adapt_to_partitions`); then judge the file against the model's
    structure. A file in the model's form loads as it is. A file whose blocks are (partly) re-parameterized,
    offered to a deploy-form model, is loaded into a train-form twin whose matching blocks are re-parameterized
    first, and converted. Such a file offered to a train-form model raises a ValueError: the branches cannot be
    recovered.
    """
    raw, filter_fn = state, filter_fn or getattr(model, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    expected = model.state_dict()
    _check_values(state, expected, source, allow_nonfinite)
    state = _adapt_for_finetuning(state, model, expected, source)
    resized = _resized_children(state, model, expected)
    factory = train_model_factory or getattr(model, "train_form_twin", None)
    if resized and factory is not None and is_deploy_form(model):  # a train-form file is adapted so, then converted
        twin = factory()  # initialised: the resized global perceptrons keep its fresh fc1/fc2
        twin_expected = twin.state_dict()
        twin_state = _adapt_to_partitions(state, twin_expected, _resized_children(state, twin, twin_expected), source)
        if set(twin_state) == set(twin_expected):  # the twin's keys: a train-form file
            _strict_load(twin, twin_state, f"{source} (as a train-form twin)")
            return convert_to_deploy(twin, inplace=True).state_dict()
    state = _adapt_to_partitions(state, expected, resized, source)
    if set(state) == set(expected):
        _refuse_unless_it_fits(raw, state, model, model, train_model_factory, source)
        return state
    twin, reparameterized = _matching_twin(model, state, train_model_factory)
    if not is_deploy_form(model) and twin is not None and reparameterized:
        raise ValueError(
            f"{source} holds a deploy-form (re-parameterized) checkpoint; its conv and BN branches cannot be "
            "recovered, so it loads only into a deploy-form model: build it with deploy=True "
            "(e.g. timm.create_model(name, deploy=True))."
        )
    _refuse_unless_it_fits(raw, state, model, twin, train_model_factory, source)
    if twin is None:
        return state  # the strict load lists what does not match
    _strict_load(twin, state, f"{source} (as a train-form twin)", assign=True)
    return convert_to_deploy(twin, inplace=True).state_dict()


def _matching_twin(
    model: nn.Module, state: dict[str, torch.Tensor], factory: Callable[[], nn.Module] | None
) -> tuple[nn.Module | None, bool]:
    """A train-form twin of ``model`` with the blocks re-parameterized whose train-only keys ``state`` lacks
    (innermost first), and whether any were; (None, ...) when no such twin has the file's keys."""
    factory = factory or getattr(model, "train_form_twin", None)
    if factory is None and not is_deploy_form(model):
        factory = functools.partial(copy.deepcopy, model)  # a train-form model is its own twin
    if factory is None:
        return None, False
    twin, reparameterized = _reparameterized_where_missing(_on_meta(factory), set(state))
    return (twin if set(twin.state_dict()) == set(state) else None), reparameterized


def _reparameterized_where_missing(twin: nn.Module, keys: set[str], most: bool = False) -> tuple[nn.Module, bool]:
    """``twin`` with the blocks re-parameterized (innermost first) whose train-form keys ``keys`` lacks (any of them,
    or with ``most`` more than half: a near miss's guess), in place, and whether any were."""
    reparameterized = False
    for name, module in reversed(reparameterizable(twin)):
        prefix = f"{name}." if name else ""
        own = list(module.state_dict())
        lacking = sum(prefix + k not in keys for k in own)
        if not getattr(module, "deploy", False) and lacking > (len(own) // 2 if most else 0):
            module.reparameterize()
            reparameterized = True
    return twin, reparameterized


def _refuse_unless_it_fits(
    raw: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
    model: nn.Module,
    target: nn.Module | None,
    factory: Callable[[], nn.Module] | None,
    source: str,
) -> None:
    """For a model whose family lists its ``key_layouts``: a ValueError naming the closest layout unless ``state``
    (``raw`` renamed) has exactly the keys and shapes of ``target`` (the model, or the twin it loads through)."""
    if not getattr(model, "key_layouts", None):
        return
    if target is None or any(_mismatches({k: v.shape for k, v in target.state_dict().items()}, state)):
        raise ValueError(_no_layout_matches(raw, model, factory, source))


def _no_layout_matches(
    state: dict[str, torch.Tensor], model: nn.Module, factory: Callable[[], nn.Module] | None, source: str
) -> str:
    """The error for a file that fits ``model`` in none of its family's ``key_layouts``: each layout's rename of the
    file is compared with the model's form, the train form and the (partly) re-parameterized form its keys suggest
    (twins built on the meta device), and the closest comparison's mismatches are named."""
    factory = factory or getattr(model, "train_form_twin", None)
    forms = [{k: v.shape for k, v in model.state_dict().items()}]
    if factory is not None:
        forms.append({k: v.shape for k, v in _on_meta(factory).state_dict().items()})
    closest = None
    for layout in model.key_layouts:
        renamed = layout.to_ours(dict(state), model)
        candidates = forms
        if factory is not None:
            twin, _ = _reparameterized_where_missing(_on_meta(factory), set(renamed), most=True)
            candidates = [*forms, {k: v.shape for k, v in twin.state_dict().items()}]
        for expected in candidates:
            found = _mismatches(expected, renamed)
            if closest is None or sum(map(len, found)) < sum(map(len, closest[1])):
                closest = layout.name, found
    missing, unexpected, shapes = closest[1]
    tried = ", ".join(layout.name for layout in model.key_layouts)
    return (
        f"{source} does not match the model: missing keys {_show(missing)}, unexpected keys {_show(unexpected)}, "
        f"shape mismatches {_show(shapes)} (keys in our names; the file read as {closest[0]}, the closest of the "
        f"layouts tried: {tried})"
    )


def _mismatches(expected: dict[str, torch.Size], state: dict[str, torch.Tensor]) -> tuple[list, list, list]:
    """Keys ``state`` lacks, keys it has in excess, and 'key: file (shape) vs model (shape)' for the others."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in expected
        if k in state and state[k].shape != expected[k]
    ]
    return missing, unexpected, shapes


def _check_values(state: dict, expected: dict, source: str, allow_nonfinite: bool) -> None:
    """Refuse integer tensors for float parameters and (unless allowed) NaN/Inf; note lower-precision floats."""
    ints = [
        k for k, v in state.items() if k in expected and expected[k].is_floating_point() and not v.is_floating_point()
    ]
    if ints:
        raise ValueError(
            f"{source}: integer tensors for float parameters (the file was saved with the wrong dtype): {_show(ints)}"
        )
    lower = [
        k
        for k, v in state.items()
        if k in expected
        and v.is_floating_point()
        and expected[k].is_floating_point()
        and torch.finfo(v.dtype).bits < torch.finfo(expected[k].dtype).bits
    ]
    if lower:
        _logger.warning(
            "%s: %d tensors stored in lower precision than the model's (e.g. %s %s); cast to %s",
            source,
            len(lower),
            lower[0],
            state[lower[0]].dtype,
            expected[lower[0]].dtype,
        )
    if not allow_nonfinite:
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(
                f"{source}: NaN or Inf values in {_show(bad)} (pass allow_nonfinite=True to load "
                "them anyway, e.g. to debug a diverged run)"
            )


def _adapt_for_finetuning(state: dict, model: nn.Module, expected: dict, source: str) -> dict:
    """timm's fine-tuning loads: another num_classes keeps the model's fresh classifier (also for 0 classes),
    another in_chans adapts the first conv with ``timm.models.adapt_input_conv``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    state = dict(state)
    first_conv = f"{cfg['first_conv']}.weight" if cfg.get("first_conv") else None
    if first_conv in state and first_conv in expected and state[first_conv].dim() == 4:
        chans = expected[first_conv].shape[1]
        if state[first_conv].shape[1] != chans:
            weight = state[first_conv]  # timm's adapt_input_conv expects RGB weights; one channel is spread evenly
            state[first_conv] = (
                weight.repeat(1, chans, 1, 1) / chans if weight.shape[1] == 1 else adapt_input_conv(chans, weight)
            )
            _logger.warning("%s: adapted %s to in_chans=%d", source, first_conv, chans)
    classifier = cfg.get("classifier")
    if classifier:
        ours = {k: v for k, v in expected.items() if k.startswith(classifier + ".")}
        theirs = [k for k in state if k.startswith(classifier + ".")]
        fits_elsewhere = any(k in expected for k in state if k not in theirs)  # else: another layout, listed later
        if fits_elsewhere and {k: state[k].shape for k in theirs} != {k: v.shape for k, v in ours.items()}:
            state = {k: v for k, v in state.items() if k not in theirs} | ours
            _logger.warning(
                "%s: %s; the model keeps its fresh one (num_classes=%s)",
                source,
                f"classifier [{', '.join(theirs)}] skipped: another number of classes"
                if theirs
                else f"no classifier ({classifier}.*) in the file",
                getattr(model, "num_classes", "?"),
            )
    return state


def _resized_children(state: dict, model: nn.Module, expected: dict) -> list[str]:
    """Key prefixes of the children whose shape depends on the number of partitions (a block's
    ``partition_dependent``: the RepMLP v1 global perceptron, fc1/fc2 over C * hp * wp) where ``state`` differs
    from the model: weights trained at another input size (another grid, or no global perceptron at one partition).
    """
    prefixes = [
        f"{name}.{child}." if name else f"{child}."
        for name, m in model.named_modules()
        for child in getattr(m, "partition_dependent", ())
    ]

    def fc_shapes(tensors: dict, prefix: str) -> dict:  # fc1/fc2 only: a deploy-form file has no BN there
        return {
            k: v.shape for k, v in tensors.items() if k.startswith(prefix + "fc1.") or k.startswith(prefix + "fc2.")
        }

    if not set(state) & set(expected):
        return []  # another layout altogether (the strict load lists it), not another grid
    return [p for p in prefixes if fc_shapes(state, p) != fc_shapes(expected, p)]


def _adapt_to_partitions(state: dict, expected: dict, resized: list[str], source: str) -> dict:
    """Under each of the ``resized`` prefixes, the model's freshly initialised fc1/fc2 stay (the paper's recipe,
    v1 Sec. 4.4), the BN loads from the file where both have it, and keys the model lacks are dropped; everything
    else loads as it is (any other mismatch stays an error of the strict load)."""
    if not resized:
        return state
    state = dict(state)
    for prefix in resized:
        ours = {k: v for k, v in expected.items() if k.startswith(prefix)}
        for key in [k for k in state if k.startswith(prefix)]:
            fc = key[len(prefix) :].split(".")[0] in ("fc1", "fc2")
            if fc or key not in ours or state[key].shape != ours[key].shape:
                del state[key]
        state.update({k: v for k, v in ours.items() if k not in state})
    _logger.warning(
        "%s: trained at another number of partitions; %d global perceptrons keep their fresh fc1/fc2: %s",
        source,
        len(resized),
        _show([p.rstrip(".") for p in resized]),
    )
    return state


def _show(keys: list[str]) -> str:
    return "[" + ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") + "]"


def _on_meta(factory: Callable[[], nn.Module]) -> nn.Module:
    """A train-form twin from ``factory``, its tensors on the meta device: the file's weights are then assigned to it
    (``_strict_load(..., assign=True)``) instead of first initialising weights only to overwrite them (seconds for
    a full-size RepMLP-ResNet). Converting and comparing structures work on meta tensors alike."""
    with torch.device("meta"):
        return factory()


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], source: str, assign: bool = False) -> None:
    """``model.load_state_dict(state, strict=True)``, refused with every mismatch named. ``assign``: the model's
    tensors become ``state``'s, in the model's dtypes (for a twin built by :func:`_on_meta`)."""
    expected = model.state_dict()
    missing, unexpected, shapes = _mismatches({k: v.shape for k, v in expected.items()}, state)
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match the model: missing keys {_show(missing)}, "
            f"unexpected keys {_show(unexpected)}, shape mismatches {_show(shapes)}"
        )
    if assign:  # the file's tensors themselves (conversion writes new tensors), in the twin's dtypes
        state = {k: v.to(dtype=expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def write_folder(model: nn.Module, folder: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (train form) as a shipped folder: ``model.safetensors`` and ``config.json`` from its
    ``pretrained_cfg`` (which names architecture and tag); a ``README.md`` model card is written by hand.

    Returns:
        The folder.
    """
    folder = Path(folder)
    cfg = dict(model.pretrained_cfg)
    if is_deploy_form(model):
        raise ValueError("write_folder: ships the train form (the deploy form is converted from it on load)")
    if not cfg.get("tag"):
        raise ValueError("write_folder: the model's pretrained_cfg has no tag (create it as timm name.tag)")
    save_checkpoint(model, folder / WEIGHTS_NAME, model_name=cfg["architecture"], form="train", metadata=metadata)
    config = {
        "architecture": cfg["architecture"],
        "num_classes": model.num_classes,
        "num_features": model.num_features,
        "global_pool": model.init_args.get("global_pool", "avg"),
        "pretrained_cfg": {k: v for k, v in cfg.items() if k not in _SOURCE_KEYS and v is not None},
        "files": {WEIGHTS_NAME: {"sha256": sha256(folder / WEIGHTS_NAME), "form": "train"}},
    }
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / "config.json", lambda tmp: Path(tmp).write_text(text))
    return folder
