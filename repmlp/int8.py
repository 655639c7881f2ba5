"""Int8 deploy forms: onnxruntime's dynamic and static quantization, PyTorch's x86 int8 path (PT2E, torchao), the
calibration data, the checks of int8 against float32, and the weight ranges that decide how well it goes.

Models are quantized in the graph layout (:func:`repmlp.layers.graph_layout`): FC3 as one linear layer per group, so
that each group gets its own per-output-channel scales. The scheme is the one :mod:`repmlp.quantize` simulates.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .layers import graph_layout
from .onnx_io import ort_session
from .quantize import FakeQuantFC3, fake_quantize_weight, resolve_reduce_range, weight_qmax
from .verify import Agreement, compare_predictors

QUANTIZE_MODES = ("none", "dynamic", "static")


# ------------------------------------------------------------------------------------------ calibration data


def data_batches(
    spec: str, model: nn.Module, batch_size: int, samples: int, split: str = "train", seed: int = 0
) -> list[torch.Tensor]:
    """``samples`` inputs (whole batches of ``batch_size``) for calibration or checks, from a dataset spec.

    ``spec``: ``'random'`` (seeded standard-normal inputs of the model's size) or ``DATASET[:ROOT]`` with a dataset
    name the training configs take (``fashion_mnist``, ``cifar10:data/cifar-10-batches-py``, ``imagefolder:DIR``,
    ``tar:DIR``, ``wds/NAME:DIR``); images get the model's evaluation transform and are drawn at random (seeded) from
    ``split`` (WebDataset shards, without random access: the first ones in shard order).
    """
    from timm.data import resolve_data_config

    from .data import DATASETS, TIMM_SPECS, build_dataset, build_transform
    from .data_timm import is_timm_spec
    from .models import model_input_size

    count = max(1, samples // batch_size) * batch_size
    gen = torch.Generator().manual_seed(seed)
    if spec == "random":
        return list(torch.randn((count, *model_input_size(model)), generator=gen).split(batch_size))
    name, _, root = spec.partition(":")
    if name not in DATASETS and not is_timm_spec(name):
        raise ValueError(
            f"calibration data {spec!r}: expected 'random' or DATASET[:ROOT] with DATASET one of "
            f"{DATASETS} or a timm spec {TIMM_SPECS}, e.g. 'fashion_mnist' or 'imagefolder:data/imagenet'"
        )
    cfg = resolve_data_config({}, model=model)
    dataset = build_dataset(
        name,
        split,
        root or None,
        transform=build_transform(
            False, cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]
        ),
    )
    if len(dataset) < count:
        raise ValueError(f"calibration data {spec!r} has {len(dataset)} {split} images, fewer than the {count} asked")
    if isinstance(dataset, torch.utils.data.IterableDataset):  # WebDataset shards: the first images, in shard order
        images = torch.stack([image for image, _ in itertools.islice(dataset, count)])
    else:
        images = torch.stack([dataset[i][0] for i in torch.randperm(len(dataset), generator=gen)[:count].tolist()])
    return list(images.split(batch_size))


# ------------------------------------------------------------------------------------------------ onnxruntime


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    mode: str,
    calibration: Iterable[torch.Tensor] = (),
    reduce_range: bool | None = None,
) -> None:
    """Write the int8 version of the float32 ONNX file ``src`` to ``dst`` with onnxruntime's quantization tools.

    ``dynamic``: weights int8 per output channel, activations quantized per batch at run time (MatMulInteger,
    ConvInteger). ``static``: activation ranges calibrated (min/max) on ``calibration`` inputs, QDQ format
    (onnxruntime fuses it into QLinear kernels; its QOperator format gave wrong outputs for these graphs).
    Matrix products with a batched (3-D) constant weight stay float32: onnxruntime's per-channel scales are per
    column of the last axis, shared across the batch, which its int8 kernels then reject.
    """
    import logging

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in ("dynamic", "static"):
        raise ValueError(f"quantize mode must be 'dynamic' or 'static', got {mode!r}")
    common = dict(
        per_channel=True,
        reduce_range=resolve_reduce_range(reduce_range),
        weight_type=QuantType.QInt8,
        nodes_to_exclude=batched_weight_products(src),
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            x = next(self.batches, None)
            return None if x is None else {"input": x.numpy()}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing (shape inference), which the export has done
    try:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), **common)
        else:
            static = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8)
            quantize_static(str(src), str(dst), Reader(), calibrate_method=CalibrationMethod.MinMax, **static, **common)
    finally:
        root.setLevel(level)


def batched_weight_products(path: str | Path) -> list[str]:
    """Names of the MatMul nodes of an ONNX file whose constant operand has rank 3 (small shared FC3s, see
    :class:`repmlp.models.repmlpnet.SharedFC`)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(ranks.get(i) == 3 for i in n.input)]


@dataclass
class Int8Check(Agreement):
    """Agreement of an int8 model with its float32 form on the same inputs (:func:`repmlp.verify.compare_predictors`)
    and what those inputs were."""

    data: str = ""

    def __str__(self) -> str:
        return (
            f"int8 vs float32 on {self.count} {self.data} inputs: argmax agreement {self.argmax_agreement:.2%}, "
            f"max rel err {self.max_rel_err:.2e}"
        )


def compare_outputs(reference, candidate, batches: Iterable[torch.Tensor], data: str) -> Int8Check:
    """:func:`repmlp.verify.compare_predictors` of two predictors (tensor -> logits) on ``batches``, labelled with
    what the inputs were."""
    return Int8Check(**vars(compare_predictors(reference, candidate, batches)), data=data)


def profile_onnx(path: str | Path, x: torch.Tensor, runs: int = 5, threads: int | None = None) -> dict[str, float]:
    """Milliseconds per run spent in each operator type of an ONNX file in onnxruntime (its profiler, after the
    graph optimizations: fused and quantized kernels appear under their own names), largest first."""
    import json

    session = ort_session(path, threads, profile_prefix=str(Path(path).with_suffix("")) + "_profile")
    for _ in range(runs + 1):  # the first run warms up and is not counted
        session.run(None, {"input": x.numpy()})
    trace = Path(session.end_profiling())  # the profiler's JSON, written next to the model
    events = json.loads(trace.read_text())
    trace.unlink()
    run_events = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    counted_from = run_events[0]["ts"] + run_events[0]["dur"]
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= counted_from:
            totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------------------------- PyTorch int8


def quantize_pytorch(
    model: nn.Module,
    example: torch.Tensor,
    mode: str,
    calibration: Iterable[torch.Tensor] = (),
    reduce_range: bool | None = None,
    compile: bool = True,
):
    """An int8 version of a deploy-form model for the CPU: PT2E quantization (torchao) with the x86 inductor quantizer.

    The model is exported (``torch.export``, fixed to ``example``'s shape) in the graph layout, so every FC3
    group, FC and conv is a linear or conv node the quantizer annotates (weights int8 per output channel,
    activations uint8 per tensor: calibrated for ``static``, per batch for ``dynamic``); ``compile`` lowers it with
    inductor (freezing on) to oneDNN int8 kernels, otherwise the reference (simulated) int8 module is returned.
    ``reduce_range`` (default: on CPUs without VNNI) keeps activations to 7 bits, this quantizer's remedy for the
    saturation of u8 x s8 int16 sums.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if mode not in ("dynamic", "static"):
        raise ValueError(f"quantize mode must be 'dynamic' or 'static', got {mode!r}")
    reduce_range = resolve_reduce_range(reduce_range)

    class Quantizer(x86.X86InductorQuantizer):
        """Convs quantized on their own, not fused with a following residual add: inductor's int8 conv + add
        fusion asserts when the residual is a view (RepMLPNet's units, torch 2.14)."""

        def _annotate_conv2d_binary_unary(self, *args, **kwargs) -> None:
            pass

        def _annotate_conv2d_binary(self, *args, **kwargs) -> None:
            pass

    quantizer = Quantizer().set_global(
        x86.get_default_x86_inductor_quantization_config(is_dynamic=mode == "dynamic", reduce_range=reduce_range)
    )
    prepared = prepare_pt2e(export_graph(model, example), quantizer)
    with torch.no_grad():
        for x in calibration if mode == "static" else [example]:
            prepared(x)
    converted = convert_pt2e(prepared)
    return compile_frozen(converted, example) if compile else converted


def export_graph(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """``torch.export`` of ``model`` in the graph layout, fixed to ``example``'s shape (as an ``nn.Module``)."""
    with torch.no_grad(), graph_layout(model.eval()):
        return torch.export.export(model, (example,)).module()


def compile_frozen(graph: nn.Module, example: torch.Tensor):
    """``torch.compile`` (inductor) of an exported graph, compiled now on ``example`` with its weights frozen into
    the graph (prepacked for oneDNN)."""
    compiled = torch.compile(graph)
    # freezing as a torch.compile option instead fails on quantized convs in torch 2.14
    with torch._inductor.config.patch(freezing=True), torch.no_grad():
        compiled(example)
    return compiled


class FixedBatch(nn.Module):
    """A ``tensor -> logits`` callable fixed to one batch size (an onnxruntime session, a compiled int8 graph) as a
    module that takes any batch: inputs run in chunks of ``batch_size``, the last one zero-padded; a callable that
    takes any batch (``batch_size`` None) is called as it is."""

    def __init__(self, predict, batch_size: int | None) -> None:
        super().__init__()
        object.__setattr__(self, "predict", predict)  # not a submodule: exported graphs refuse train()/eval()
        self.batch_size = batch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None:
            return self.predict(x)
        outs = []
        for chunk in x.split(self.batch_size):
            n = chunk.shape[0]
            if n < self.batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(self.batch_size - n, *chunk.shape[1:])])
            outs.append(self.predict(chunk)[:n])
        return torch.cat(outs)


def onnx_batch_size(path: str | Path) -> int | None:
    """The static batch of an ONNX file's input; None for a dynamic batch."""
    import onnx

    dim = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") else None


# -------------------------------------------------------------------------------------- weight range report


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
