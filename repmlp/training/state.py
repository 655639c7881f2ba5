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


# -- the schema of a training state, and its agreement with the run that resumes it --------------------------------

#: Settings a resumed run must share with the state's (a different model, class count or optimizer cannot take it).
FIXED_SETTINGS = ("model.name", "model.kwargs", "optimizer.opt", "qat.mode")
#: Settings whose change needs nothing stated beyond the schedule note (they are the schedule) or no note at all.
_UNNOTED = ("train.epochs", "optimizer.lr", "scheduler.", "train.output_dir")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_schema(state: dict[str, Any], path: str | Path) -> None:
    """Raise ValueError naming the field unless ``state`` has the training state's types and ranges."""

    def bad(field: str, expected: str) -> ValueError:
        got = state.get(field)
        shown = type(got).__name__ if isinstance(got, (dict, list, tuple, torch.Tensor)) else repr(got)
        return ValueError(f"cannot resume from {path}: its {field} must be {expected}, got {shown}")

    if not isinstance(state, dict):
        raise ValueError(f"cannot resume from {path}: not a training state (a {type(state).__name__})")
    model = state.get("model")
    if not (isinstance(model, dict) and model and all(isinstance(v, torch.Tensor) for v in model.values())):
        raise bad("model", "a mapping of parameter names to tensors")
    optimizer = state.get("optimizer")
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("param_groups"), list)):
        raise bad("optimizer", "an optimizer state (with param_groups)")
    for key in ("scheduler", "ema", "scaler"):
        if key not in state or not (state[key] is None or isinstance(state[key], dict)):
            raise bad(key, "null or a mapping")
    for key in ("epoch", "step_in_epoch", "num_updates"):
        if not (_is_int(state.get(key)) and state[key] >= 0):
            raise bad(key, "an integer >= 0")
    rng = state.get("rng")
    if not (isinstance(rng, dict) or (isinstance(rng, list) and rng and all(isinstance(r, dict) for r in rng))):
        raise bad("rng", "the RNG states (a mapping, or one per process)")
    if "elapsed" in state and not (isinstance(state["elapsed"], (int, float)) and state["elapsed"] >= 0):
        raise bad("elapsed", "a number of seconds >= 0")
    for key in ("config", "schedule"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise bad(key, "a mapping")
    if "num_classes" in state and not (_is_int(state["num_classes"]) and state["num_classes"] >= 1):
        raise bad("num_classes", "an integer >= 1")


def _flat(cfg: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(
    state: dict[str, Any],
    path: str | Path,
    cfg: dict,
    num_classes: int,
    num_epochs: int,
    epoch_steps: int,
    world_size: int,
) -> dict[str, list]:
    """Check that a run configured by ``cfg`` can continue ``state`` (after :func:`check_schema`); returns the
    settings it changes that resuming allows, {setting: [saved, now]}, for the run to state and record.

    Refused, naming the setting and both values: another model, model arguments, optimizer type or QAT mode
    (:data:`FIXED_SETTINGS`), another class count, an epoch or step outside this run's schedule, and another number
    of processes in the middle of an epoch (its position counts per-process batches). Allowed: more epochs and other
    schedule settings (the schedule is rebuilt), another number of processes at an epoch boundary, other settings.
    """
    saved = _flat(state.get("config") or {})
    now = _flat(cfg)
    for key in FIXED_SETTINGS:
        if key in saved and saved[key] != now.get(key):
            raise ValueError(
                f"cannot resume from {path}: {key} is {saved[key]!r} in the training state but {now.get(key)!r} in "
                f"this run; resume with {key}={saved[key]!r}, or start a new run"
            )
    if "num_classes" in state and state["num_classes"] != num_classes:
        raise ValueError(
            f"cannot resume from {path}: the training state has {state['num_classes']} classes but this run's data "
            f"has {num_classes}; resume on the same dataset, or start a new run"
        )
    epoch, step = state["epoch"], state["step_in_epoch"]
    if epoch > num_epochs:
        raise ValueError(
            f"cannot resume from {path}: it has done {epoch} epochs but this run is "
            f"configured for {num_epochs}; set train.epochs to at least {epoch}"
        )
    saved_world = state.get("world_size", len(state["rng"]) if isinstance(state["rng"], list) else 1)
    if step and saved_world != world_size:
        raise ValueError(
            f"cannot resume from {path}: it stopped at step {step} of epoch {epoch} of a {saved_world}-process run, "
            f"and a position inside an epoch counts per-process batches; resume with {saved_world} process(es), or "
            "from a state saved at an epoch boundary"
        )
    if step and not (epoch < num_epochs and step < epoch_steps):
        raise ValueError(
            f"cannot resume from {path}: its step_in_epoch {step} is outside epoch {epoch} of this run "
            f"({epoch_steps} steps per epoch, {num_epochs} epochs)"
        )
    changes = {
        key: [saved.get(key), value]
        for key, value in now.items()
        if saved and saved.get(key) != value and not key.startswith(_UNNOTED)
    }
    if saved_world != world_size:
        changes["processes"] = [saved_world, world_size]
    return changes


def check_model_state(saved: dict[str, torch.Tensor], model: nn.Module, path: str | Path) -> None:
    """Raise ValueError naming the first differing parameter (and both shapes) unless ``saved`` fits ``model``, or
    naming a tensor that holds NaN or infinite values (training on from them cannot give a model)."""
    expected = unwrap_model(model).state_dict()
    missing, unexpected = sorted(set(expected) - set(saved)), sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"cannot resume from {path}: the training state is of another model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}); resume with the model.name and model.kwargs it was trained with"
        )
    for key, tensor in expected.items():
        if tuple(saved[key].shape) != tuple(tensor.shape):
            raise ValueError(
                f"cannot resume from {path}: {key} has shape {tuple(saved[key].shape)} in the training state but "
                f"{tuple(tensor.shape)} in this run's model (other model arguments or class count)"
            )
        if saved[key].is_floating_point() and not bool(torch.isfinite(saved[key]).all()):
            raise ValueError(
                f"cannot resume from {path}: {key} holds NaN or infinite values (the run diverged, or the file is "
                "damaged); resume from an earlier state or start afresh"
            )


def check_optimizer_state(saved: dict[str, Any], optimizer: torch.optim.Optimizer, path: str | Path) -> None:
    """Raise ValueError unless ``saved`` is a state of an optimizer of ``optimizer``'s type and parameter groups."""
    now = optimizer.state_dict()["param_groups"]
    groups = saved["param_groups"]
    if len(groups) != len(now) or any(
        not isinstance(g, dict) or len(g.get("params", ())) != len(n["params"]) for g, n in zip(groups, now)
    ):
        raise ValueError(
            f"cannot resume from {path}: its optimizer has parameter groups of sizes "
            f"{[len(g.get('params', ())) if isinstance(g, dict) else None for g in groups]} but this run's has "
            f"{[len(n['params']) for n in now]} (another model or optimizer.filter_bias_and_bn)"
        )
    missing = sorted(set(optimizer.defaults) - set(groups[0]))  # schedulers add settings; an optimizer's own stay
    if missing:
        raise ValueError(
            f"cannot resume from {path}: its optimizer has no {missing}, settings this run's "
            f"{type(optimizer).__name__} has (the state is of another optimizer.opt)"
        )
