"""RepMLPNet (Ding et al., "RepMLPNet: Hierarchical Vision MLP with Re-parameterized Locality", CVPR 2022).

Stem (4x4/4 conv-BN-ReLU), four stages of units joined by 2x2/2 conv-BN-ReLU patch embeddings, then
head BN -> global average pool -> Linear. A unit is ``y = x + RepMLPBlock(BN(x)); z = y + FFN(BN(y))``.

RepMLP Block (paper Sec. 3.2) on a C-channel map with partition size (h, w) and S channel sets
("sharesets"):

* Global Perceptron: SE-like, GAP -> fc1 -> ReLU -> fc2 -> sigmoid; **scales** the block output per channel.
* Channel Perceptron: FC3, one (h*w x h*w) token-mixing matrix per channel set, then BN(S). Channel c
  uses matrix ``c mod S`` (the authors' layout: the map viewed as (N*C/S, S, h*w)).
* Local Perceptron: depthwise (groups=S) conv-BN branches over the same S-channel view; merged into FC3
  by Locality Injection.

Partition layout. The presets use one partition per stage (h, w = stage resolution at the preset's size; they keep
them at any ``img_size``). A map of size (hp*h, wp*w) is cut into hp x wp partitions
(:func:`repmlp.layers.partition`, partitions in (n, row, column) order); within each partition channel c uses set
``c mod S``, the local perceptron pads with zeros at partition borders, and BN(S) pools over all partitions. The
global perceptron pools over the whole map, so every partition of a channel shares one scale. With hp = wp = 1 this
is exactly the authors' block (theirs is inconsistent for more partitions).

Sizes. Any input runs, in one model object: a map that is no multiple of the patch (stem 4x4/4, embeddings 2x2/2) or
of the partition is zero-padded at the bottom and right to the next multiple
(:func:`repmlp.layers.pad_to_multiple`), and a block's output is cropped back to its input's size; nothing of the
model depends on the number of partitions.

Deploy form (beyond the authors' locality injection, which keeps every other BN): local perceptron and
BN(S) merged into FC3 (run as a batched matmul); stem, embedding and FFN conv-BNs fused; the BN before
the FFN folded into its first 1x1 conv. The BN before the RepMLP block stays as a :class:`ChannelAffine` (it
cannot fold into FC3 matrices shared across channels), and so does the head BN (kept for ``pre_logits``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import create_classifier, to_2tuple
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .. import ops
from ..authors import REPMLPNET_LAYOUTS
from ..layers import (
    ConvBN,
    LocalPerceptron,
    PatchEmbedding,
    cells,
    crop,
    pad_to_multiple,
    param_like,
    partition,
    shape_str,
    unpartition,
)
from ._base import RepMLPModel, build, check_rate, drop_path, drop_path_rates, factory_kwargs, pretrained_cfg

__all__ = ["RepMLPNet", "RepMLPBlock"]

torch.fx.wrap("pad_to_multiple")  # a leaf in this module's graphs too (FX wraps a name per module)

_Size = tuple[int, int]


class ChannelAffine(nn.Module):
    """Per-channel ``y = weight * x + bias`` on (N, C, ...) maps: an eval-mode BN with nothing left to fold."""

    def __init__(
        self, channels: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(channels, device=device, dtype=dtype))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The identity: weight 1, bias 0."""
        self.weight.fill_(1)
        self.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * (x.dim() - 2)
        return torch.addcmul(self.bias.view(shape), x, self.weight.view(shape))

    @classmethod
    def from_bn(cls, bn: nn.Module) -> ChannelAffine:
        """The eval-mode affine of ``bn`` (a BatchNorm or a frozen one), in its dtype and on its device."""
        like = bn.running_var
        affine = cls(like.shape[0], device=like.device, dtype=like.dtype)
        scale, shift = ops.bn_affine(bn)
        with torch.no_grad():
            affine.weight.copy_(scale), affine.bias.copy_(shift)
        return affine


GRAPH_LAYOUT_MIN_TOKENS = 128  # see SharedFC


class SharedFC(nn.Module):
    """FC3 shared over channel sets: ``y[..., s, :] = weight[s] @ v[..., s, :] + bias[s]`` for v (..., S, h*w).

    Runs as one batched matmul over the S sets (a grouped 1x1 conv is several times slower on CPU); for S > 1
    the result is a set-major strided view, which callers consume without copying. With ``graph_layout`` set (see
    :class:`repmlp.layers.GroupedLinear`) each set of at least ``GRAPH_LAYOUT_MIN_TOKENS`` (128) tokens is its own
    ``F.linear``, which int8 tools quantize; smaller sets keep the batched matmul: their matrices gain nothing from
    int8, and a linear per set would put 128 of them in each block of the last stage, slower in onnxruntime and
    minutes more of inductor compilation.
    """

    def __init__(
        self,
        sharesets: int,
        tokens: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.sharesets, self.tokens = sharesets, tokens  # ints, not weight.shape: FX traces them as constants
        self.graph_layout = False
        self.per_set_in_graphs = tokens >= GRAPH_LAYOUT_MIN_TOKENS  # an attribute: TorchScript reads no globals
        self.weight = nn.Parameter(torch.empty(sharesets, tokens, tokens, **dd))
        self.bias = nn.Parameter(torch.empty(sharesets, tokens, **dd)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """nn.Linear's default weight initialisation for fan-in h*w; a zero bias."""
        bound = 1 / math.sqrt(self.tokens)
        self.weight.uniform_(-bound, bound)
        if self.bias is not None:
            self.bias.zero_()

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        s, tokens = self.sharesets, self.tokens
        if s == 1:
            return F.linear(v, self.weight[0], None if self.bias is None else self.bias[0])
        if self.graph_layout and self.per_set_in_graphs:
            return self._per_set(v)
        rows, weight_t = v.reshape(-1, s, tokens).transpose(0, 1), self.weight.transpose(1, 2)  # (S, B, hw)
        y = torch.bmm(rows, weight_t) if self.bias is None else torch.baddbmm(self.bias.unsqueeze(1), rows, weight_t)
        return y.transpose(0, 1).reshape(v.shape)

    @torch.jit.unused  # exported graphs only
    def _per_set(self, v):  # no annotations: TorchScript cannot resolve postponed ones of an unused method
        s = self.sharesets
        rows, biases = v.reshape(-1, s, self.tokens), [None] * s if self.bias is None else self.bias.unbind()
        y = torch.stack([F.linear(r, w, b) for r, w, b in zip(rows.unbind(1), self.weight.unbind(), biases)], 1)
        return y.reshape(v.shape)


class ChannelScaling(nn.Module):
    """RepMLPNet's global perceptron: SE-like GAP -> fc1 -> ReLU -> fc2 -> sigmoid, one scale per channel
    (N, C, 1, 1) that multiplies the block's output (unlike v1's :class:`repmlp.layers.GlobalPerceptron`, which adds
    one value per channel and partition to the input)."""

    def __init__(
        self, channels: int, hidden: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, channels, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.fc2(F.relu(self.fc1(x.mean((2, 3)))))
        return torch.sigmoid(v)[:, :, None, None]


class ChannelPerceptron(nn.Module):
    """FC3 shared over channel sets, then BN(S); the deploy form is FC3 with a bias."""

    def __init__(
        self,
        sharesets: int,
        h: int,
        w: int,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.fc3 = SharedFC(sharesets, h * w, bias=deploy, device=device, dtype=dtype)
        # BatchNorm1d over (B, S, h*w) has the statistics of the authors' BatchNorm2d(S) over (B, S, h, w)
        self.bn = None if deploy else nn.BatchNorm1d(sharesets, device=device, dtype=dtype)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        """(..., S, h*w) -> (..., S, h*w)."""
        y = self.fc3(v)
        return y if self.bn is None else self.bn(y.flatten(0, -3)).reshape(y.shape)

    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FC3 weight (S, hw, hw) and bias (S, hw) with BN(S) folded in (float64)."""
        weight, bias = self.fc3.weight, self.fc3.bias
        if self.bn is None:
            return weight.double(), bias.double()
        weight, shift = ops.fuse_bn(weight, None, *ops.bn_affine(self.bn))
        return weight, shift[:, None].expand(-1, weight.shape[1])

    @torch.no_grad()
    def load_fused(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Become the deploy form with the given (S, hw, hw) weight and (S, hw) bias."""
        like = self.fc3.weight
        self.fc3.weight, self.fc3.bias = param_like(like, weight), param_like(like, bias)
        self.bn = None


class RepMLPBlock(nn.Module):
    """RepMLP Block of RepMLPNet: global, channel and local perceptrons (layout in the module docstring).

    Args:
        channels: channels C (a multiple of ``sharesets``).
        h: partition height.
        w: partition width.
        sharesets: channel sets S sharing one FC3 matrix.
        reparam_conv_k: local perceptron kernel sizes (odd); empty for none.
        gp_reduction: global perceptron hidden reduction.
        deploy: build the locality-injected form (FC3 with bias) directly.
        device: where every tensor is created (timm's factory kwarg).
        dtype: the floating dtype of every parameter and buffer (timm's factory kwarg).
    """

    def __init__(
        self,
        channels: int,
        h: int,
        w: int,
        sharesets: int,
        reparam_conv_k: Sequence[int] = (1, 3),
        gp_reduction: int = 4,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if channels % sharesets:
            raise ValueError(f"RepMLPBlock: sharesets={sharesets} must divide channels={channels}")
        self.channels, self.h, self.w, self.sharesets = channels, h, w, sharesets
        self.reparam_conv_k = [(int(k), 1) for k in reparam_conv_k]
        self.global_perceptron = ChannelScaling(channels, channels // gp_reduction, **dd)
        self.channel_perceptron = ChannelPerceptron(sharesets, h, w, deploy, **dd)
        self.local_perceptron = None
        if self.reparam_conv_k and not deploy:
            self.local_perceptron = LocalPerceptron(sharesets, sharesets, self.reparam_conv_k, sharesets, **dd)

    @property
    def deploy(self) -> bool:
        return self.channel_perceptron.bn is None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """The block output, plus ``residual`` (same shape as ``x``) when given, added in the same pass."""
        h, w, s = self.h, self.w, self.sharesets
        x = _check_map(x, self.channels)
        n, c, H, W = x.shape
        padded = pad_to_multiple(x, h, w)
        p = _partitions(padded, h, w)  # (N*hp*wp, C, h, w)
        v = p.reshape(-1, c // s, s, h * w)  # channel c of a partition uses set c mod S
        y = self.channel_perceptron(v)
        if self.local_perceptron is not None:
            y = y + self.local_perceptron(v.reshape(-1, s, h, w)).reshape(y.shape)
        y = _join_partitions(y, n, c, H, W, h, w)
        sets = (n, c // s, s, -1)  # a view of the map that keeps y's set-major strides: no copy
        scale = self.global_perceptron(x).view(sets)
        y = y.reshape(sets)
        out = y * scale if residual is None else torch.addcmul(residual.reshape(sets), y, scale)
        return out.reshape(n, c, H, W)

    #: The child holding FC3 (with its BN in the train form), for code that treats every family's block alike.
    fc3_perceptron = "channel_perceptron"

    def equivalent_fc3(self) -> tuple[torch.Tensor, torch.Tensor]:
        """FC3 weight (S, hw, hw) and bias (S, hw) of this block's deploy form (Locality Injection) as a
        differentiable float64 function of its current form, from running BN statistics."""
        weight, bias = self.channel_perceptron.fused()
        if self.local_perceptron is not None:
            local_weight, local_bias = self.local_perceptron.fused(self.h, self.w)  # (S, hw, hw), (S*hw,)
            weight, bias = weight + local_weight, bias + local_bias.reshape(bias.shape)
        return weight, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Locality Injection (idempotent): local perceptron and BN(S) merged into FC3 with a bias."""
        if self.deploy:
            return
        self.channel_perceptron.load_fused(*self.equivalent_fc3())
        self.local_perceptron = None


@torch.fx.wrap
def _check_map(x: torch.Tensor, channels: int) -> torch.Tensor:
    """``x``, if it is an (N, channels, H, W) map (any H, W); else a ValueError."""
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"RepMLPBlock with {channels} channels got a map of shape {shape_str(x.shape)}")
    return x


@torch.fx.wrap
def _partitions(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The h x w partitions of ``x`` (:func:`repmlp.layers.partition`); ``x`` itself when it is one partition."""
    return x if x.shape[2] == h and x.shape[3] == w else partition(x, h, w)


@torch.fx.wrap
def _join_partitions(y: torch.Tensor, n: int, c: int, H: int, W: int, h: int, w: int) -> torch.Tensor:
    """Block outputs of the partitions as the (N, C, H, W) map, cropped to H x W where the map was padded;
    ``y`` untouched (its strides kept) for one partition and no padding."""
    Hp, Wp = cells(H, h) * h, cells(W, w) * w
    if Hp == h and Wp == w:
        return y if H == h and W == w else crop(y.reshape(n, c, h, w), H, W)
    return crop(unpartition(y.reshape(-1, c, h, w), n, Hp // h, Wp // w), H, W)


class FFNBlock(nn.Module):
    """FFN: 1x1 conv-BN (C -> hidden) -> GELU -> 1x1 conv-BN (hidden -> C).

    The deploy form runs the 1x1 convs as batched matmuls in eager PyTorch; with ``graph_layout`` set (see
    :class:`repmlp.layers.GroupedLinear`) as Conv2d, which graph runtimes run well and int8 tools quantize.
    """

    def __init__(
        self,
        channels: int,
        hidden: int,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.graph_layout = False
        self.fc1 = ConvBN(channels, hidden, 1, deploy=deploy, **dd)
        self.act = nn.GELU()
        self.fc2 = ConvBN(hidden, channels, 1, deploy=deploy, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fc1.bn is not None or self.fc2.bn is not None or self.graph_layout:
            return self.fc2(self.act(self.fc1(x)))
        # deploy form: the 1x1 convs as batched matmuls over (N, C, H*W), faster than a 1x1 conv on CPU
        n, _, H, W = x.shape
        fc1, fc2 = self.fc1.conv, self.fc2.conv
        y = _pointwise(fc2.weight, fc2.bias, self.act(_pointwise(fc1.weight, fc1.bias, x.flatten(2))))
        return y.reshape(n, -1, H, W)


def _pointwise(weight: torch.Tensor, bias: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """A 1x1 conv on (N, C, L) as ``bias + weight @ v`` per sample (tensors, not the module: TorchScript)."""
    weight = weight.flatten(1).expand(v.shape[0], -1, -1)
    return torch.bmm(weight, v) if bias is None else torch.baddbmm(bias[:, None], weight, v)


class RepMLPNetUnit(nn.Module):
    """``y = x + RepMLPBlock(BN(x)); z = y + FFN(BN(y))``; the deploy form folds the second BN into the FFN.

    With ``drop_path_rate`` > 0, training drops each of the two residual branches per sample (stochastic depth).
    """

    def __init__(
        self,
        channels: int,
        size: _Size,
        sharesets: int,
        reparam_conv_k: Sequence[int],
        gp_reduction: int,
        ffn_expand: int,
        deploy: bool = False,
        drop_path_rate: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = ChannelAffine(channels, **dd) if deploy else nn.BatchNorm2d(channels, **dd)
        self.repmlp = RepMLPBlock(channels, *size, sharesets, reparam_conv_k, gp_reduction, deploy, **dd)
        self.norm2 = None if deploy else nn.BatchNorm2d(channels, **dd)
        self.ffn = FFNBlock(channels, channels * ffn_expand, deploy, **dd)
        self.drop_path = drop_path(drop_path_rate)
        self.drops_paths = drop_path_rate > 0

    @property
    def deploy(self) -> bool:
        return self.norm2 is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drops_paths and self.training:
            x = x + self.drop_path(self.repmlp(self.norm1(x)))
        else:  # the residual added inside the block, in the same pass
            x = self.repmlp(self.norm1(x), residual=x)
        return x + self.drop_path(self.ffn(x if self.norm2 is None else self.norm2(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """BN before the block -> ChannelAffine; BN before the FFN and FFN fc1's BN -> fc1 (idempotent)."""
        if self.deploy:
            return
        self.norm1 = ChannelAffine.from_bn(self.norm1)
        fc1 = self.ffn.fc1
        weight, bias = fc1.fused()
        weight, bias = ops.fold_preceding_bn(weight.flatten(1), bias, *ops.bn_affine(self.norm2))
        fc1.conv.weight = param_like(fc1.conv.weight, weight.reshape(fc1.conv.weight.shape))
        fc1.conv.bias = param_like(fc1.conv.weight, bias)
        fc1.bn, self.norm2 = None, None


class RepMLPNetStage(nn.Module):
    """Patch embedding (except stage 0) and units at one resolution."""

    def __init__(
        self,
        in_chs: int,
        chs: int,
        depth: int,
        size: _Size,
        sharesets: int,
        reparam_conv_k: Sequence[int],
        gp_reduction: int,
        ffn_expand: int,
        downsample: bool,
        deploy: bool = False,
        unit_drop_path_rates: Sequence[float] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.downsample = PatchEmbedding(in_chs, chs, 2, deploy, **dd) if downsample else nn.Identity()
        self.blocks = nn.Sequential(
            *[
                RepMLPNetUnit(chs, size, sharesets, reparam_conv_k, gp_reduction, ffn_expand, deploy, rate, **dd)
                for rate in unit_drop_path_rates or [0.0] * depth
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class NormClassifierHead(nn.Module):
    """Head BN, global pool, dropout, classifier; the deploy form keeps the BN as a :class:`ChannelAffine`
    (on the C x H x W map before pooling it costs next to nothing, and ``pre_logits`` stays the same)."""

    def __init__(
        self,
        in_chs: int,
        num_classes: int,
        pool_type: str,
        drop_rate: float,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm = ChannelAffine(in_chs, **dd) if deploy else nn.BatchNorm2d(in_chs, **dd)
        self.global_pool, self.fc = create_classifier(in_chs, num_classes, pool_type=pool_type, **dd)
        self.drop = nn.Dropout(drop_rate)

    @property
    @torch.jit.unused  # Python-side introspection, not compiled by TorchScript
    def deploy(self) -> bool:
        return isinstance(self.norm, ChannelAffine)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        pool_type = self.global_pool.pool_type if pool_type is None else pool_type
        self.global_pool, self.fc = create_classifier(self.norm.weight.shape[0], num_classes, pool_type=pool_type)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(self.norm(x)))
        return x if pre_logits else self.fc(x)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Head BN -> ChannelAffine (idempotent)."""
        if not self.deploy:
            self.norm = ChannelAffine.from_bn(self.norm)


class RepMLPNet(RepMLPModel):
    """RepMLPNet.

    Args:
        img_size: nominal input resolution (any size runs); sets the default partition sizes.
        channels: channels per stage.
        depths: units per stage.
        sharesets: channel sets S per stage.
        partitions: (h, w) (or h = w) per stage; default: each stage's resolution at ``img_size`` (rounded up).
        reparam_conv_k: local perceptron kernel sizes.
        gp_reduction: global perceptron hidden reduction.
        ffn_expand: FFN hidden expansion.
        patch_size: stem patch size.
        num_classes: classifier outputs (0 for none).
        in_chans: input channels.
        global_pool: timm pooling type.
        drop_rate: dropout before the classifier.
        drop_path_rate: stochastic depth: the largest rate of dropping a residual branch (rising linearly over the
            units); identity in eval, so conversion is unaffected.
        drop_block_rate: refused unless 0: RepMLPNet has no conv feature maps for DropBlock.
        deploy: build the deploy form directly.
        device: where every tensor is created (timm's factory kwarg; ``'meta'`` included).
        dtype: the floating dtype of every parameter and buffer (timm's factory kwarg).
    """

    key_layouts = REPMLPNET_LAYOUTS  # ours, the authors', mmpretrain's

    #: RepMLPNet runs in NCHW: its token-mixing FC3 and FFN are batched matmuls over (C, H*W) rows that read an
    #: NCHW map in place, so channels_last would add a copy per block and runs slower.
    channels_last = False

    def __init__(
        self,
        img_size: int | _Size = 224,
        channels: Sequence[int] = (64, 128, 256, 512),
        depths: Sequence[int] = (2, 2, 6, 2),
        sharesets: Sequence[int] = (1, 4, 16, 128),
        partitions: Sequence[int | _Size] | None = None,
        reparam_conv_k: Sequence[int] = (1, 3),
        gp_reduction: int = 4,
        ffn_expand: int = 4,
        patch_size: int = 4,
        num_classes: int = 1000,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        drop_block_rate: float = 0.0,
        deploy: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            img_size=img_size,
            channels=channels,
            depths=depths,
            sharesets=sharesets,
            partitions=partitions,
            reparam_conv_k=reparam_conv_k,
            gp_reduction=gp_reduction,
            ffn_expand=ffn_expand,
            patch_size=patch_size,
            num_classes=num_classes,
            in_chans=in_chans,
            global_pool=global_pool,
            drop_rate=drop_rate,
            drop_path_rate=drop_path_rate,
            drop_block_rate=drop_block_rate,
            deploy=deploy,
        )
        dd = factory_kwargs("RepMLPNet", device, dtype)
        check_rate("drop_block_rate", drop_block_rate, "RepMLPNet", "an MLP: no conv feature maps to drop blocks of")
        img_size = to_2tuple(img_size)
        if not len(channels) == len(depths) == len(sharesets) == len(partitions or channels):
            raise ValueError(
                f"channels, depths, sharesets and partitions need one entry per stage, got {channels}, "
                f"{depths}, {sharesets}, {partitions}"
            )
        self.img_size, self.in_chans = img_size, in_chans
        # timm's input traits: the data config follows the size the model is built (or set_input_size) for, as for
        # the other families, though any size runs (for a model it calls flexible, timm keeps the weights' size)
        self._traits = dict(img_size=img_size, fixed_input_size=True)
        self.reductions = [patch_size * 2**i for i in range(len(channels))]
        if partitions is None:
            partitions = [(cells(img_size[0], r), cells(img_size[1], r)) for r in self.reductions]
        self.partitions = [to_2tuple(p) for p in partitions]
        self.drop_rate = drop_rate

        self.stem = PatchEmbedding(in_chans, channels[0], patch_size, deploy, **dd)
        stages, self.feature_info, in_chs = [], [], channels[0]
        rates = drop_path_rates(drop_path_rate, depths)
        for i, (chs, depth) in enumerate(zip(channels, depths)):
            stages.append(
                RepMLPNetStage(
                    in_chs,
                    chs,
                    depth,
                    self.partitions[i],
                    sharesets[i],
                    reparam_conv_k,
                    gp_reduction,
                    ffn_expand,
                    downsample=i > 0,
                    deploy=deploy,
                    unit_drop_path_rates=rates[i],
                    **dd,
                )
            )
            self.feature_info.append(dict(num_chs=chs, reduction=self.reductions[i], module=f"stages.{i}"))
            in_chs = chs
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.head = NormClassifierHead(in_chs, num_classes, global_pool, drop_rate, deploy, **dd)
        self._init_feature_levels()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^head\.norm", (99999,)),
            ],
        )

    def _resize(self, size: tuple[int, int]) -> dict:
        """Nothing depends on the input size; the partitions, derived from ``img_size`` when not given, are recorded
        so that the model rebuilt from its arguments keeps them."""
        return dict(partitions=[list(p) for p in self.partitions])

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        return _check_input(x, self.in_chans)


@torch.fx.wrap
def _check_input(x: torch.Tensor, chans: int) -> torch.Tensor:
    """``x``, if it is an (N, chans, H, W) batch (any H, W); else a ValueError."""
    if x.dim() != 4 or x.shape[1] != chans:
        raise ValueError(f"RepMLPNet takes (N, {chans}, H, W) inputs of any size, got {shape_str(x.shape)}")
    return x


def _create(variant: str, pretrained: bool = False, **kwargs) -> RepMLPNet:
    return build(
        RepMLPNet, variant, pretrained, feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3)), **kwargs
    )


def _cfg(size: int, name: str, **kwargs) -> dict:
    return pretrained_cfg(
        dict(
            num_classes=1000,
            input_size=(3, size, size),
            pool_size=(size // 32, size // 32),
            crop_pct=1.0,
            fixed_input_size=False,  # any size runs (module docstring)
            mean=IMAGENET_DEFAULT_MEAN,
            std=IMAGENET_DEFAULT_STD,
            paper_ids="arXiv:2112.11081",
            paper_name="RepMLPNet: Hierarchical Vision MLP with Re-parameterized Locality",
            description=f"{name} (CVPR 2022); architecture only, no ImageNet weights are shipped (the "
            f"authors' checkpoints load through pretrained_cfg_overlay).",
        ),
        **kwargs,
    )


_MMPRETRAIN = "https://download.openmmlab.com/mmclassification/v0/repmlp/"


def _mmpretrain_cfg(size: int, name: str, file: str, top1: float, top5: float, **transform) -> dict:
    """mmpretrain's release of the authors' ImageNet weights, with the eval transform of its published accuracy."""
    return _cfg(
        size,
        name,
        url=_MMPRETRAIN + file,
        license="apache-2.0",
        origin_url="https://github.com/open-mmlab/mmpretrain/tree/main/configs/repmlp",
        description=f"{name} (CVPR 2022), ImageNet-1k weights: the authors' release as converted by mmpretrain "
        f"({file}); train form, loads into either form.",
        notes=(
            f"top-1 {top1} / top-5 {top5} on ImageNet-1k val is mmpretrain's published figure (configs/repmlp/"
            "metafile.yml), with this eval transform; it was not measured here",
            "converted by mmpretrain from the authors' release (https://github.com/DingXiaoH/RepMLP, MIT license)",
        ),
        **transform,
    )


default_cfgs = generate_default_cfgs(
    {
        "repmlpnet_t224": _cfg(224, "RepMLPNet-T224"),
        # mmpretrain's test pipeline: Resize((256, 256)) (squash), CenterCrop(224), bilinear
        "repmlpnet_b224.mmpretrain_in1k": _mmpretrain_cfg(
            224,
            "RepMLPNet-B224",
            "repmlp-base_3rdparty_8xb64_in1k_20220330-1cb1f11b.pth",
            80.41,
            95.14,
            crop_pct=0.875,
            crop_mode="squash",
        ),
        "repmlpnet_t256": _cfg(256, "RepMLPNet-T256"),
        # mmpretrain's test pipeline: ResizeEdge(292, 'short'), CenterCrop(256), bilinear (floor(256 / 0.8767) = 292)
        "repmlpnet_b256.mmpretrain_in1k": _mmpretrain_cfg(
            256,
            "RepMLPNet-B256",
            "repmlp-base_3rdparty_8xb64_in1k-256px_20220330-7c5a91ce.pth",
            81.11,
            95.50,
            crop_pct=0.8767,
            crop_mode="center",
        ),
        "repmlpnet_d256": _cfg(256, "RepMLPNet-D256"),
        "repmlpnet_l256": _cfg(256, "RepMLPNet-L256"),
    }
)

_T = dict(channels=(64, 128, 256, 512), depths=(2, 2, 6, 2), sharesets=(1, 4, 16, 128))
_B = dict(channels=(96, 192, 384, 768), depths=(2, 2, 12, 2), sharesets=(1, 4, 32, 128))
_D = dict(channels=(80, 160, 320, 640), depths=(2, 2, 18, 2), sharesets=(1, 4, 16, 128))
_L = dict(channels=(96, 192, 384, 768), depths=(2, 2, 18, 2), sharesets=(1, 4, 32, 256))


def _at(size: int) -> dict:
    """A preset's size: ``img_size`` and its partitions, one per stage (the stage's resolution at that size).
    The partitions are part of the architecture (FC3's shape): at another ``img_size`` they tile."""
    return dict(img_size=size, partitions=tuple(size // r for r in (4, 8, 16, 32)))


@register_model
def repmlpnet_t224(pretrained: bool = False, **kwargs) -> RepMLPNet:
    """RepMLPNet-T224 (38.29M train-form params)."""
    return _create("repmlpnet_t224", pretrained, **{**_T, **_at(224), **kwargs})


@register_model
def repmlpnet_b224(pretrained: bool = False, **kwargs) -> RepMLPNet:
    """RepMLPNet-B224 (68.24M train-form params)."""
    return _create("repmlpnet_b224", pretrained, **{**_B, **_at(224), **kwargs})


@register_model
def repmlpnet_t256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    """RepMLPNet-T256 (58.69M train-form params)."""
    return _create("repmlpnet_t256", pretrained, **{**_T, **_at(256), **kwargs})


@register_model
def repmlpnet_b256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    """RepMLPNet-B256 (96.45M train-form params)."""
    return _create("repmlpnet_b256", pretrained, **{**_B, **_at(256), **kwargs})


@register_model
def repmlpnet_d256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    """RepMLPNet-D256 (86.89M train-form params)."""
    return _create("repmlpnet_d256", pretrained, **{**_D, **_at(256), **kwargs})


@register_model
def repmlpnet_l256(pretrained: bool = False, **kwargs) -> RepMLPNet:
    """RepMLPNet-L256 (117.64M train-form params)."""
    return _create("repmlpnet_l256", pretrained, **{**_L, **_at(256), **kwargs})
