"""What a weights file records so that it runs alone: class names and the input it takes.

Written into our safetensors metadata (:func:`repmlp.save_checkpoint`, training, ``repmlp-convert``), into an ONNX
file's ``metadata_props`` (``repmlp-export``) and into an OpenVINO IR's ``rt_info`` section
:data:`OPENVINO_SECTION`; read back by :mod:`repmlp.predict`. All values are strings: ``label_names``,
``input_size``, ``mean`` and ``std`` as JSON lists, ``interpolation``, ``crop_pct`` and ``crop_mode`` as text.
"""

from __future__ import annotations

import json
import math
from typing import Any

from timm.data import resolve_model_data_config
from torch import nn

__all__ = [
    "INPUT_KEYS",
    "LABEL_KEY",
    "OPENVINO_SECTION",
    "input_metadata",
    "model_input_size",
    "parse_input_metadata",
    "set_openvino_metadata",
]

LABEL_KEY = "label_names"
INPUT_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
_JSON_KEYS = (LABEL_KEY, "input_size", "mean", "std")
OPENVINO_SECTION = "repmlp"  # an OpenVINO IR's rt_info section holding the same keys
# Bounds on what a file may ask of the transform, checked before anything is allocated from it: a side past 8192
# pixels is no classifier's input (a 3x8192x8192 float image is already 800 MB); images are read grey or RGB (PIL),
# so 1 or 3 channels; crop_pct at most 2 (timm's configs use 0.75 to 1.15), and the resize before the centre crop
# (side / crop_pct) at most twice the largest side.
MAX_SIDE = 8192
CHANNELS = (1, 3)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's str_to_interp_mode
CROP_MODES = ("center", "squash", "border")  # timm's eval transform


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model is built for: channels ``in_chans``, size ``img_size``, else its pretrained config's
    (which describes the weights' source: a grey model fine-tuned with ``in_chans=3`` takes 3 channels), else
    3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans, *size = cfg.get("input_size", (3, 224, 224))
    chans = int(getattr(model, "in_chans", None) or chans)
    img_size = getattr(model, "img_size", None)
    if img_size is not None:
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return chans, int(size[0]), int(size[1])


def input_metadata(
    model: nn.Module, data_config: dict[str, Any] | None = None, label_names: list[str] | None = None
) -> dict[str, str]:
    """The metadata that lets a file of ``model`` run alone, as strings.

    Args:
        model: the model (train or deploy form); its channels (``in_chans``) and size come from the model itself,
            the rest from ``data_config`` or its ``pretrained_cfg`` (timm's ``resolve_model_data_config``).
        data_config: the evaluation transform's settings (timm's data config: ``input_size``, ``mean``, ``std``,
            ``interpolation``, ``crop_pct``, ``crop_mode``), as training used them.
        label_names: the class names in class-index order; default: the ``pretrained_cfg``'s, when their number is
            the model's number of classes.

    Returns:
        {} for a model with no ``pretrained_cfg`` and no ``data_config`` (nothing is known of its input).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not cfg and not data_config:
        return {}
    resolved = {**resolve_model_data_config(model), **(data_config or {})}
    chans, height, width = model_input_size(model)
    if data_config and data_config.get("input_size"):
        height, width = data_config["input_size"][-2:]
    mean, std = list(resolved["mean"]), list(resolved["std"])
    if len(mean) == 1 and chans > 1:  # a grey model's statistics on every channel, as Normalize broadcasts them
        mean, std = mean * chans, std * chans
    meta = {
        "input_size": json.dumps([int(chans), int(height), int(width)]),
        "mean": json.dumps([float(v) for v in mean]),
        "std": json.dumps([float(v) for v in std]),
        "interpolation": str(resolved.get("interpolation", "bilinear")),
        "crop_pct": str(float(resolved.get("crop_pct", 1.0))),
        "crop_mode": str(resolved.get("crop_mode", "center")),
    }
    names = label_names if label_names is not None else cfg.get("label_names")
    if names is not None and len(names) == getattr(model, "num_classes", len(names)):
        meta[LABEL_KEY] = json.dumps([str(name) for name in names])
    return meta


def parse_input_metadata(meta: dict[str, str], where: str) -> dict[str, Any]:
    """The recorded values of :func:`input_metadata` decoded (lists, floats) and checked; keys a file lacks are left
    out.

    Args:
        meta: the file's metadata (strings).
        where: the file, for messages.

    Raises:
        ValueError: a value that does not decode, is of the wrong type or out of bounds (:data:`MAX_SIDE`,
            :data:`CHANNELS`, ...), or mean/std that do not match the channels; naming ``where``, the field and the
            value.
    """
    parsed = {key: _field(key, meta[key], where) for key in (LABEL_KEY, *INPUT_KEYS) if key in meta}
    if "input_size" in parsed:
        chans, *sides = parsed["input_size"]
        for key in ("mean", "std"):
            if key in parsed and len(parsed[key]) != chans:
                raise _bad(where, key, meta[key], f"{chans} values, one per channel of input_size {sides}")
        if max(sides) / parsed.get("crop_pct", 1.0) > 2 * MAX_SIDE:
            raise _bad(
                where, "crop_pct", meta["crop_pct"], f"a crop of input_size {sides} resized from at most {2 * MAX_SIDE}"
            )
    return parsed


def _field(key: str, text: str, where: str) -> Any:
    check, wanted = _CHECKS[key]
    value: Any = text
    try:
        value = json.loads(text) if key in _JSON_KEYS else float(text) if key == "crop_pct" else text
    except (TypeError, ValueError, RecursionError):
        raise _bad(where, key, text, wanted) from None
    if not check(value):
        raise _bad(where, key, text, wanted)
    return value


def _bad(where: str, key: str, value: object, wanted: str) -> ValueError:
    return ValueError(
        f"{where}: field {key!r} is {value!r:.100}, not {wanted}; write the file again with repmlp-export or "
        "repmlp-convert (they record it)"
    )


def _numbers(value: Any, low: float = -math.inf) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and low < v < math.inf for v in value
    )


def _input_size(value: Any) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 3
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[0] in CHANNELS
        and all(1 <= v <= MAX_SIDE for v in value[1:])
    )


_CHECKS = {
    LABEL_KEY: (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a JSON list of strings"),
    "input_size": (_input_size, f"a JSON list [channels 1 or 3, height, width] with sides 1 to {MAX_SIDE}"),
    "mean": (_numbers, "a JSON list of finite numbers"),
    "std": (lambda v: _numbers(v, low=0.0), "a JSON list of finite positive numbers"),
    "interpolation": (lambda v: v in INTERPOLATIONS, f"one of {', '.join(INTERPOLATIONS)}"),
    "crop_pct": (lambda v: 0 < v <= 2 and math.isfinite(v), "a number in (0, 2]"),
    "crop_mode": (lambda v: v in CROP_MODES, f"one of {', '.join(CROP_MODES)}"),
}


def set_openvino_metadata(ov_model: Any, metadata: dict[str, str]) -> None:
    """Record ``metadata`` in an ``openvino.Model``'s ``rt_info`` (section :data:`OPENVINO_SECTION`), which
    ``openvino.save_model`` writes into the IR ``.xml`` and :func:`repmlp.predict.load_predictor` reads back."""
    for key, value in metadata.items():
        ov_model.set_rt_info(str(value), [OPENVINO_SECTION, key])
