"""Resumable training state: model, optimizer, scheduler, EMA, AMP scaler, position and RNG states,
written atomically (temporary file, then rename) so a run killed mid-write keeps its last good state."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.utils import unwrap_model
from torch import nn

from ..checkpoint import atomic_write

STATE_FILE = "last.pth"


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
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    ema: nn.Module | None,
    scaler: torch.amp.GradScaler | None,
) -> dict[str, Any]:
    """Restore the objects in place from ``path``; returns the rest (epoch, step_in_epoch, num_updates, rng, ...).

    The file is our own training state (it holds optimizer and RNG objects), so it is unpickled in full:
    only resume from files you wrote.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"cannot resume: training state {path} not found (written as <output_dir>/{STATE_FILE})")
    state = torch.load(path, map_location="cpu", weights_only=False)
    unwrap_model(model).load_state_dict(state.pop("model"))
    optimizer.load_state_dict(state.pop("optimizer"))
    for obj, key in ((scheduler, "scheduler"), (ema, "ema"), (scaler, "scaler")):
        saved = state.pop(key)
        if obj is not None and saved is not None:
            obj.load_state_dict(saved)
        elif (obj is None) != (saved is None):
            raise ValueError(
                f"cannot resume from {path}: it was written {'with' if saved is not None else 'without'} "
                f"a {key}, but this run is configured {'with' if obj is not None else 'without'} one"
            )
    return state
