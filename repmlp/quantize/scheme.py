"""The int8 scheme, one definition for QAT, the int8 tools' settings and the weight range report.

What onnxruntime's tools and PyTorch's x86 int8 path use on CPU, and what QAT simulates: weights int8, symmetric, one
scale per output channel (per row of FC3, per (set, token) row of a shared FC3), levels -127..127, or -64..64 with
``reduce_range`` (see :func:`weight_qmax`); activations uint8, asymmetric, one scale per tensor (per batch for
dynamic quantization, calibrated for static).
"""

from __future__ import annotations

__all__ = [
    "cpu_has_vnni",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "resolve_reduce_range",
    "weight_qmax",
]

import torch

from ..cpu import cpu_has_vnni  # re-exported: its former home


def weight_qmax(reduce_range: bool | None = None) -> int:
    """Largest int8 weight level of onnxruntime's symmetric weights: 127, or 64 with ``reduce_range``.

    Reduced range (7-bit weights) is what onnxruntime advises for CPUs without VNNI (AVX2, AVX-512 without VNNI):
    their u8 x s8 kernels add pairs of products in int16, which saturates with full-range weights.
    """
    return 64 if resolve_reduce_range(reduce_range) else 127


def resolve_reduce_range(reduce_range: bool | None) -> bool:
    """``reduce_range`` as given; None: on where this CPU lacks VNNI."""
    return not cpu_has_vnni() if reduce_range is None else reduce_range


def fake_quantize_weight(weight: torch.Tensor, qmax: int = 64) -> torch.Tensor:
    """Symmetric per-row fake quantization (rows: output channels, the last dim is the input), straight-through.

    Scale ``max |row| / qmax``, levels ``-qmax..qmax``, round half to even: onnxruntime's symmetric per-channel
    int8 weights (``qmax`` from :func:`weight_qmax`).
    """
    rows = weight.reshape(-1, weight.shape[-1])
    scale = rows.detach().abs().amax(1, keepdim=True).clamp_min(torch.finfo(weight.dtype).tiny) / qmax
    quantized = (torch.round(rows / scale).clamp(-qmax, qmax) * scale).reshape(weight.shape)
    return weight + (quantized - weight).detach()


def fake_quantize_activation(x: torch.Tensor, qmax: int = 255) -> torch.Tensor:
    """Asymmetric per-tensor fake quantization over the tensor's own range (zero included), straight-through.

    onnxruntime's dynamic uint8 quantization of an activation; static quantization fixes the range by calibration.
    """
    lo, hi = x.detach().amin().clamp_max(0), x.detach().amax().clamp_min(0)
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(x.dtype).tiny)
    zero_point = torch.round(-lo / scale)
    quantized = (torch.round(x / scale) + zero_point).clamp(0, qmax).sub(zero_point).mul(scale)
    return x + (quantized - x).detach()
