"""How a deploy form's weights sit in int8: per layer range, spread of per-channel ranges, quantization noise."""

from __future__ import annotations

__all__ = ["WeightRange", "format_ranges", "weight_ranges"]

from dataclasses import dataclass

import torch
from torch import nn

from .qat import FakeQuantFC3
from .scheme import fake_quantize_weight, weight_qmax


@dataclass
class WeightRange:
    """How a layer's weights sit in int8: range, spread of per-channel ranges, quantization noise."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    p999_abs: float  # 99.9th percentile of |w|
    median_abs: float
    channel_ratio: float  # largest per-channel max |w| over the median per-channel max |w|
    outliers: list[int]  # channels whose max |w| exceeds ``outlier_factor`` x the median per-channel max
    sqnr_channel_db: float  # int8 signal-to-noise of the worst output channel, one scale per output channel
    sqnr_tensor_db: float  # ... with one scale for the whole tensor


def _output_rows(module: nn.Module) -> torch.Tensor:
    """The weight as (output channels, inputs): the rows int8 tools give one scale each."""
    weight = module.weight.detach().float()
    return weight.flatten(1) if isinstance(module, nn.Conv2d) else weight.reshape(-1, weight.shape[-1])


def _worst_sqnr_db(w: torch.Tensor, q: torch.Tensor) -> float:
    """The lowest signal-to-noise ratio (dB) over the nonzero rows of ``w`` quantized as ``q``."""
    signal, noise = w.double().pow(2).sum(1), (w - q).double().pow(2).sum(1).clamp_min(1e-300)
    return (10 * torch.log10(signal[signal > 0] / noise[signal > 0])).min().item() if (signal > 0).any() else 0.0


def weight_ranges(model: nn.Module, outlier_factor: float = 4.0, reduce_range: bool | None = None) -> list[WeightRange]:
    """A :class:`WeightRange` per layer with a weight matrix (FC3s, linear layers, convs) of a deploy form."""
    qmax = weight_qmax(reduce_range)
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2 or isinstance(module, FakeQuantFC3):
            continue
        rows = _output_rows(module)
        absw = rows.abs()
        channel_max = absw.amax(1)
        median_max = channel_max.median().clamp_min(1e-30)
        sample = absw.flatten()[torch.randperm(absw.numel(), generator=torch.Generator().manual_seed(0))[: 1 << 24]]
        tensor_scale = absw.max().clamp_min(1e-30) / qmax
        out.append(
            WeightRange(
                name,
                tuple(weight.shape),
                absw.max().item(),
                torch.quantile(sample, 0.999).item(),
                sample.median().item(),
                (channel_max.max() / median_max).item(),
                torch.nonzero(channel_max > outlier_factor * median_max).flatten().tolist(),
                _worst_sqnr_db(rows, fake_quantize_weight(rows, qmax)),
                _worst_sqnr_db(rows, torch.round(rows / tensor_scale).clamp(-qmax, qmax) * tensor_scale),
            )
        )
    return out


def format_ranges(ranges: list[WeightRange], outlier_factor: float = 4.0) -> str:
    """The ranges as a table, lowest per-channel SQNR (the most quantization-sensitive layers) marked."""
    head = (
        f"{'layer':52} {'shape':>18} {'max|w|':>8} {'p99.9':>8} {'median':>8} {'ch max/med':>10} "
        f"{'outlier ch':>10} {'SQNR ch dB':>10} {'tensor dB':>9}"
    )
    lines = [head, "-" * len(head)]
    worst = sorted(ranges, key=lambda r: r.sqnr_channel_db)[:3]
    for r in ranges:
        outliers = f"{len(r.outliers)}" + (
            f" ({','.join(map(str, r.outliers[:3]))}{',..' * (len(r.outliers) > 3)})" if r.outliers else ""
        )
        lines.append(
            f"{r.name[-52:]:52} {'x'.join(map(str, r.shape)):>18} {r.max_abs:>8.3g} {r.p999_abs:>8.3g} "
            f"{r.median_abs:>8.3g} {r.channel_ratio:>10.1f} {outliers:>10} {r.sqnr_channel_db:>10.1f} "
            f"{r.sqnr_tensor_db:>9.1f}" + ("  <- lowest" if r in worst else "")
        )
    lines.append(
        f"outlier ch: output channels whose max |w| exceeds {outlier_factor:g}x the median channel's; SQNR: int8 "
        "weight signal-to-noise of the worst output channel, with one scale per output channel (ch) or per tensor"
    )
    return "\n".join(lines)
