"""Re-parameterization identities as pure tensor functions.

Every function computes in float64. Most return float64 tensors, and callers cast the result back to the dtype
and device of the parameter it replaces, so half-precision models convert as exactly as fp32 ones. The two that
produce the largest weights (:func:`fuse_bn` and :func:`add_conv_to_fc`) can instead write into an ``out`` tensor
of any dtype: they work through it in blocks of rows held in a small float64 scratch, each block rounded once into
``out``, so a 40 MB FC3 weight is folded without full-size float64 copies.
"""

from __future__ import annotations

__all__ = [
    "add_conv_to_fc",
    "bn_affine",
    "conv_to_fc",
    "dilate_kernel",
    "fold_preceding_bn",
    "fuse_bn",
    "fuse_bn_bias",
    "is_batch_norm",
    "pad_kernel",
]

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

_Pair = tuple[int, int]


def _pair(v: int | _Pair) -> _Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def is_batch_norm(module: nn.Module) -> bool:
    """True for a BatchNorm: PyTorch's (any ``_BatchNorm``) or a frozen one (torchvision's ``FrozenBatchNorm2d``,
    which timm's ``freeze_batch_norm_2d`` and torchvision's detection backbones put in place of BatchNorm2d)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d))


def bn_affine(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm (or a frozen one, :func:`is_batch_norm`) as ``y = scale * x + shift`` per channel
    (float64).

    ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``.
    """
    var = bn.running_var.double()
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    return scale, shift


#: Bytes of the float64 scratch block that in-place folds work in: small enough to stay in a core's cache between
#: the ops that fill it, large enough that the number of ops (each a thread fork/join) stays small.
_SCRATCH_BYTES = 1 << 22


def _in_float64_blocks(out: torch.Tensor, rows_per_unit: int, fill: Callable[[torch.Tensor, slice], None]) -> None:
    """Write ``out`` block by block of rows: ``fill(block, rows)`` puts the float64 values of ``out[rows]`` into
    ``block``, which is then rounded once into ``out``. Blocks are whole multiples of ``rows_per_unit`` rows."""
    units = out.shape[0] // rows_per_unit
    unit_bytes = 8 * out[:rows_per_unit].numel()
    step = rows_per_unit * max(1, min(units, _SCRATCH_BYTES // unit_bytes))
    scratch = None if out.dtype == torch.float64 else out.new_empty((step, *out.shape[1:]), dtype=torch.float64)
    for start in range(0, out.shape[0], step):
        rows = slice(start, min(start + step, out.shape[0]))
        if scratch is None:
            fill(out[rows], rows)
        else:
            block = scratch[: rows.stop - rows.start]
            fill(block, rows)
            out[rows] = block


def fuse_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN that *follows* a conv or FC into it.

    ``scale * (W x + b) + shift = (scale[:, None] * W) x + (scale * b + shift)``, with ``W`` of
    shape (out, ...) for any trailing dims. With ``out`` (any dtype and memory format), the weight is
    written there, rounded once; the bias is a new float64 tensor either way.
    """
    scale = scale.reshape(-1, *([1] * (weight.dim() - 1))).double()
    if out is None:
        return weight.double() * scale, fuse_bn_bias(bias, scale.flatten(), shift)

    def fill(block: torch.Tensor, rows: slice) -> None:
        block.copy_(weight[rows]).mul_(scale[rows])

    _in_float64_blocks(out, 1, fill)
    return out, fuse_bn_bias(bias, scale.flatten(), shift)


def fuse_bn_bias(bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The bias half of :func:`fuse_bn`: ``scale * b + shift`` (``shift`` without a bias)."""
    return shift if bias is None else scale * bias.double() + shift


def fold_preceding_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a per-input-feature affine that *precedes* a linear layer into it.

    ``W (scale * x + shift) + b = (W * scale[None, :]) x + (W shift + b)``, ``W`` of shape (out, in).
    """
    w = weight.double()
    b = w @ shift
    if bias is not None:
        b = b + bias.double()
    return w * scale[None, :], b


def pad_kernel(kernel: torch.Tensor, size: int | _Pair) -> torch.Tensor:
    """Zero-pad a (out, in, kh, kw) kernel symmetrically to ``size``.

    A centred odd kernel with ``padding = k // 2`` computes the same function after padding to a larger
    odd size with ``padding = size // 2``.
    """
    kh, kw = kernel.shape[-2:]
    th, tw = _pair(size)
    if (th - kh) % 2 or (tw - kw) % 2 or th < kh or tw < kw:
        raise ValueError(f"cannot centre-pad a {kh}x{kw} kernel to {th}x{tw}")
    dh, dw = (th - kh) // 2, (tw - kw) // 2
    return F.pad(kernel, (dw, dw, dh, dh))


def dilate_kernel(kernel: torch.Tensor, dilation: int | _Pair) -> torch.Tensor:
    """The undilated kernel of a dilated conv: taps spread ``dilation`` apart with zeros between.

    A (kh, kw) kernel with dilation d equals a (d (kh - 1) + 1, d (kw - 1) + 1) kernel with dilation 1
    that is zero off the dilated grid; size-preserving paddings agree.
    """
    dh, dw = _pair(dilation)
    if (dh, dw) == (1, 1):
        return kernel
    o, c, kh, kw = kernel.shape
    out = kernel.new_zeros(o, c, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    out[..., ::dh, ::dw] = kernel
    return out


def _conv_windows(kernel: torch.Tensor, h: int, w: int, dilation: _Pair) -> torch.Tensor:
    """The rows of the conv's FC matrix as a strided (O, h, w, C, h*w) view, ``y`` reversed (see :func:`conv_to_fc`).

    Row (o, y, x) is, per input channel, the h x w window at (h-1-y, w-1-x) of the kernel zero-padded to
    (2h-1) x (2w-1). With the padded kernel pre-shifted once per x (a tensor 2h-1 times the kernel's padded
    size, small next to the matrix), all windows are one strided view, indexed [o, h-1-y, x, c, (Y, X)].
    """
    kernel = dilate_kernel(kernel, dilation).contiguous()  # kernels may come channels_last
    o, c, kh, kw = kernel.shape
    ph, pw = h - 1 - (kh - 1) // 2, w - 1 - (kw - 1) // 2  # negative pads crop kernels larger than 2h-1
    padded = F.pad(kernel, (pw, pw, ph, ph))  # (o, c, 2h-1, 2w-1)
    # shifted[o, x, c, a, X] = padded[o, c, a, X + w - 1 - x], written by one stacking copy (contiguous, as the
    # strided view below needs)
    shifted = torch.stack([padded[..., w - 1 - x : 2 * w - 1 - x] for x in range(w)], dim=1).contiguous()
    s_o, s_x, s_c = shifted.stride()[:3]
    return shifted.as_strided((o, h, w, c, h * w), (s_o, w, s_x, s_c, 1))


def _add_conv_windows_(fc: torch.Tensor, windows: torch.Tensor) -> None:
    """``fc += conv_to_fc(kernel)`` in place, given the kernel's :func:`_conv_windows`: one add per row y."""
    h = windows.shape[1]
    rows = fc.view(windows.shape)
    for y in range(h):
        rows[:, y].add_(windows[:, h - 1 - y])


def _check_conv(kernel: torch.Tensor, groups: int) -> None:
    out_ch, _, kh, kw = kernel.shape
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"size-preserving padding needs odd kernel sizes, got {kh}x{kw}")
    if out_ch % groups:
        raise ValueError(f"groups={groups} does not divide the {out_ch} output channels")


def conv_to_fc(
    kernel: torch.Tensor,
    h: int,
    w: int,
    groups: int = 1,
    dilation: int | _Pair = 1,
) -> torch.Tensor:
    """The FC matrix of a size-preserving, zero-padded conv over one h x w partition (closed form).

    A conv with kernel ``K`` of shape (O, C/g, kh, kw), ``groups`` g, dilation d and padding
    ``d * (k - 1) / 2`` maps the flattened (c, y, x) input to the flattened (o, y, x) output by

        M[o, y, x, c, y', x'] = sum_ij K[o, c, i, j] [y' = y + i d_h - p_h] [x' = x + j d_w - p_w].

    For fixed (y, x) the taps hit distinct inputs, so every entry is one kernel value (or zero): exact.
    Taps that fall outside the partition read the zero padding and vanish, which also covers kernels
    larger than the partition.

    Returns:
        float64 tensor of shape (g, O/g * h * w, C/g * h * w): one block per group, rows in (o, y, x)
        order and columns in (c, y, x) order within the group.
    """
    _check_conv(kernel, groups)
    out_ch, cin_g = kernel.shape[:2]
    m = kernel.new_zeros(out_ch * h * w, cin_g * h * w, dtype=torch.float64)
    _add_conv_windows_(m, _conv_windows(kernel.double(), h, w, _pair(dilation)))
    return m.view(groups, out_ch // groups * h * w, cin_g * h * w)


def add_conv_to_fc(
    weight: torch.Tensor,
    kernel: torch.Tensor,
    h: int,
    w: int,
    dilation: int | _Pair = 1,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``scale[:, None] * W + conv_to_fc(K)``: an FC (times the scale of a BN after it) plus a conv's FC matrix.

    The local perceptron merged into FC3 (paper Sec. 3.3) for one group, or for any block of output channels
    (rows) of a grouped FC3 with the matching rows of its kernel. Evaluated in float64 blocks of rows, each
    rounded once into ``out``: every entry is ``W * scale`` plus at most one kernel value (the taps of a row land
    on distinct inputs), so the result is the float64 one rounded once, without float64 copies of its full size.

    Args:
        weight: FC weight (O*h*w, C*h*w), rows in (o, y, x) and columns in (c, y, x) order.
        kernel: conv kernel (O, C, kh, kw), odd sizes, size-preserving padding.
        h: partition height.
        w: partition width.
        dilation: conv dilation.
        scale: per-row scale of ``weight`` (O*h*w,), e.g. of a following BN (:func:`bn_affine`); default 1.
        out: tensor of the shape of ``weight`` to write the result into, any floating dtype.

    Returns:
        ``out``, or a new float64 tensor.
    """
    _check_conv(kernel, 1)
    o, c = kernel.shape[:2]
    if tuple(weight.shape) != (o * h * w, c * h * w):
        raise ValueError(
            f"an FC weight of shape {(o * h * w, c * h * w)} is needed for a {tuple(kernel.shape)} "
            f"kernel on {h}x{w} partitions, got {tuple(weight.shape)}"
        )
    kernel, dilation = kernel.double(), _pair(dilation)
    scale = None if scale is None else scale.double()[:, None]

    def fill(block: torch.Tensor, rows: slice) -> None:  # windows of the block's kernel rows: built in cache
        block.copy_(weight[rows])
        if scale is not None:
            block.mul_(scale[rows])
        _add_conv_windows_(block, _conv_windows(kernel[rows.start // (h * w) : rows.stop // (h * w)], h, w, dilation))

    if out is None:
        out = torch.empty(weight.shape, dtype=torch.float64, device=weight.device)
    _in_float64_blocks(out, h * w, fill)
    return out
