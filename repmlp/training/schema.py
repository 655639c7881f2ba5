"""The schema of a training state (its fields' types and ranges) and its agreement with the run that resumes it:
the one place that decides what a resume may change. Read by :mod:`repmlp.training.state` before anything is
loaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from timm.utils import unwrap_model
from torch import nn

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
