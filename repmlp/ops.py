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
    return w, fuse_bn_bias(bias, scale, shift)


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


def _conv_matrix(kernel: torch.Tensor, h: int, w: int, dilation: _Pair) -> torch.Tensor:
    """The conv's FC matrix as a contiguous float64 (O, h, w, C, h*w) tensor (see :func:`conv_to_fc`).

    Row (o, y, x) is, per input channel, the h x w window at (h-1-y, w-1-x) of the kernel zero-padded to
    (2h-1) x (2w-1). With the padded kernel pre-shifted once per x, all windows are one strided view with
    rows in reversed y, so one stacking copy lays out the whole matrix.
    """
    kernel = dilate_kernel(kernel.double(), dilation)
    o, c, kh, kw = kernel.shape
    ph, pw = h - 1 - (kh - 1) // 2, w - 1 - (kw - 1) // 2  # negative pads crop kernels larger than 2h-1
    padded = F.pad(kernel, (pw, pw, ph, ph))  # (o, c, 2h-1, 2w-1)
    # shifted[o, x, c, a, X] = padded[o, c, a, X + w - 1 - x]
    shifted = padded.unfold(3, w, 1).flip(3).permute(0, 3, 1, 2, 4).contiguous()
    s_o, s_x, s_c = shifted.stride()[:3]
    windows = shifted.as_strided((o, h, w, c, h * w), (s_o, w, s_x, s_c, 1))  # [o, h-1-y, x, c, (Y, X)]
    return torch.stack([windows[:, h - 1 - y] for y in range(h)], dim=1)  # one contiguous copy, unlike flip


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
    m = _conv_matrix(kernel, h, w, _pair(dilation))
    return m.reshape(groups, out_ch // groups * h * w, cin_g * h * w)


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
    (rows) of a grouped FC3 with the matching rows of its kernel. Evaluated in float64 and rounded once into
    ``out``, so a float32 FC3 is folded without float64 copies of its full size.

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
    m = _conv_matrix(kernel, h, w, _pair(dilation)).view(weight.shape)
    if scale is None:
        return torch.add(m, weight, out=out)
    return torch.addcmul(m, weight, scale.double()[:, None], out=out)
