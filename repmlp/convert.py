"""Train form -> deploy form for any module tree that holds re-parameterizable blocks."""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict

import torch
from torch import nn

from .ops import is_batch_norm


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
        inplace: convert ``model`` itself instead of a copy.

    Returns:
        The converted model in eval mode, its parameters new leaf tensors with no autograd history.

    Raises:
        ValueError: a non-finite weight or BatchNorm statistic, or a negative running variance
            (:func:`check_convertible`); nothing is converted then.
    """
    check_convertible(model)
    if inplace:
        _reparameterize_tree(model)
        return model.eval()
    shared = _shareable_tensors(model)
    versions = {id(t): t._version for t in shared if not t.is_inference()}  # inference tensors keep no version
    deploy = _copy_tree(model, {id(t): t for t in shared})
    _reparameterize_tree(deploy)
    if any(t._version != versions[id(t)] for t in shared if id(t) in versions):
        raise RuntimeError(
            "convert_to_deploy: a reparameterize() wrote into a tensor of the train-form model; "
            "it must build new tensors (see repmlp.convert)"
        )
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

    Every ``reparameterize()`` in this package builds new tensors and never writes into existing ones, so the
    copy for conversion needs no tensor data: the big train-form weights (FC3, conv-BN pairs) are read once
    and replaced, and only what survives unchanged is cloned afterwards (the version counters check that nothing
    was written; inference tensors keep none, and rely on the same modules being checked in ordinary tensors).
    Models holding foreign re-parameterizable modules get a plain deep copy.
    """
    if any(not type(m).__module__.startswith(__package__ + ".") for _, m in reparameterizable(model)):
        return []
    return list(itertools.chain(model.parameters(), model.buffers()))


# what deepcopy would call instead of rebuilding __dict__; __setstate__ is called by both (nn.Conv2d defines one)
_COPY_PROTOCOL = ("__deepcopy__", "__copy__", "__reduce_ex__", "__reduce__", "__getstate__", "__new__")


def _copy_tree(model: nn.Module, memo: dict[int, object]) -> nn.Module:
    """``copy.deepcopy(model, memo)``, about 3x faster for trees of modules that keep ``nn.Module``'s copy protocol:
    each module's ``__dict__`` is rebuilt directly, empty containers and plain values without deepcopy's dispatch
    (its per-object overhead was a tenth of a conversion). Other trees get ``copy.deepcopy``."""
    if any(
        getattr(type(m), n, None) is not getattr(nn.Module, n, None) for m in model.modules() for n in _COPY_PROTOCOL
    ):
        return copy.deepcopy(model, memo)
    return _copy_module(model, memo)


_PLAIN = (bool, int, float, str, type(None))


def _copy_module(module: nn.Module, memo: dict[int, object]) -> nn.Module:
    if id(module) in memo:  # a module that appears twice in the tree stays one module
        return memo[id(module)]
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key == "_modules":
            state[key] = {k: None if m is None else _copy_module(m, memo) for k, m in value.items()}
        elif key in ("_parameters", "_buffers") and type(value) is dict:  # shared tensors are in memo
            state[key] = {k: memo[id(t)] if id(t) in memo else copy.deepcopy(t, memo) for k, t in value.items()}
        elif type(value) in (dict, OrderedDict, set) and not value:
            state[key] = type(value)()
        elif type(value) in _PLAIN or (type(value) is tuple and all(type(v) in _PLAIN for v in value)):
            state[key] = value  # immutable
        else:  # hooks, lists, configs
            state[key] = copy.deepcopy(value, memo)
    new.__setstate__(state)
    return new


def _unshare(model: nn.Module, shared: set[int]) -> None:
    """Replace the tensors of ``model`` whose ids are in ``shared`` by copies (tied tensors stay tied)."""
    clones: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is not None and id(tensor) in shared:
                    if id(tensor) not in clones:
                        clones[id(tensor)] = copy.deepcopy(tensor)
                    store[name] = clones[id(tensor)]


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
