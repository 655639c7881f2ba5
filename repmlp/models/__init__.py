"""The zoo; importing it registers every model with timm."""

from __future__ import annotations

__all__ = ["MLPCifarNet", "PureMLPNet", "RepMLPNet", "RepMLPResNet", "load_model", "model_input_size"]

import importlib

from torch import nn

from ..preprocess import model_input_size  # where it lives: what a model's files record of its input
from .mlp_cifar import MLPCifarNet, PureMLPNet
from .repmlp_resnet import RepMLPResNet
from .repmlpnet import RepMLPNet


def load_model(spec: str, **kwargs) -> nn.Module:
    """A timm model name, or ``package.module:factory`` (any importable callable returning a module)."""
    if ":" in spec:
        module_name, factory = spec.split(":", 1)
        return getattr(importlib.import_module(module_name), factory)(**kwargs)
    import timm

    return timm.create_model(spec, **kwargs)
