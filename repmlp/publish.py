"""Writing weights: a safetensors file that records how its model is rebuilt, what a converted deploy-form file
records, and a shipped model folder (read back by :mod:`repmlp.weights_file`, judged by :mod:`repmlp.records`)."""

from __future__ import annotations

__all__ = ["deploy_record", "save_checkpoint", "write_folder"]

import json
import os
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import nn

from .convert import is_deploy_form
from .guards import atomic_write
from .preprocess import input_metadata
from .shipped import WEIGHTS_NAME, sha256

_SOURCE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename", "source", "state_dict", "architecture")


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
    meta = {k: v.encode("utf-8", "backslashreplace").decode() for k, v in meta.items()}  # e.g. a non-UTF-8 file name
    atomic_write(path, lambda tmp: safetensors.torch.save_file(state, tmp, metadata=meta))


def _constructor_metadata(model: nn.Module) -> dict[str, str]:
    """num_classes and constructor arguments of a zoo model, so that the file alone rebuilds it."""
    args = dict(getattr(model, "init_args", None) or {})
    if not args:
        return {}
    kwargs = {k: v for k, v in args.items() if k not in ("deploy", "num_classes")}
    return {"num_classes": str(args.get("num_classes", 0)), "model_kwargs": json.dumps(kwargs)}


def deploy_record(source: Any, model: nn.Module, model_kwargs: dict | None = None) -> dict[str, str]:
    """What a deploy-form file converted from ``source`` (a :class:`repmlp.sources.ModelSource`) records so that
    tools can rebuild it alone: the train-form file's dataset and config, the constructor arguments used
    (``model_kwargs`` over the recorded ones; the form and class count are recorded apart), the number of classes
    and where the weights came from."""
    record = {k: v for k, v in source.record.items() if k in ("dataset", "config")}
    kwargs = {**json.loads(source.record.get("model_kwargs", "{}")), **(model_kwargs or {})}
    for key in ("num_classes", "deploy"):
        kwargs.pop(key, None)
    record.update(model_kwargs=json.dumps(kwargs), source=source.weights)
    if isinstance(getattr(model, "num_classes", None), int):
        record["num_classes"] = str(model.num_classes)
    return record


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
