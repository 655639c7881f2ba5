"""Emulations of the authors' inference code (DingXiaoH/RepMLP), to race against.

They run our weights op for op the way the authors' inference code runs them (6-D partition permutes, FC3 as a
grouped 1x1 conv over C*h*w channels), and convert the way their conversion does (:func:`authors_convert`). They
compute the same function as our deploy forms; their code itself is not used.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from repmlp.convert import is_deploy_form
from repmlp.layers import ConvBN, RepMLP
from repmlp.models.repmlpnet import RepMLPBlock


class AuthorsRepMLP(nn.Module):
    """The authors' deploy-form RepMLP v1 block, run on one of our deploy-form blocks (weights shared).

    As their inference code runs it: the global perceptron added through a 6-D view, partitions by a 6-D
    permute, FC3 as a grouped 1x1 Conv2d over C*h*w channels, a 6-D permute back.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        if not block.deploy:
            raise ValueError("AuthorsRepMLP emulates the deploy form: convert the block first")
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        n, c = x.shape[:2]
        parts = x.reshape(n, c, b.hp, b.h, b.wp, b.w)
        if b.global_perceptron is not None:
            gp = b.global_perceptron
            v = gp.fc2(F.relu(gp.fc1(F.avg_pool2d(x, (b.h, b.w)).reshape(n, -1))))
            parts = parts + v.reshape(n, c, b.hp, 1, b.wp, 1)
        parts = parts.permute(0, 2, 4, 1, 3, 5).reshape(-1, c * b.h * b.w, 1, 1)
        fc3 = b.partition_perceptron.fc3
        y = F.conv2d(parts, fc3.weight[..., None, None], fc3.bias, groups=fc3.groups)
        y = y.reshape(n, b.hp, b.wp, b.out_chs, b.h, b.w).permute(0, 3, 1, 4, 2, 5)
        return y.reshape(n, b.out_chs, b.H, b.W)


class AuthorsRepMLPNetBlock(nn.Module):
    """The authors' locality-injected RepMLPNet block, op for op: FC3 as a grouped 1x1 conv over S*h*w channels."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        block = copy.deepcopy(block)
        block.reparameterize()
        s, h, w = block.sharesets, block.h, block.w
        self.sharesets, self.h, self.w, self.global_perceptron = s, h, w, block.global_perceptron
        self.fc3 = nn.Conv2d(s * h * w, s * h * w, 1, groups=s)
        weight, bias = block.channel_perceptron.fc3.weight, block.channel_perceptron.fc3.bias
        self.fc3.weight = nn.Parameter(weight.detach().reshape(-1, h * w, 1, 1).clone())
        self.fc3.bias = nn.Parameter(bias.detach().reshape(-1).clone())

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        n, c, H, W = x.shape
        s, h, w = self.sharesets, self.h, self.w
        hp, wp = H // h, W // w
        scale = self.global_perceptron(x)
        p = x.reshape(-1, c, hp, h, wp, w).permute(0, 2, 4, 1, 3, 5)
        y = self.fc3(p.reshape(-1, s * h * w, 1, 1))
        y = y.reshape(-1, hp, wp, s, h, w).permute(0, 3, 1, 4, 2, 5).reshape(n, c, H, W)
        return y * scale if residual is None else residual + y * scale


def _share_tensors_copy(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree that shares every parameter and buffer with ``model``."""
    return copy.deepcopy(model, memo={id(t): t for t in itertools.chain(model.parameters(), model.buffers())})


def _replace_modules(model: nn.Module, kind: type, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, kind):
                setattr(module, name, make(child))
    return model.eval()


def authors_deploy_form(deploy: nn.Module) -> nn.Module:
    """``deploy`` with every RepMLP v1 block run the authors' way (:class:`AuthorsRepMLP`), sharing its weights."""

    if not is_deploy_form(deploy):
        raise ValueError("authors_deploy_form needs a deploy-form model (repmlp.convert_to_deploy)")
    return _replace_modules(_run_nchw(_share_tensors_copy(deploy)), RepMLP, AuthorsRepMLP)


def _run_nchw(model: nn.Module) -> nn.Module:
    """As their code runs: NCHW, so 4-D weights become contiguous copies (the FC weights stay shared) and a zoo
    model is told not to turn its inputs channels_last."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.dim() == 4 and not p.is_contiguous():
                module._parameters[name] = nn.Parameter(p.detach().contiguous(), p.requires_grad)
    for module in model.modules():  # the model and its stem
        if isinstance(getattr(module, "channels_last", None), bool):
            module.channels_last = False
    return model


def authors_inference_form(train: nn.Module) -> nn.Module:
    """The authors' RepMLPNet inference form of a train-form model: FC3 locality-injected as a grouped 1x1 conv,
    every other BN kept. Computes the same function; exists to measure speed against."""

    return _replace_modules(copy.deepcopy(train), RepMLPBlock, AuthorsRepMLPNetBlock)


def authors_form(train: nn.Module, deploy: nn.Module) -> nn.Module | None:
    """The authors' inference form of a model of ours (emulated), or None when we have no emulation for it."""

    if any(isinstance(m, RepMLP) for m in deploy.modules()):
        return authors_deploy_form(deploy)
    if any(isinstance(m, RepMLPBlock) for m in train.modules()):
        return authors_inference_form(train)
    return None


def _authors_fuse_bn(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Their float32 conv-BN fold."""
    std = (bn.running_var + bn.eps).sqrt()
    t = (bn.weight / std).reshape(-1, *([1] * (weight.dim() - 1)))
    return weight * t, bn.bias - bn.running_mean * bn.weight / std


def _authors_switch_conv_bn(module: nn.Module) -> None:
    """Their ``ConvBN.switch_to_deploy``: the fold written into a freshly initialised Conv2d with bias."""
    conv = module.conv
    kernel, bias = _authors_fuse_bn(conv.weight, module.bn)
    fused = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        bias=True,
    )
    fused.weight.data, fused.bias.data = kernel, bias
    module.conv, module.bn = fused, None


def _authors_switch_repmlp(block: nn.Module) -> None:
    """Their ``RepMLPBlock.switch_to_deploy``: each local conv's FC matrix by convolving an identity matrix, summed
    with the BN-folded FC3 into a freshly initialised grouped 1x1 Conv2d; the pooled-input BN folded into fc1."""
    pp, lp, gp = block.partition_perceptron, block.local_perceptron, block.global_perceptron
    if any(d != 1 for _, d in block.reparam_conv_k) or block.in_chs != block.out_chs:
        raise ValueError("the authors' conversion has no dilated branches and needs in_channels == out_channels")
    c, o, h, w, g = block.in_chs, block.out_chs, block.h, block.w, block.fc3_groups
    fc_weight, fc_bias = _authors_fuse_bn(pp.fc3.weight.reshape(o * h * w, -1, 1, 1), pp.bn)
    if lp is not None:
        branches = {k: _authors_fuse_bn(b.conv.weight, b.bn) for (k, _), b in zip(block.reparam_conv_k, lp.branches)}
        largest = max(branches)
        total_kernel, total_bias = branches[largest]
        for k, (kernel, bias) in branches.items():
            if k != largest:
                total_kernel = total_kernel + F.pad(kernel, [(largest - k) // 2] * 4)
                total_bias = total_bias + bias
        eye = torch.eye(c * h * w // g).repeat(1, g).reshape(c * h * w // g, c, h, w)
        fc_k = F.conv2d(eye, total_kernel, padding=largest // 2, groups=g)
        fc_k = fc_k.reshape(o * h * w // g, c * h * w).t()
        fc_weight, fc_bias = fc_k.reshape_as(fc_weight) + fc_weight, total_bias.repeat_interleave(h * w) + fc_bias
    if gp is not None:
        std = (gp.bn.running_var + gp.bn.eps).sqrt()
        scale = gp.bn.weight / std
        avg_bias = gp.bn.bias - gp.bn.running_mean * scale
        times = gp.fc1.in_features // len(avg_bias)
        gp.fc1.bias.data = gp.fc1.bias + gp.fc1.weight.matmul(avg_bias.repeat_interleave(times).view(-1, 1)).squeeze()
        gp.fc1.weight.data = gp.fc1.weight * scale.repeat_interleave(times).view(1, -1)
        gp.bn = None
    fc3 = nn.Conv2d(c * h * w, o * h * w, 1, groups=g, bias=True)
    fc3.weight.data, fc3.bias.data = fc_weight, fc_bias
    # into our deploy-form block (FC3 as (out, in/g), as their 1x1 conv flattened)
    pp.fc3.weight, pp.fc3.bias = nn.Parameter(fc3.weight.flatten(1)), fc3.bias
    pp.bn, block.local_perceptron = None, None


@torch.no_grad()
def authors_convert(train: nn.Module) -> nn.Module:
    """The authors' whole-model conversion (their ``repmlp_model_convert``), emulated op for op in float32 on a
    RepMLP-ResNet of ours: a deep copy, then every RepMLP block and every conv-BN switched to its deploy form as
    their code does it. Returns our deploy form; exists to time :func:`repmlp.convert_to_deploy` against."""

    model = _run_nchw(copy.deepcopy(train))  # their modules hold contiguous (NCHW) kernels
    for module in [m for m in model.modules() if isinstance(m, RepMLP)]:
        _authors_switch_repmlp(module)
    for module in [m for m in model.modules() if isinstance(m, ConvBN) and m.bn is not None]:
        _authors_switch_conv_bn(module)
    if not is_deploy_form(model):
        raise ValueError(
            "the authors' conversion is emulated for RepMLP v1 blocks and conv-BNs only; this model has "
            "other training-time modules (RepMLPNet's is their locality injection)"
        )
    return model.eval()
