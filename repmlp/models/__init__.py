"""The zoo; importing it registers every model with timm."""

from __future__ import annotations

import importlib

from torch import nn

from .mlp_cifar import MLPCifarNet
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
