"""RepMLP building blocks (RepMLP paper v1, arXiv 2105.01883, Sec. 3).

A block has a train form (global, partition and local perceptrons with BatchNorms) and a deploy form
(three FC layers). ``reparameterize()`` turns the first into the second in place; the identities it
uses live in :mod:`repmlp.ops`.
"""

from __future__ import annotations

__all__ = [
    "ConvBN",
    "GlobalPerceptron",
    "GroupedLinear",
    "LocalPerceptron",
    "PartitionPerceptron",
    "PatchEmbedding",
    "RepMLP",
    "cells",
    "check_block_input",
    "crop",
    "graph_layout",
    "in_layout",
    "pad_to_multiple",
    "param_like",
    "partition",
    "shape_str",
    "unpartition",
]

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .authors import block_keys_to_ours


def param_like(like: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    """A new Parameter holding ``value`` in the dtype and on the device of ``like``."""
    return nn.Parameter(value.to(dtype=like.dtype, device=like.device), requires_grad=like.requires_grad)


@torch.fx.wrap  # FX leaves (here and below): Python control flow on shapes and layouts, kept at run time
def _is_channels_last(x: torch.Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


@torch.fx.wrap
def in_layout(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` channels_last (NHWC) or contiguous (NCHW); a copy only when it is not already.

    The layout a conv runs in is its input's: oneDNN takes it from the input's strides (or from a channels_last
    kernel's; ours are stored contiguous). So channels_last is set in the strides even where both layouts hold
    (one channel, a 1x1 map), which ``contiguous(memory_format=...)`` leaves as they are.
    """
    if not channels_last or x.dim() != 4:
        return x.contiguous()
    n, c, h, w = x.shape
    stride = x.stride()
    if stride[1] == 1 and stride[3] == c and stride[2] == w * c and (n == 1 or stride[0] == h * w * c):
        return x
    return x.clone(memory_format=torch.channels_last)


@torch.fx.wrap
def partition(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, C, H, W) -> (N * hp * wp, C, h, w), partitions in (n, row, column) order; always a new tensor.

    Written with tensors of rank <= 5 so exported graphs run on runtimes that reject 6-D tensors: one copy
    for a channels_last input, two otherwise (instead of one 6-D permute).
    """
    n, c, H, W = x.shape
    hp, wp = H // h, W // w
    if _is_channels_last(x):
        x = x.permute(0, 2, 3, 1).reshape(n * hp, h, wp, w, c).permute(0, 2, 4, 1, 3)  # (n*hp, wp, c, h, w)
    else:
        x = x.reshape(n, c, hp, h, W).transpose(1, 2)  # (n, hp, c, h, W)
        x = x.reshape(n * hp, c, h, wp, w).permute(0, 3, 1, 2, 4)  # (n*hp, wp, c, h, w)
    return x.clone(memory_format=torch.contiguous_format).view(n * hp * wp, c, h, w)


@torch.fx.wrap
def unpartition(p: torch.Tensor, n: int, hp: int, wp: int, channels_last: bool = False) -> torch.Tensor:
    """Inverse of :func:`partition`: (N * hp * wp, C, h, w) -> (N, C, hp * h, wp * w), optionally channels_last."""
    c, h, w = p.shape[1:]
    y = p.reshape(n * hp, wp, c, h, w)
    if channels_last:  # one copy into (n, H, W, c) memory order (a view for one partition: laid out then)
        y = y.permute(0, 3, 1, 4, 2).reshape(n, hp * h, wp * w, c)
        return in_layout(y.permute(0, 3, 1, 2), True)
    y = y.permute(0, 2, 3, 1, 4)  # (n*hp, c, h, wp, w)
    y = y.reshape(n, hp, c, h * wp * w).transpose(1, 2)  # (n, c, hp, h*W)
    return y.reshape(n, c, hp * h, wp * w)


def cells(size: int, step: int) -> int:
    """How many ``step``-sized cells cover ``size`` pixels: ``ceil(size / step)`` (the padding rule below).

    No floor division of a negative number (``-(-size // step)``): traced for ONNX it becomes an integer Div, which
    truncates toward zero, and the export's constant folding then padded by a negative amount (a crop).
    """
    return (size + step - 1) // step


@torch.fx.wrap
def pad_to_multiple(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``x`` zero-padded at the bottom and right to the next multiple of (h, w); ``x`` itself when it is one.

    The one rule for sizes that do not divide: every map a partition (or a patch) cuts is padded so, and the result
    cropped back to the map's size (:func:`crop`). Both forms of a block pad alike, so conversion stays exact.
    """
    H, W = x.shape[-2], x.shape[-1]
    if H % h == 0 and W % w == 0:
        return x
    return F.pad(x, (0, cells(W, w) * w - W, 0, cells(H, h) * h - H))


@torch.fx.wrap
def crop(y: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The top-left H x W of ``y``: undoes :func:`pad_to_multiple`; ``y`` itself when nothing was padded."""
    if y.shape[-2] == H and y.shape[-1] == W:
        return y
    return y[..., :H, :W]


def shape_str(shape: list[int]) -> str:
    """``(2, 3, 32, 32)``: a tensor shape as Python prints a tuple, in TorchScript too."""
    return "(" + ", ".join([str(s) for s in shape]) + ")"


@torch.fx.wrap
def check_block_input(x: torch.Tensor, chs: int, H: int, W: int, h: int, w: int) -> torch.Tensor:
    """``x``, if it is (N, chs, H', W') cut into the partition grid of the (H, W) a RepMLP block is built for
    (``cells(H', h) == cells(H, h)``, likewise W); else a ValueError.

    Checks return their input for the caller to use: FX drops a call whose result is unused.
    """
    if x.dim() != 4 or x.shape[1] != chs or cells(x.shape[2], h) != cells(H, h) or cells(x.shape[3], w) != cells(W, w):
        raise ValueError(
            f"RepMLP built for inputs (N, {chs}, {H}, {W}) with {h}x{w} partitions (a {cells(H, h)}x"
            f"{cells(W, w)} grid; any size padding to that grid runs), got {shape_str(x.shape)}"
        )
    return x


class ConvBN(nn.Module):
    """Conv2d + BatchNorm2d (+ optional ReLU); the deploy form is one Conv2d with bias."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        act: bool = False,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=deploy, **dd)
        self.bn = None if deploy else nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    @property
    def deploy(self) -> bool:
        return self.bn is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_bn_act(x)

    def conv_bn_act(self, x: torch.Tensor) -> torch.Tensor:
        """Conv, BN (train form), activation: the forward that subclasses wrap (TorchScript has no ``super()``)."""
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.act(x)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel and bias (float64) of the equivalent single conv."""
        if self.bn is None:
            return self.conv.weight.double(), self.conv.bias.double()
        return ops.fuse_bn(self.conv.weight, self.conv.bias, *ops.bn_affine(self.bn))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN into the conv (idempotent); the kernel keeps its memory format."""
        if self.bn is None:
            return
        like = self.conv.weight
        weight, bias = ops.fuse_bn(like, self.conv.bias, *ops.bn_affine(self.bn), out=torch.empty_like(like))
        self.conv.weight = param_like(like, weight)
        self.conv.bias = param_like(like, bias)
        self.bn = None


class PatchEmbedding(ConvBN):
    """Non-overlapping k x k / k conv-BN-ReLU (stem and between stages); a map that is no multiple of k is
    zero-padded to the next one (:func:`repmlp.layers.pad_to_multiple`), so no pixel is dropped."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        patch: int,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_chs, out_chs, patch, stride=patch, act=True, deploy=deploy, device=device, dtype=dtype)
        self.conv.padding = (0, 0)
        self.patch = patch
        self.channels_last = False  # a model's stem: set by the model (RepMLPModel.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # here, not only in the model: timm's feature wrappers call the stem themselves
            x = in_layout(x, True)
        return self.conv_bn_act(pad_to_multiple(x, self.patch, self.patch))


class GroupedLinear(nn.Module):
    """A grouped FC layer run as one batched matmul over groups, or as one linear layer per group.

    ``weight`` has shape (out_features, in_features / groups), like a grouped 1x1 conv with the trailing
    dims dropped: group i maps inputs [i*in/g, (i+1)*in/g) to outputs [i*out/g, (i+1)*out/g). On CPU a
    batched matmul runs this several times faster than a grouped 1x1 Conv2d.

    With ``graph_layout`` set (by :func:`graph_layout`) each group is its own ``F.linear``: a
    Gemm with a 2-D constant weight in ONNX, which int8 tools quantize with per-output-channel scales (they skip
    or mis-scale the batched matmul) and onnxruntime runs faster; eager PyTorch keeps the batched matmul, which
    is faster there.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        groups: int = 1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.in_features, self.out_features, self.groups = in_features, out_features, groups
        self.graph_layout = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features // groups, **dd))
        self.bias = nn.Parameter(torch.empty(out_features, **dd)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's weight initialisation (for fan-in in_features / groups); a zero bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return F.linear(x, self.weight, self.bias)
        g = self.groups
        if self.graph_layout:
            return self._per_group(x)
        weight = self.weight.reshape(g, self.out_features // g, -1)
        # weight @ x^T per group: the weight is the GEMM's streamed left operand, so few rows (batch 1) do not pay
        # for packing it
        x = x.reshape(-1, g, self.in_features // g).permute(1, 2, 0)  # (g, in/g, B)
        if self.bias is None:
            y = torch.bmm(weight, x)
        else:
            y = torch.baddbmm(self.bias.reshape(g, -1, 1), weight, x)
        return y.permute(2, 0, 1).reshape(-1, self.out_features)

    @torch.jit.unused  # exported graphs only
    def _per_group(self, x):  # no annotations: TorchScript cannot resolve postponed ones of an unused method
        g = self.groups
        biases = [None] * g if self.bias is None else self.bias.chunk(g)
        parts = zip(x.chunk(g, -1), self.weight.chunk(g), biases)
        return torch.cat([F.linear(xi, wi, bi) for xi, wi, bi in parts], -1)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, groups={self.groups}, bias={self.bias is not None}"


class GlobalPerceptron(nn.Module):
    """Global perceptron (paper Sec. 3.2): per-partition channel means -> BN -> fc1 -> ReLU -> fc2,
    added to every pixel of its partition. The deploy form folds the BN into fc1.

    fc1 and fc2 act on C * hp * wp features, so they are the only weights whose shape depends on the number of
    partitions: at another input size they are built anew (the paper's recipe, v1 Sec. 4.4) while everything else
    of a RepMLP block carries over.
    """

    def __init__(
        self,
        chs: int,
        hp: int,
        wp: int,
        h: int,
        w: int,
        reduction: int = 1,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.hp, self.wp, self.h, self.w, self.reduction = hp, wp, h, w, reduction
        features = chs * hp * wp
        self.bn = None if deploy else nn.BatchNorm2d(chs, **dd)
        self.fc1 = nn.Linear(features, features // reduction, **dd)
        self.fc2 = nn.Linear(features // reduction, features, **dd)

    @property
    def deploy(self) -> bool:
        return self.bn is None

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """The values added per channel and partition, (N, C * hp * wp) in (c, row, column) order."""
        v = F.avg_pool2d(x, (self.h, self.w))
        if self.bn is not None:
            v = self.bn(v)
        return self.fc2(F.relu(self.fc1(v.reshape(x.shape[0], -1))))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN after the average pool into fc1 (idempotent)."""
        if self.bn is None:
            return
        scale, shift = ops.bn_affine(self.bn)
        per_feature = self.hp * self.wp  # fc1 inputs are flattened in (c, row, column) order
        weight, bias = ops.fold_preceding_bn(
            self.fc1.weight, self.fc1.bias, scale.repeat_interleave(per_feature), shift.repeat_interleave(per_feature)
        )
        self.fc1.weight = param_like(self.fc1.weight, weight)
        self.fc1.bias = param_like(self.fc1.bias, bias)
        self.bn = None


class PartitionPerceptron(nn.Module):
    """Partition perceptron (paper Sec. 3.2): FC3, a grouped FC over each flattened h x w partition,
    then BatchNorm1d over the O*h*w outputs. The deploy form is FC3 with a bias."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        h: int,
        w: int,
        groups: int = 1,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.fc3 = GroupedLinear(in_chs * h * w, out_chs * h * w, groups, bias=deploy, **dd)
        self.bn = None if deploy else nn.BatchNorm1d(out_chs * h * w, **dd)

    @property
    def deploy(self) -> bool:
        return self.bn is None

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        y = self.fc3(p.reshape(p.shape[0], -1))
        if self.bn is not None:
            y = self.bn(y)
        return y

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FC3 weight as (groups, out/g, in/g) and bias, with the BN folded in (float64, differentiable; the part
        of :meth:`RepMLP.equivalent_fc3` this perceptron contributes)."""
        fc3 = self.fc3
        weight, bias = fc3.weight, fc3.bias
        if self.bn is not None:
            weight, bias = ops.fuse_bn(weight, bias, *ops.bn_affine(self.bn))
        elif bias is None:
            bias = torch.zeros(fc3.out_features, dtype=torch.float64, device=weight.device)
        return weight.double().reshape(fc3.groups, fc3.out_features // fc3.groups, -1), bias.double()

    @torch.no_grad()
    def load_fused(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Become the deploy form with the given (groups, out/g, in/g) weight and bias."""
        like = self.fc3.weight
        self.fc3.weight = param_like(like, weight.reshape(like.shape))
        self.fc3.bias = param_like(like, bias)
        self.bn = None


def _kernel_spec(spec: int | Sequence[int]) -> tuple[int, int]:
    """A local-perceptron branch spec: ``k`` or ``(k, dilation)``, integers, k odd."""
    parts = [spec] if isinstance(spec, int) else list(spec) if isinstance(spec, (list, tuple)) else None
    if (
        parts is None
        or len(parts) not in (1, 2)
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in parts)
    ):
        raise ValueError(
            f"reparam_conv_k entries must be odd integer kernel sizes k or (k, dilation) pairs of "
            f"integers, got {spec!r}"
        )
    k, d = (parts + [1])[:2]
    if k < 1 or k % 2 == 0 or d < 1:
        raise ValueError(
            f"reparam_conv_k entries must be odd kernel sizes k >= 1 or (k, dilation >= 1) pairs, got {spec!r}"
        )
    return k, d


def _kernel_specs(specs: Sequence[int | Sequence[int]] | None) -> list[tuple[int, int]]:
    """All branch specs of ``reparam_conv_k`` (a list of them: ``(1, 3)``, not ``3``)."""
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise ValueError(
            f"reparam_conv_k must be a list of odd kernel sizes (e.g. [1, 3], or [3] for one branch; "
            f"[] for none), got {specs!r}"
        )
    return [_kernel_spec(k) for k in specs]


class LocalPerceptron(nn.Module):
    """Local perceptron (paper Sec. 3.2): grouped conv-BN branches applied to each partition with zero
    padding at partition borders; train form only (merged into FC3 by the block)."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernels: Sequence[tuple[int, int]],
        groups: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.kernels = list(kernels)
        self.groups = groups
        self.branches = nn.ModuleList(
            ConvBN(in_chs, out_chs, k, groups=groups, dilation=d, **dd) for k, d in self.kernels
        )

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor | None = None
        for branch in self.branches:  # no ModuleList slicing: TorchScript cannot
            y = branch(p)
            out = y if out is None else out + y
        assert out is not None
        return out.reshape(p.shape[0], -1)

    def fused(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of all branches as one grouped FC: weight (groups, out/g, in/g) and bias (float64)."""
        kernel, bias = self.fused_kernel()
        return ops.conv_to_fc(kernel, h, w, self.groups), bias.repeat_interleave(h * w)  # bias per (o, y, x)

    def fused_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of all branches as one grouped conv: kernel (out, in/g, k, k) and bias (float64).

        Branches are summed as kernels first (dilated taps spread out, then centre-padded to the largest
        size), so one conv -> FC expansion serves them all.
        """
        fused = [branch.fused() for branch in self.branches]
        kernels = [ops.dilate_kernel(k, d) for (k, _), (_, d) in zip(fused, self.kernels)]
        size = max(k.shape[-1] for k in kernels)
        return sum(ops.pad_kernel(k, size) for k in kernels), sum(b for _, b in fused)


class RepMLP(nn.Module):
    """RepMLP block (paper v1): global + partition + local perceptrons, re-parameterized into FCs.

    Args:
        in_channels: input channels C.
        out_channels: output channels O.
        H: input height the block is built for.
        W: input width the block is built for.
        h: partition height; an H that is no multiple of h is zero-padded to the next one (and the output
            cropped back), so the block has ``ceil(H / h)`` partition rows.
        w: partition width; likewise.
        reparam_conv_k: local perceptron branches: odd kernel sizes, or (k, dilation) pairs; empty or
            None for no local perceptron.
        fc1_fc2_reduction: global perceptron hidden reduction.
        fc3_groups: groups of FC3 and of the local convs; must divide C and O.
        deploy: build the deploy form (three FC layers) directly.
        device: where every tensor is created (timm's factory kwarg; ``'meta'`` included).
        dtype: the floating dtype of every parameter and buffer (timm's factory kwarg).

    The arguments keep the authors' names; inside, channels are ``in_chs`` and ``out_chs`` (timm's).
    """

    #: Children whose shape depends on the number of partitions (read by :func:`repmlp.checkpoint.prepare_state_dict`:
    #: weights trained at another input size keep this block's fresh fc1/fc2 there).
    partition_dependent = ("global_perceptron",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        H: int,
        W: int,
        h: int,
        w: int,
        reparam_conv_k: Sequence[int | Sequence[int]] | None = None,
        fc1_fc2_reduction: int = 1,
        fc3_groups: int = 1,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        for name, value in dict(
            in_channels=in_channels,
            out_channels=out_channels,
            H=H,
            W=W,
            h=h,
            w=w,
            fc1_fc2_reduction=fc1_fc2_reduction,
            fc3_groups=fc3_groups,
        ).items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RepMLP: {name} must be a positive int, got {value!r}")
        if in_channels % fc3_groups or out_channels % fc3_groups:
            raise ValueError(
                f"RepMLP: fc3_groups={fc3_groups} must divide in_channels={in_channels} and out_channels={out_channels}"
            )
        self.in_chs, self.out_chs = in_channels, out_channels
        self.h, self.w = h, w
        self.fc3_groups = fc3_groups
        kernels = _kernel_specs(reparam_conv_k)
        self.reparam_conv_k = kernels
        self.global_perceptron: GlobalPerceptron | None = None
        self._set_size(H, W, fc1_fc2_reduction, deploy, **dd)
        self.partition_perceptron = PartitionPerceptron(in_channels, out_channels, h, w, fc3_groups, deploy, **dd)
        self.local_perceptron = None
        if kernels and not deploy:
            self.local_perceptron = LocalPerceptron(in_channels, out_channels, kernels, fc3_groups, **dd)
        self.register_load_state_dict_pre_hook(_accept_authors_keys)

    @property
    @torch.jit.unused  # the authors' names, for Python callers
    def in_channels(self) -> int:
        """Input channels C (``in_chs``)."""
        return self.in_chs

    @property
    @torch.jit.unused
    def out_channels(self) -> int:
        """Output channels O (``out_chs``)."""
        return self.out_chs

    def _check_size(self, H: int, W: int, fc1_fc2_reduction: int) -> None:
        """Refuse (H, W, reduction) before anything changes: sizes positive, the reduction dividing C * hp * wp."""
        for name, value in dict(H=H, W=W, fc1_fc2_reduction=fc1_fc2_reduction).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"RepMLP: {name} must be a positive int, got {value!r}")
        features = self.in_chs * cells(H, self.h) * cells(W, self.w)
        if features > self.in_chs and features % fc1_fc2_reduction:
            raise ValueError(
                f"RepMLP: fc1_fc2_reduction={fc1_fc2_reduction} must divide C * hp * wp = {features} "
                f"(at {H}x{W} with {self.h}x{self.w} partitions)"
            )

    def _set_size(
        self,
        H: int,
        W: int,
        fc1_fc2_reduction: int,
        deploy: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self._check_size(H, W, fc1_fc2_reduction)
        self.H, self.W = H, W
        self.hp, self.wp = cells(H, self.h), cells(W, self.w)
        self.fc1_fc2_reduction = fc1_fc2_reduction
        gp = self.global_perceptron
        if self.hp * self.wp == 1:
            self.global_perceptron = None
        elif gp is None or (gp.hp, gp.wp, gp.reduction) != (self.hp, self.wp, fc1_fc2_reduction):
            self.global_perceptron = GlobalPerceptron(
                self.in_chs, self.hp, self.wp, self.h, self.w, fc1_fc2_reduction, deploy, device=device, dtype=dtype
            )

    def set_input_size(self, H: int, W: int, fc1_fc2_reduction: int | None = None) -> None:
        """Run at (H, W) from now on; the partitions keep their size and tile the new map.

        FC3 and the local perceptron are unchanged. The global perceptron (the only part whose shape depends on
        the number of partitions) is built anew, freshly initialised, when the partition grid or the reduction
        changes (the paper's recipe, v1 Sec. 4.4), else kept. Refused before anything changes.

        Args:
            H: new input height.
            W: new input width.
            fc1_fc2_reduction: global perceptron hidden reduction at the new size; default: the current one.
        """
        reduction = self.fc1_fc2_reduction if fc1_fc2_reduction is None else fc1_fc2_reduction
        self._check_size(H, W, reduction)
        like = self.partition_perceptron.fc3.weight
        old = self.global_perceptron
        trainable = like.requires_grad if old is None else any(p.requires_grad for p in old.parameters())
        self._set_size(H, W, reduction, self.partition_perceptron.deploy, device=like.device, dtype=like.dtype)
        if self.global_perceptron is not None and self.global_perceptron is not old:  # frozen stays frozen
            self.global_perceptron.train(self.training).requires_grad_(trainable)

    @property
    @torch.jit.unused  # Python-side introspection, not compiled by TorchScript
    def deploy(self) -> bool:
        gp = self.global_perceptron
        return self.partition_perceptron.deploy and self.local_perceptron is None and (gp is None or gp.deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = check_block_input(x, self.in_chs, self.H, self.W, self.h, self.w)
        n, c, H, W = x.shape
        x = pad_to_multiple(x, self.h, self.w)
        p = partition(x, self.h, self.w)
        if self.global_perceptron is not None:
            # added to the partitions (a new tensor) rather than to x: one contiguous broadcast over h*w, in place
            v = self.global_perceptron.values(x).reshape(n, c, self.hp * self.wp).transpose(1, 2)
            p = p.add_(v.reshape(-1, c, 1, 1))
        y = self.partition_perceptron(p)
        channels_last = _is_channels_last(x)
        if self.local_perceptron is not None:  # its convs run in the block's layout (the partitions are NCHW)
            y = y + self.local_perceptron(in_layout(p, channels_last))
        y = y.reshape(-1, self.out_chs, self.h, self.w)
        return crop(unpartition(y, n, self.hp, self.wp, channels_last=channels_last), H, W)

    #: The child holding FC3 (with its BN in the train form), for code that treats every family's block alike.
    fc3_perceptron = "partition_perceptron"

    def equivalent_fc3(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FC3 weight and bias of this block's deploy form as a differentiable float64 function of its current form.

        The partition perceptron with its BN folded plus the local perceptron as an FC matrix (paper Sec. 3.3),
        from running BN statistics; gradients reach FC3, every conv branch and every BN's affine parameters.
        Shapes are the deploy form's ``fc3.weight`` and ``fc3.bias``. :meth:`reparameterize` computes the same in
        place, in blocks (less memory), and a test holds the two equal.
        """
        weight, bias = self.partition_perceptron.fused()
        if self.local_perceptron is not None:
            local_weight, local_bias = self.local_perceptron.fused(self.h, self.w)
            weight, bias = weight + local_weight, bias + local_bias
        return weight.reshape(self.partition_perceptron.fc3.out_features, -1), bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Turn this block into its deploy form in place (idempotent): fc1 with the pooled-input BN
        folded in, fc2, and FC3 with a bias carrying every conv branch and both BNs."""
        if self.global_perceptron is not None:
            self.global_perceptron.reparameterize()
        if self.deploy:
            return
        pp, lp, fc3 = self.partition_perceptron, self.local_perceptron, self.partition_perceptron.fc3
        ones = torch.ones(fc3.out_features, dtype=torch.float64, device=fc3.weight.device)
        scale, shift = ops.bn_affine(pp.bn) if pp.bn is not None else (ones, ones - 1)
        weight = torch.empty_like(fc3.weight)  # a grouped FC3's rows pair with its kernel's rows as one FC would
        if lp is None:
            weight, bias = ops.fuse_bn(fc3.weight, fc3.bias, scale, shift, out=weight)
        else:
            kernel, local_bias = lp.fused_kernel()
            ops.add_conv_to_fc(fc3.weight, kernel, self.h, self.w, scale=scale, out=weight)
            bias = ops.fuse_bn_bias(fc3.bias, scale, shift) + local_bias.repeat_interleave(self.h * self.w)
        pp.load_fused(weight, bias)
        self.local_perceptron = None


def _accept_authors_keys(module: RepMLP, state_dict: dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook: the authors' block state dicts load as they are (:mod:`repmlp.authors`)."""
    block_keys_to_ours(state_dict, prefix, module.reparam_conv_k)


@contextlib.contextmanager
def graph_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s layers that have a ``graph_layout`` run in it: FC3 as one linear layer per
    group, 1x1 convs as Conv2d (see :class:`repmlp.layers.GroupedLinear`). Same function, the layout that graph
    runtimes (onnxruntime, torch.export + inductor) run fast and int8 tools quantize."""
    modules = [m for m in model.modules() if isinstance(getattr(m, "graph_layout", None), bool)]
    saved = [m.graph_layout for m in modules]
    for m in modules:
        m.graph_layout = True
    try:
        yield model
    finally:
        for m, value in zip(modules, saved):
            m.graph_layout = value
