"""Re-parameterization identities as pure tensor functions.

Every function computes in float64 and returns float64 tensors; callers cast the result back to the
dtype and device of the parameter it replaces, so half-precision models convert as exactly as fp32 ones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_Pair = tuple[int, int]


def _pair(v: int | _Pair) -> _Pair:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def bn_affine(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``y = scale * x + shift`` per channel (float64).

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


def fuse_bn(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a BN that *follows* a conv or FC into it.

    ``scale * (W x + b) + shift = (scale[:, None] * W) x + (scale * b + shift)``, with ``W`` of
    shape (out, ...) for any trailing dims.
    """
    w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else scale * bias.double() + shift
    return w, b


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


def _tap_matrix(k: int, n: int, dilation: int, device: torch.device) -> torch.Tensor:
    """S[i, y, y'] = 1 where tap i of a size-preserving conv at output y reads input y'."""
    pad = dilation * (k - 1) // 2
    taps = torch.arange(k, device=device)[:, None] * dilation - pad
    src = torch.arange(n, device=device)[None, :] + taps  # (k, n): input read by tap i at output y
    return (src[..., None] == torch.arange(n, device=device)).double()


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
    out_ch, cin_g, kh, kw = kernel.shape
    dh, dw = _pair(dilation)
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"size-preserving padding needs odd kernel sizes, got {kh}x{kw}")
    if out_ch % groups:
        raise ValueError(f"groups={groups} does not divide the {out_ch} output channels")
    sh = _tap_matrix(kh, h, dh, kernel.device)  # (kh, h, h)
    sw = _tap_matrix(kw, w, dw, kernel.device)  # (kw, w, w)
    m = torch.einsum("ocij,iyY,jxX->oyxcYX", kernel.double(), sh, sw)
    return m.reshape(groups, out_ch // groups * h * w, cin_g * h * w)
