"""The zoo; importing it registers every model with timm."""

from __future__ import annotations

__all__ = ["MLPCifarNet", "PureMLPNet", "RepMLPNet", "RepMLPResNet", "load_model", "model_input_size"]

import importlib
from pathlib import Path

from torch import nn

from ..locations import read_json
from ..preprocess import model_input_size  # where it lives: what a model's files record of its input
from .mlp_cifar import MLPCifarNet, PureMLPNet
from .repmlp_resnet import RepMLPResNet
from .repmlpnet import RepMLPNet


def load_model(spec: str, **kwargs) -> nn.Module:
    """A timm model name (``hf-hub:`` and ``local-dir:`` sources too), or ``package.module:factory`` (any
    importable callable returning a module): the caller's own spec, never one read from a file
    (:func:`repmlp.records.model_name` judges those)."""
    if spec.startswith("local-dir:"):  # timm reads its config.json: a regular file of sane size only
        read_json(Path(spec.partition(":")[2]) / "config.json")
    if ":" in spec and not spec.startswith(("hf-hub:", "local-dir:")):
        module_name, factory = spec.split(":", 1)
        return getattr(importlib.import_module(module_name), factory)(**kwargs)
    import timm

    return timm.create_model(spec, **kwargs)
