"""Weights on disk: safetensors with metadata, foreign checkpoints, strict loading with clear errors."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import safetensors
import safetensors.torch
import torch
from torch import nn

from .convert import convert_to_deploy, is_deploy_form

_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    A run killed midway leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


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
        metadata: further string metadata.
    """
    if model_name is None:
        model_name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    form = form or ("deploy" if is_deploy_form(model) else "train")
    if form not in ("train", "deploy"):
        raise ValueError(f"form must be 'train' or 'deploy', got {form!r}")
    if Path(path).suffix != ".safetensors":  # load_checkpoint tells the formats apart by the suffix
        raise ValueError(f"save_checkpoint writes safetensors: name the file *.safetensors, not {path}")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    meta = {"model": model_name, "form": form, "format": "pt", **(metadata or {})}
    atomic_write(path, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Metadata of a safetensors file ({} for other formats)."""
    if not str(path).endswith(".safetensors"):
        return {}
    with safetensors.safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a torch file (``weights_only=True``).

    Unwraps {'model': ...} / {'state_dict': ...} checkpoints and strips a DistributedDataParallel
    'module.' prefix.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupted, truncated or not a checkpoint (the message names it).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"weights path {path} is a directory; give the weights file (.safetensors or .pth)")
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            state = safetensors.torch.load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - whatever a parser raises (a text file: KeyError) means a bad file
        raise ValueError(f"cannot read weights file {path}: corrupted, truncated or not a checkpoint "
                         f"({type(err).__name__}: {err})") from err
    if isinstance(state, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def state_dict_form(state: dict[str, torch.Tensor]) -> str:
    """'train' when the state dict holds BatchNorm statistics of a re-parameterizable branch, else 'deploy'."""
    return "train" if any(k.endswith("running_var") for k in state) else "deploy"


def _strict_load(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        def show(keys):
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
        raise ValueError(f"{source} does not match the model: missing keys [{show(missing)}], "
                         f"unexpected keys [{show(unexpected)}], shape mismatches [{show(shapes)}]")
    model.load_state_dict(state, strict=True)


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    filter_fn: Callable[[dict, nn.Module], dict] | None = None,
    train_model_factory: Callable[[], nn.Module] | None = None,
) -> nn.Module:
    """Load weights strictly into ``model`` (train or deploy form), in place; returns ``model``.

    A train-form checkpoint offered to a deploy-form model is loaded into a train-form twin (built by
    ``train_model_factory``, or by timm from the model's ``pretrained_cfg``) and converted. A deploy-form
    checkpoint offered to a train-form model cannot be undone into branches and raises a ValueError
    saying so.

    Args:
        model: destination.
        path: ``.safetensors``, ``.pth`` or ``.pt`` file (ours or the authors').
        filter_fn: maps foreign key layouts to ours (default: ``model``'s ``checkpoint_filter_fn``).
        train_model_factory: builds the train-form twin for the conversion case.
    """
    state = read_state_dict(path)
    filter_fn = filter_fn or getattr(model, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    file_form = read_metadata(path).get("form") or state_dict_form(state)
    model_form = "deploy" if is_deploy_form(model) else "train"
    if file_form == "deploy" and model_form == "train":
        raise ValueError(f"{path} holds a deploy-form (re-parameterized) checkpoint; its conv and BN branches "
                         "cannot be recovered, so it loads only into a deploy-form model: build it with "
                         "deploy=True (e.g. timm.create_model(name, deploy=True)).")
    if file_form == "train" and model_form == "deploy":
        twin = train_model_factory() if train_model_factory else _train_twin(model, path)
        _strict_load(twin, state, f"{path} (train form)")
        state = convert_to_deploy(twin, inplace=True).state_dict()
    _strict_load(model, state, str(path))
    return model


def route_pretrained_file(variant: str, pretrained: bool, kwargs: dict) -> None:
    """Send ``pretrained=True`` loads through the model's ``load_pretrained`` (our :func:`load_checkpoint`).

    timm resets ``custom_load`` when ``pretrained_cfg_overlay`` names a file, so it is set again here; and
    a model with no weights file configured is refused (timm would silently keep the random init).
    """
    if not pretrained:
        return
    import timm

    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    if not {**timm.models.get_pretrained_cfg(variant).to_dict(), **overlay}.get("file"):
        raise ValueError(f"{variant}: no weights are shipped for this model; pass a file with "
                         f"pretrained_cfg_overlay=dict(file=PATH) (ours or the authors' .pth/.safetensors)")
    overlay.setdefault("custom_load", True)
    kwargs["pretrained_cfg_overlay"] = overlay


def _train_twin(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    import timm

    name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not name:
        raise ValueError(f"{path} holds a train-form checkpoint but the model is in deploy form and not a timm "
                         "model; load it into the train form and call repmlp.convert_to_deploy")
    return timm.create_model(name, num_classes=getattr(model, "num_classes", 1000), deploy=False)
