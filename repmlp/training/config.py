"""Training configuration: YAML files over defaults, with ``section.key=value`` overrides.

Every value a recipe can set has a default here, so a config file only states what differs and an
override naming an unknown key is an error rather than a silent no-op.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {
        "name": "repmlp_cifar_mlp",  # timm model name
        "kwargs": {},  # extra timm.create_model arguments (e.g. widths, drop_rate)
        "pretrained": False,
    },
    "data": {
        # imagefolder | cifar10 | cifar100 | fashion_mnist | synthetic, or timm's: tar | wds/NAME | hfds/PATH | torch/..
        "dataset": "synthetic",
        "root": None,
        "train_split": None,  # timm specs: the splits' names on disk (None: 'train', and 'val' or 'validation')
        "val_split": None,
        "num_classes": None,  # None: from the data (WebDataset shards: from their _info.json)
        "num_workers": 2,
        # None: taken from the model's pretrained_cfg
        "input_size": None,
        "mean": None,
        "std": None,
        "crop_pct": None,
        "interpolation": None,
        "crop_padding": 0,  # > 0: pad-and-random-crop (the CIFAR recipe) instead of random-resized crop
        "train_transform": {},  # timm.data.create_transform training arguments (hflip, scale, auto_augment, ...)
        "synthetic": {"num_samples": 256, "num_classes": 10, "img_size": 32, "in_chans": 3},
        # image folders: leave out images that cannot be decoded, counted ('skipped'); evaluation only (eval.py
        # --skip-bad-images). Off: the first such image is an error naming its file.
        "skip_bad_images": False,
    },
    "optimizer": {
        "opt": "sgd",  # timm optimizer name ('sgd' is Nesterov momentum)
        "lr": 0.1,  # for the global batch (train.global_batch, or batch_size x processes), applied as given
        "weight_decay": 1e-4,
        "momentum": 0.9,
        "filter_bias_and_bn": True,  # no weight decay on 1-D parameters
        "clip_grad": None,
        "clip_mode": "norm",
        "kwargs": {},
    },
    "scheduler": {
        "sched": "cosine",
        "min_lr": 0.0,
        "warmup_epochs": 0,
        "warmup_lr": 1e-5,
        "step_on_epochs": False,  # False: update the LR every step
        "kwargs": {},
    },
    "augmentation": {
        "mixup": 0.0,
        "cutmix": 0.0,
        "cutmix_minmax": None,
        "mixup_prob": 1.0,
        "mixup_switch_prob": 0.5,
        "mixup_mode": "batch",
        "label_smoothing": 0.0,
    },
    "ema": {"enabled": False, "decay": 0.9998, "warmup": False},
    "qat": {  # quantization-aware training (repmlp.quantize), e.g. a short fine-tune of trained weights before int8
        "mode": "none",  # none | equivalent_fc3 (train form, fake-quantized equivalent FC3) | fc3_bn (deploy form,
        # a BN after each FC3: the authors' post-quantization fine-tuning)
        "reduce_range": None,  # 7-bit int8 weights, as onnxruntime on CPUs without VNNI; None: as this CPU needs
        "calibration_batches": 8,  # fc3_bn: training batches whose FC3 outputs initialise the inserted BNs
    },
    "train": {
        "epochs": 10,
        "batch_size": 128,  # per process and per batch
        # None: batch_size x processes; else the batch of one optimizer step, made by summing the gradients of
        # global_batch / (batch_size x processes) batches (gradient accumulation)
        "global_batch": None,
        "eval_batch_size": 256,
        "precision": "fp32",  # fp32 | bf16 | fp16 (fp16 on GPU only)
        "channels_last": False,
        "grad_checkpointing": False,
        "sync_bn": False,
        "seed": 0,
        "threads": None,  # torch CPU threads per process; None: torch's default
        "device": "auto",  # auto | cpu | cuda
        "output_dir": "runs/default",
        "progress": True,
        "export_ema": True,  # convert and ship the EMA weights when EMA is enabled
    },
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; recipes write learning rates that way, so read it as a float."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[0-9][0-9_]*[eE][-+]?[0-9]+|\.[0-9_]+"
        r"(?:[eE][-+]?[0-9]+)?|\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)


def _parse_value(text: str) -> Any:
    """YAML scalar or flow value: ``0.1``, ``1e-3``, ``true``, ``null``, ``[1, 3]``, ``{a: 1}``; anything else stays
    a string."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def call_configured(key: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, where some keywords come from the free-form config mapping ``key`` (e.g.
    ``model.kwargs``): a keyword that nothing down the call takes is a ValueError naming the config key, not a
    TypeError from deep inside."""
    try:
        return fn(*args, **kwargs)
    except TypeError as err:
        bad = re.search(r"unexpected keyword argument '([^']*)'", str(err))
        if bad is None or bad.group(1) not in kwargs:
            raise
        hint = " (YAML needs a space after the colon: {name: value})" if ":" in bad.group(1) else ""
        raise ValueError(f"{key}: {bad.group(1)!r} is not an argument here: {err}{hint}") from None


def set_value(cfg: dict, dotted_key: str, value: Any) -> None:
    """Set ``cfg['a']['b'] = value`` for ``dotted_key`` 'a.b'; the section and key must exist, except below
    free-form mappings (``kwargs``, ``train_transform``)."""
    *path, leaf = dotted_key.split(".")
    node, walked = cfg, []
    for part in path:
        walked.append(part)
        if not isinstance(node, dict) or part not in node:
            raise ValueError(
                f"unknown config key {'.'.join(walked)!r} (in {dotted_key!r}); valid here: "
                f"{sorted(node) if isinstance(node, dict) else 'none'}"
            )
        node = node[part]
    free_form = bool(path) and path[-1] in ("kwargs", "train_transform", "synthetic")
    if not isinstance(node, dict) or (leaf not in node and not free_form):
        raise ValueError(
            f"unknown config key {dotted_key!r}; valid keys: "
            f"{sorted('.'.join(path + [k]) for k in node) if isinstance(node, dict) else 'none'}"
        )
    _check_type(dotted_key, value)
    node[leaf] = value


_MINIMUM = {"train.epochs": 1, "train.batch_size": 1, "train.eval_batch_size": 1}
_KINDS = {
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
    type(None): "null",
}


def _default(dotted_key: str) -> Any:
    node: Any = DEFAULTS
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fits(default: Any, value: Any) -> bool:
    """True when ``value`` may replace ``default``: any value for a None default, an integer for a float."""
    if default is None:
        return True
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, int) and not isinstance(default, bool):
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _check_type(dotted_key: str, value: Any) -> None:
    """Raise unless ``value`` fits the key's default (see :func:`_fits`), so a typo fails before training starts."""
    default = _default(dotted_key)
    if isinstance(default, dict) and isinstance(value, dict):
        for key, sub_value in value.items():
            _check_type(f"{dotted_key}.{key}", sub_value)
    if _fits(default, value):
        if dotted_key in _MINIMUM and value < _MINIMUM[dotted_key]:
            raise ValueError(f"config value {dotted_key}={value!r} must be at least {_MINIMUM[dotted_key]}")
        return
    hint = ""
    if isinstance(value, str) and _fits(default, _parse_value(value.strip("'\""))):
        hint = f"; write it without quotes: {dotted_key}={value.strip(chr(39) + chr(34))}"
    raise ValueError(
        f"config value {dotted_key}={value!r} must be {_KINDS[type(default)]} like its default "
        f"{default!r}, not {_KINDS.get(type(value), type(value).__name__)}{hint}"
    )


#: The key of a run's config.json under which each resumption records its source and changed settings.
RESUMED = "resumed"


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> dict:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides (``train.epochs=2``).

    Raises:
        ValueError: an unknown key, an override without '=', or a file that is not a YAML mapping.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {path} not found; see configs/*.yaml")
        data = yaml.load(path.read_text(), Loader=_Loader) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a YAML mapping of sections {sorted(DEFAULTS)}")
        for section, values in data.items():
            if section == RESUMED:  # a run's record of its resumptions (config.json), not a setting
                continue
            if section not in cfg or not isinstance(values, dict):
                raise ValueError(f"{path}: unknown section {section!r} or not a mapping; sections: {sorted(DEFAULTS)}")
            for key, value in values.items():
                if isinstance(value, dict) and isinstance(cfg[section].get(key), dict):
                    for sub, sub_value in value.items():  # nested mappings update the defaults
                        set_value(cfg, f"{section}.{key}.{sub}", sub_value)
                else:
                    set_value(cfg, f"{section}.{key}", value)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.epochs=2")
        set_value(cfg, key.strip(), _parse_value(text))
    return cfg
