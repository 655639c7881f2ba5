"""Train form -> deploy form for any module tree that holds re-parameterizable blocks."""
from __future__ import annotations

import copy

import torch
from torch import nn


def reparameterizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules (name, module) that define ``reparameterize()``, outermost first."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "reparameterize", None))]


@torch.no_grad()
def convert_to_deploy(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Convert every re-parameterizable block of ``model`` into its deploy form.

    Works on any module tree (a zoo model, a user's detector holding our blocks). BatchNorms are folded
    from their running statistics, so a model in train mode converts as in eval mode.

    Args:
        model: the train-form model; left untouched unless ``inplace``.
        inplace: convert ``model`` itself instead of a deep copy.

    Returns:
        The converted model in eval mode, its parameters new leaf tensors with no autograd history.
    """
    model = model if inplace else copy.deepcopy(model)
    _reparameterize_tree(model)
    return model.eval()


def _reparameterize_tree(module: nn.Module) -> None:
    # Outermost first: a block composes its children's identities and deletes the training-only ones,
    # so only what remains afterwards is visited.
    if callable(getattr(module, "reparameterize", None)):
        module.reparameterize()
    for child in module.children():
        _reparameterize_tree(child)


def is_deploy_form(model: nn.Module) -> bool:
    """True when no training-only module is left: no BatchNorm and nothing left to re-parameterize."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    return all(getattr(m, "deploy", True) for _, m in reparameterizable(model))
