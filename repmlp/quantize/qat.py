"""Quantization-aware training of RepMLP models: QAT on the equivalent FC3 of the train form, and the authors'
alternative, a BN after FC3 of the deploy form for post-quantization fine-tuning. Both simulate the scheme of
:mod:`repmlp.quantize.scheme`.
"""

from __future__ import annotations

__all__ = [
    "QAT_MODES",
    "FakeQuantFC3",
    "enable_fc3_qat",
    "equivalent_fc3",
    "fc3_blocks",
    "finish_qat",
    "fold_fc3_bn",
    "insert_fc3_bn",
    "prepare_qat",
    "remove_fake_quant",
]

import copy
import types
from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call

from .. import ops
from .scheme import fake_quantize_activation, fake_quantize_weight, weight_qmax

QAT_MODES = ("none", "equivalent_fc3", "fc3_bn")


# ----------------------------------------------------------------------------------------- equivalent FC3


def fc3_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every block with an equivalent FC3 in ``model`` (RepMLP v1 blocks and RepMLPNet blocks:
    each has ``equivalent_fc3()`` and names its FC3's perceptron in ``fc3_perceptron``)."""
    return [(name, m) for name, m in model.named_modules() if callable(getattr(m, "equivalent_fc3", None))]


def equivalent_fc3(block: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """FC3 weight and bias of ``block``'s deploy form as a differentiable float64 function of its current form
    (the block's own ``equivalent_fc3()``); for a deploy-form block they are its FC3 parameters."""
    if not callable(getattr(block, "equivalent_fc3", None)):
        raise TypeError(f"expected a block with an equivalent FC3 (RepMLP, RepMLPBlock), got {type(block).__name__}")
    return block.equivalent_fc3()


class FakeQuantFC3(nn.Module):
    """An FC3 layer (``GroupedLinear`` or ``SharedFC``) run with fake-quantized weight and input.

    Holds the layer's own ``weight`` and ``bias`` Parameters (state-dict keys unchanged) and runs the layer's
    forward on their fake-quantized values; :func:`remove_fake_quant` puts the plain layer back.
    """

    def __init__(self, fc3: nn.Module, qmax: int = 64) -> None:
        super().__init__()
        self.weight, self.bias = fc3.weight, fc3.bias
        self.qmax = qmax
        object.__setattr__(self, "layer", fc3)  # not a submodule: its parameters are ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = {"weight": fake_quantize_weight(self.weight, self.qmax)}
        if self.bias is not None:
            params["bias"] = self.bias
        return functional_call(self.layer, params, (fake_quantize_activation(x),))

    def extra_repr(self) -> str:
        return f"{self.layer!r}, weight levels -{self.qmax}..{self.qmax}"


def remove_fake_quant(model: nn.Module) -> int:
    """Undo :func:`enable_fc3_qat` and :func:`insert_fc3_bn`'s fake quantization in place; returns how many layers."""
    count = 0
    for block in [m for m in model.modules() if "_fc3_qat" in m.__dict__]:
        del block.__dict__["forward"], block.__dict__["_fc3_qat"]
        count += 1
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, FakeQuantFC3):
                setattr(module, name, child.layer)
                count += 1
    return count


# ------------------------------------------------------------------------ QAT on the equivalent FC3 (train form)


def _equivalent_fc3_forward(block: nn.Module, *args, **kwargs) -> torch.Tensor:
    """``block``'s forward as its deploy form with the equivalent FC3, fake-quantized (see :func:`enable_fc3_qat`)."""
    shadow, name = block.__dict__["_fc3_qat"]
    weight, bias = equivalent_fc3(block)
    dtype = getattr(block, name).fc3.weight.dtype
    params = {f"{name}.fc3.weight": weight.to(dtype), f"{name}.fc3.bias": bias.to(dtype)}
    return functional_call(shadow, params, args, kwargs)


@torch.no_grad()
def _deploy_shadow(block: nn.Module, name: str, qmax: int) -> nn.Module:
    """A view of ``block`` in deploy form: its own modules, FC3 a fake-quantized deploy-form skeleton on the meta
    device (its weights are supplied at each call), no local perceptron."""
    skeleton = copy.deepcopy(getattr(block, name)).to("meta")
    skeleton.load_fused(*skeleton.fused())
    skeleton.fc3 = FakeQuantFC3(skeleton.fc3, qmax)
    shadow = object.__new__(type(block))
    shadow.__dict__.update({k: v for k, v in block.__dict__.items() if k not in ("forward", "_fc3_qat")})
    shadow.__dict__["_modules"] = {**block._modules, name: skeleton, "local_perceptron": None}
    return shadow


def enable_fc3_qat(model: nn.Module, reduce_range: bool | None = None) -> int:
    """Train the train form through fake-quantized equivalent FC3s (the authors' QAT advice), in place.

    Every train-form block then computes its deploy form: the equivalent FC3 (:func:`equivalent_fc3`, from the
    BNs' running statistics, which stay frozen) fake-quantized per output channel, its input per tensor, so the
    converted model meets int8 with the weights QAT trained for. Gradients reach every branch; state-dict keys do
    not change. :func:`remove_fake_quant` restores the plain train form. Returns the number of blocks.
    """
    count = 0
    for _, block in fc3_blocks(model):
        name = block.fc3_perceptron
        if getattr(block, name).bn is None or "_fc3_qat" in block.__dict__:
            continue  # deploy form (nothing to merge) or already enabled
        block.__dict__["_fc3_qat"] = (_deploy_shadow(block, name, weight_qmax(reduce_range)), name)
        block.forward = types.MethodType(_equivalent_fc3_forward, block)
        count += 1
    return count


# ------------------------------------------------------------- the authors' alternative: a BN after a deploy FC3


@torch.no_grad()
def insert_fc3_bn(model: nn.Module, batches: Iterable[torch.Tensor], reduce_range: bool | None = None) -> int:
    """Give every deploy-form FC3 a BatchNorm after it and fake-quantize FC3, for post-quantization fine-tuning.

    The authors' recommended route ("insert a BN after fc3 and finetune to recover the accuracy"). Each BN starts
    from the statistics of its FC3's outputs on ``batches`` with ``gamma = sqrt(var + eps)`` and ``beta = mean``,
    so the model computes the same function in eval mode and nearly so with batch statistics. Fold the BNs back
    with :func:`fold_fc3_bn`, which also removes the fake quantization (``convert_to_deploy`` knows neither, and a
    RepMLPNet block's conversion assumes a train-form FC3 without bias). Returns the number of BNs inserted.
    """
    perceptrons = []
    for _, block in fc3_blocks(model):
        perceptron = getattr(block, block.fc3_perceptron)
        if perceptron.bn is None and block.local_perceptron is None:
            fc3 = perceptron.fc3
            bn = nn.BatchNorm1d(fc3.weight.shape[0], momentum=None).to(fc3.weight)  # momentum None: a plain average
            perceptrons.append((perceptron, bn))

    def observe(bn: nn.BatchNorm1d, y: torch.Tensor) -> None:  # the perceptron's BN view: (N, C) or (N, S, h*w)
        bn(y if y.dim() == 2 else y.reshape(-1, *y.shape[-2:]))

    hooks = [p.fc3.register_forward_hook(lambda _m, _i, y, bn=bn: observe(bn, y)) for p, bn in perceptrons]
    modes = {m: m.training for m in model.modules()}
    model.eval()
    for _, bn in perceptrons:
        bn.train()
    try:
        for x in batches:
            model(x.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.train(mode)
    for perceptron, bn in perceptrons:
        bn.weight.copy_(torch.sqrt(bn.running_var + bn.eps)), bn.bias.copy_(bn.running_mean)
        bn.momentum = 0.1
        perceptron.bn = bn.train(perceptron.training)
        perceptron.fc3 = FakeQuantFC3(perceptron.fc3, weight_qmax(reduce_range))
    return len(perceptrons)


@torch.no_grad()
def fold_fc3_bn(model: nn.Module) -> int:
    """Fold the BNs of :func:`insert_fc3_bn` back into their FC3s (running statistics) and drop the fake
    quantization: the model is a deploy form again. Returns the number of BNs folded."""
    remove_fake_quant(model)
    count = 0
    for _, block in fc3_blocks(model):
        perceptron = getattr(block, block.fc3_perceptron)
        fc3 = perceptron.fc3
        if perceptron.bn is None or fc3.bias is None:
            continue  # not inserted by insert_fc3_bn (a train-form FC3 has no bias)
        rows = fc3.weight.numel() // fc3.weight.shape[-1]  # BN channel c scales rows [c * per, (c + 1) * per)
        scale, shift = (t.repeat_interleave(rows // perceptron.bn.num_features) for t in ops.bn_affine(perceptron.bn))
        weight, bias = ops.fuse_bn(fc3.weight.reshape(rows, -1), fc3.bias.reshape(rows), scale, shift)
        perceptron.load_fused(weight.reshape(fc3.weight.shape), bias.reshape(fc3.bias.shape))
        count += 1
    return count


def prepare_qat(
    model: nn.Module, mode: str, batches: Iterable[torch.Tensor] = (), reduce_range: bool | None = None
) -> int:
    """Set up a QAT mode in place: 'equivalent_fc3' (a train form, :func:`enable_fc3_qat`) or 'fc3_bn' (a deploy
    form, :func:`insert_fc3_bn` initialised on ``batches``); 'none' does nothing. Returns the layers prepared."""
    if mode not in QAT_MODES:
        raise ValueError(f"QAT mode must be one of {QAT_MODES}, got {mode!r}")
    if mode == "none":
        return 0
    count = (
        enable_fc3_qat(model, reduce_range) if mode == "equivalent_fc3" else insert_fc3_bn(model, batches, reduce_range)
    )
    if not count:
        form = "train" if mode == "equivalent_fc3" else "deploy"
        raise ValueError(f"QAT mode {mode!r} needs a {form}-form model with RepMLP blocks; none found to prepare")
    return count


def finish_qat(model: nn.Module) -> nn.Module:
    """The plain float model after QAT, in place: fake quantization removed, inserted FC3 BNs folded."""
    fold_fc3_bn(model)
    return model
