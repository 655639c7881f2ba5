"""Resumable training state: model, optimizer, scheduler, EMA, AMP scaler, position and RNG states, written
atomically (temporary file, then rename) so a run killed mid-write keeps its last good state.

The file holds no pickle, so resuming never runs code from it: one safetensors file whose tensors are the
state's tensors and whose metadata holds everything else as JSON, tensors replaced by their names.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from timm.utils import unwrap_model
from torch import nn

from ..guards import atomic_write
from .schema import check_model_state, check_optimizer_state, check_schema

STATE_FILE = "last_state.safetensors"
LEGACY_STATE_FILE = "last.pth"  # pickled by earlier versions; never loaded
_FORMAT = "repmlp-training-state-1"
# Tags of the JSON nodes that stand for what JSON has no type for; a dict with one of these keys is stored as items.
_TAGS = ("__tensor__", "__tuple__", "__items__", "__ndarray__")


def rng_states() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int], where: str) -> Any:
    """A JSON-able tree for ``obj``; its tensors are moved into ``tensors`` under numbered names."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:  # safetensors refuses shared storage
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        name = str(len(tensors))
        tensors[name] = t
        return {"__tensor__": name}
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return {"__ndarray__": [str(obj.dtype), list(obj.shape), obj.ravel().tolist()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: _encode(v, tensors, storages, f"{where}.{k}") for k, v in obj.items()}
        return {
            "__items__": [
                [_encode(k, tensors, storages, where), _encode(v, tensors, storages, f"{where}[{k!r}]")]
                for k, v in obj.items()
            ]
        }
    raise TypeError(f"training state: cannot store a {type(obj).__name__!r} (at {where}) without pickle")


#: Deepest nesting a training state's JSON may have (a real one: about 8).
MAX_DEPTH = 64
#: numpy dtype kinds an ``__ndarray__`` may have (bool, ints, floats: what RNG states hold), at most 16 bytes each.
_NDARRAY_KINDS = "biuf"


class MalformedState(ValueError):
    """A training state file whose JSON is not what :func:`write_state` writes."""


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: str = "state", depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise MalformedState(f"{where}: nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, list):
        return [_decode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if len(node) == 1 and next(iter(node)) in _TAGS:
        tag, value = next(iter(node.items()))
        if tag == "__tensor__":
            if not isinstance(value, str) or value not in tensors:
                raise MalformedState(f"{where}: refers to tensor {value!r}, which the file does not hold")
            return tensors[value]
        if tag == "__tuple__" and isinstance(value, list):
            return tuple(_decode(v, tensors, f"{where}[{i}]", depth + 1) for i, v in enumerate(value))
        if (
            tag == "__items__"
            and isinstance(value, list)
            and all(isinstance(kv, list) and len(kv) == 2 for kv in value)
        ):
            items = [
                (_decode(k, tensors, where, depth + 1), _decode(v, tensors, f"{where}[{k!r}]", depth + 1))
                for k, v in value
            ]
            if not all(isinstance(k, (str, int, float, bool, type(None), tuple)) for k, _ in items):
                raise MalformedState(f"{where}: a mapping key that is not a number, string or tuple")
            return dict(items)
        if tag == "__ndarray__":
            return _ndarray(value, where)
        raise MalformedState(f"{where}: a malformed {tag} entry")
    return {k: _decode(v, tensors, f"{where}.{k}", depth + 1) for k, v in node.items()}


def _ndarray(value: Any, where: str) -> np.ndarray:
    """An ``__ndarray__`` entry [dtype, shape, flat data], checked before numpy allocates anything."""
    if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], str) and isinstance(value[2], list)):
        raise MalformedState(f"{where}: a malformed __ndarray__ entry (expected [dtype, shape, data])")
    name, shape, data = value
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError):
        raise MalformedState(f"{where}: unknown array dtype {name!r}") from None
    if dtype.kind not in _NDARRAY_KINDS or dtype.itemsize > 16:
        raise MalformedState(f"{where}: array dtype {name!r} is not a plain number type")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise MalformedState(f"{where}: array shape {shape!r} is not a list of sizes")
    if int(np.prod(shape, dtype=object)) != len(data):
        raise MalformedState(f"{where}: array shape {shape} does not hold its {len(data)} values")
    try:
        return np.array(data, dtype=dtype).reshape(shape)
    except (TypeError, ValueError, OverflowError) as err:
        raise MalformedState(f"{where}: array values do not fit {name}: {err}") from None


def write_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a tree of dicts, lists, tuples, numbers, strings, numpy arrays and tensors without pickle."""
    tensors: dict[str, torch.Tensor] = {}
    tree = json.dumps(_encode(state, tensors, set(), "state"))
    meta = {"format": _FORMAT, "state": tree}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata=meta))


def read_state(path: str | Path) -> dict[str, Any]:
    """Read what :func:`write_state` wrote; any other file is a ValueError (nothing in it is executed)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(
            f"cannot resume: {path} is a directory; give the training state file "
            f"(<output_dir>/{STATE_FILE}) or just --resume"
        )
    if not path.is_file():
        hint = ""
        if (path.parent / LEGACY_STATE_FILE).is_file():
            hint = (
                f"; {path.parent / LEGACY_STATE_FILE} is a pickled state of an earlier version, which is never "
                "loaded since unpickling can run code: restart the run"
            )
        raise ValueError(f"cannot resume: training state {path} not found (written as <output_dir>/{STATE_FILE}){hint}")
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        raise ValueError(
            f"cannot resume from {path}: not a training state written by this package (a "
            f"{_FORMAT} safetensors file); nothing in it was loaded or run ({err})"
        ) from err
    if meta.get("format") != _FORMAT or "state" not in meta:
        raise ValueError(
            f"cannot resume from {path}: a safetensors file but not a training state (format "
            f"{meta.get('format')!r}, expected {_FORMAT!r})"
        )
    try:
        return _decode(json.loads(meta["state"]), tensors)
    except RecursionError:
        raise ValueError(f"cannot resume from {path}: its state is nested too deeply to be a training state") from None
    except (json.JSONDecodeError, MalformedState) as err:
        raise ValueError(f"cannot resume from {path}: a malformed training state ({err})") from None


def save_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: nn.Module | None,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    step_in_epoch: int,
    num_updates: int,
    extra: dict[str, Any] | None = None,
) -> None:
    """Save everything needed to continue training.

    ``epoch`` is the epoch in progress and ``step_in_epoch`` the steps already done in it (0 at an epoch
    boundary, i.e. ``epoch`` has not started).
    """
    state = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,
        "num_updates": num_updates,
        "rng": rng_states(),
        **(extra or {}),
    }
    write_state(path, state)


def load_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: nn.Module | None,
    scaler: torch.amp.GradScaler | None,
    schedule: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Restore the objects in place from ``path`` (or from ``state``, read from it); returns the rest (epoch,
    step_in_epoch, num_updates, rng, ...). The state is checked first (:func:`check_schema`, the model's parameter
    names and shapes, the optimizer's type and groups): nothing is restored from a state that does not fit.

    ``schedule`` holds the settings the LR schedule is built from; where they differ from the saved run's,
    ``scheduler`` is kept as built (rebuilt for the new settings) and the differences are returned under
    'schedule_changes' as {setting: [saved, now]}.
    """
    state = read_state(path) if state is None else state
    check_schema(state, path)
    check_model_state(state["model"], model, path)
    check_optimizer_state(state["optimizer"], optimizer, path)
    saved_schedule = state.pop("schedule", None)
    changes = {
        k: [(saved_schedule or {}).get(k), v]
        for k, v in (schedule or {}).items()
        if saved_schedule is not None and saved_schedule.get(k) != v
    }
    unwrap_model(model).load_state_dict(state.pop("model"))
    optimizer.load_state_dict(state.pop("optimizer"))
    for obj, key in ((scheduler, "scheduler"), (ema, "ema"), (scaler, "scaler")):
        saved = state.pop(key)
        if obj is not None and saved is not None:
            if key != "scheduler" or not changes:
                obj.load_state_dict(saved)
        elif (obj is None) != (saved is None):
            raise ValueError(
                f"cannot resume from {path}: it was written {'with' if saved is not None else 'without'} "
                f"a {key}, but this run is configured {'with' if obj is not None else 'without'} one"
            )
    state["schedule_changes"] = changes
    return state
