"""The zoo; importing it registers every model with timm."""

from __future__ import annotations

__all__ = ["MLPCifarNet", "PureMLPNet", "RepMLPNet", "RepMLPResNet", "load_model", "model_input_size"]

import importlib

from torch import nn

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


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) the model is built for: its ``img_size``, else its pretrained config, else 3x224x224."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    chans = int(cfg.get("input_size", (3,))[0])
    size = getattr(model, "img_size", None)
    if size is not None:
        size = (size, size) if isinstance(size, int) else tuple(size)
        return chans, int(size[0]), int(size[1])
    return tuple(cfg.get("input_size", (3, 224, 224)))
