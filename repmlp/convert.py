"""Train form -> deploy form for any module tree that holds re-parameterizable blocks."""

from __future__ import annotations

__all__ = ["convert_to_deploy", "is_deploy_form", "reparameterizable"]

import copy
import itertools

import torch
from torch import nn

from .ops import is_batch_norm


def reparameterizable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules (name, module) that define ``reparameterize()``, outermost first."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "reparameterize", None))]


@torch.no_grad()
def convert_to_deploy(model: nn.Module, inplace: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
    """Convert every re-parameterizable block of ``model`` into its deploy form.

    Works on any module tree (a zoo model, a user's detector holding our blocks). BatchNorms are folded
    from their running statistics, so a model in train mode converts as in eval mode.

    Args:
        model: the train-form model; left untouched unless ``inplace``.
        inplace: convert ``model`` itself instead of a copy.
        dtype: the deploy form's dtype (e.g. ``torch.bfloat16``) when it is not the model's: a float64 copy is
            converted and cast once, so the deploy form's only rounding is the cast. Not with ``inplace``.

    Returns:
        The converted model in eval mode, its parameters new leaf tensors with no autograd history.

    Raises:
        ValueError: a non-finite weight or BatchNorm statistic, or a negative running variance
            (:func:`check_convertible`); nothing is converted then.
    """
    check_convertible(model)
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        if inplace:
            raise ValueError("convert_to_deploy: dtype casts a float64 copy; it cannot convert in place")
        return convert_to_deploy(copy.deepcopy(model).to(torch.float64), inplace=True).to(dtype)
    if inplace:
        _reparameterize_tree(model)
        return model.eval()
    shared = _shareable_tensors(model)
    deploy = copy.deepcopy(model, memo={id(t): t for t in shared})
    _reparameterize_tree(deploy)
    _unshare(deploy, {id(t) for t in shared})
    return deploy.eval()


@torch.no_grad()
def check_convertible(model: nn.Module) -> None:
    """Raise ValueError, naming the tensor, for weights a conversion would fold into garbage: a NaN or infinite
    parameter or BatchNorm statistic, or a running variance below 0 (not a variance; ``rsqrt(var + eps)`` of it
    is NaN or huge)."""
    tensors = []  # (where, tensor, module, kind)
    for name, module in model.named_modules():
        own = [(n, t, "parameter") for n, t in module.named_parameters(recurse=False)]
        if is_batch_norm(module):
            own += [(n, getattr(module, n), "statistic") for n in ("running_mean", "running_var")]
        for key, t, kind in own:
            if t is not None and t.is_floating_point() and not t.is_meta and t.numel():
                tensors.append((f"{name}.{key}" if name else key, t, module, kind))
    if not tensors:
        return
    # One pass and one host sync for the whole model: a float64 sum is finite exactly when every value is (float64
    # sums of float64 values could overflow: those are then looked at value by value).
    device = tensors[0][1].device
    sums = torch.stack([t.sum(dtype=torch.float64).to(device) for _, t, _, _ in tensors])
    variances = [(where, t, m) for where, t, m, _ in tensors if where.endswith("running_var")]
    lowest = torch.stack([t.min().double().to(device) for _, t, _ in variances]) if variances else sums[:1] * 0
    if bool(torch.isfinite(sums).all()) and not bool((lowest < 0).any()):
        return
    for where, t, module, kind in tensors:
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(
                f"cannot convert: {where} ({type(module).__name__} {kind}) has {bad} of {t.numel()} values NaN or "
                "infinite; the weights are corrupt (a diverged training or a damaged file), converting them would "
                "give a model that outputs NaN"
            )
    for where, t, module in variances:
        if bool((t < 0).any()):
            raise ValueError(
                f"cannot convert: {where} ({type(module).__name__}) has {int((t < 0).sum())} negative values "
                f"(min {t.min().item():.3g}); a running variance is >= 0, so these statistics are corrupt"
            )


def _shareable_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters and buffers the copy may share with ``model`` while it is converted.

    Every ``reparameterize()`` in this package builds new tensors and never writes into existing ones (a test holds
    every design to it), so the copy for conversion needs no tensor data: the big train-form weights (FC3, conv-BN
    pairs) are read once and replaced, and only what survives unchanged is cloned afterwards. Models holding foreign
    re-parameterizable modules get a plain deep copy.
    """
    if any(not type(m).__module__.startswith(__package__ + ".") for _, m in reparameterizable(model)):
        return []
    return list(itertools.chain(model.parameters(), model.buffers()))


def _unshare(model: nn.Module, shared: set[int]) -> None:
    """Replace the tensors of ``model`` whose ids are in ``shared`` by copies (tied tensors stay tied)."""
    clones: dict[int, torch.Tensor] = {}
    for module in model.modules():
        tensors = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
        for name, tensor in list(tensors):
            if id(tensor) in shared:
                if id(tensor) not in clones:
                    clones[id(tensor)] = copy.deepcopy(tensor)
                setattr(module, name, clones[id(tensor)])


def _reparameterize_tree(module: nn.Module) -> None:
    # Outermost first: a block composes its children's identities and deletes the training-only ones,
    # so only what remains afterwards is visited.
    if callable(getattr(module, "reparameterize", None)):
        module.reparameterize()
    for child in module.children():
        _reparameterize_tree(child)


def is_deploy_form(model: nn.Module) -> bool:
    """True when no training-only module is left: no BatchNorm (frozen ones included), and every
    re-parameterizable module reports ``deploy`` (a module that cannot say is not taken as converted)."""
    if any(is_batch_norm(m) for m in model.modules()):
        return False
    return all(getattr(m, "deploy", False) for _, m in reparameterizable(model))
