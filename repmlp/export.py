"""ONNX export of deploy forms, checked: rank <= 5 everywhere, onnxruntime reproduces PyTorch.

Runtimes such as ncnn and several NPU toolchains reject tensors of rank 6, which the usual partition code
(a 6-D reshape/permute) produces; our blocks partition with rank-5 tensors, and the export verifies that
every tensor of the graph (inputs, outputs, initializers, constants and every intermediate value after ONNX
shape inference) keeps to that. Needs the ``onnx`` extra (onnx, onnxruntime).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .convert import is_deploy_form
from .guards import atomic_write
from .int8 import QUANTIZE_MODES, Int8Check, compare_outputs, quantize_onnx
from .layers import graph_layout
from .models import model_input_size
from .onnx_io import onnx_predictor, write_onnx
from .quantize import resolve_reduce_range
from .verify import ErrorStats

MAX_RANK = 5


@dataclass
class ExportReport:
    """Outcome of :func:`export_onnx`."""

    path: str
    input_shape: tuple[int, ...]
    opset: int
    tensors: int
    max_rank: int
    max_rel_err: float  # float32 graph in onnxruntime against PyTorch
    quantize: str = "none"
    reduce_range: bool | None = None
    int8: Int8Check | None = None

    def __str__(self) -> str:
        text = (
            f"{self.path}: input {self.input_shape}, opset {self.opset}, {self.tensors} tensors of rank <= "
            f"{self.max_rank}, onnxruntime vs PyTorch max rel err {self.max_rel_err:.2e} (float32)"
        )
        if self.int8 is not None:
            weights = "7-bit (reduce_range)" if self.reduce_range else "8-bit"
            text += f"\n{self.quantize} int8, {weights} per-channel weights: {self.int8}"
        return text


def tensor_ranks(model) -> dict[str, int | None]:
    """Rank of every tensor of an ``onnx.ModelProto`` after shape inference (None where it stays unknown)."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    ranks: dict[str, int | None] = {}
    for info in itertools.chain(graph.input, graph.output, graph.value_info):
        tensor_type = info.type.tensor_type
        ranks[info.name] = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    ranks.update({init.name: len(init.dims) for init in graph.initializer})
    for node in graph.node:
        for out in node.output:
            ranks.setdefault(out, None)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                ranks[f"{node.name or node.op_type}.{attr.name}"] = len(attr.t.dims)
    return ranks


def check_ranks(model, max_rank: int = MAX_RANK) -> int:
    """The largest tensor rank of an ONNX model; raises ValueError above ``max_rank`` or where a rank is unknown."""
    return _checked_max_rank(tensor_ranks(model), max_rank)


def _checked_max_rank(ranks: dict[str, int | None], max_rank: int) -> int:
    too_high = {name: rank for name, rank in ranks.items() if rank is not None and rank > max_rank}
    unknown = [name for name, rank in ranks.items() if rank is None]
    if too_high:
        raise ValueError(
            f"ONNX graph has {len(too_high)} tensors of rank > {max_rank}, e.g. "
            f"{dict(itertools.islice(too_high.items(), 5))}"
        )
    if unknown:
        raise ValueError(f"ONNX shape inference left the rank of {len(unknown)} tensors unknown, e.g. {unknown[:5]}")
    return max(ranks.values(), default=0)


#: Opsets export_onnx writes: from 11 (the first whose shape inference gives every rank, which the rank check needs) to
#: the newest the TorchScript-based exporter supports.
OPSETS = range(11, getattr(getattr(torch.onnx, "_constants", None), "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20) + 1)


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    opset: int = 17,
    tolerance: float = 1e-4,
    seed: int = 0,
    quantize: str = "none",
    calibration: Iterable[torch.Tensor] = (),
    check_batches: Sequence[torch.Tensor] | None = None,
    check_data: str = "random",
    min_agreement: float = 0.97,
    reduce_range: bool | None = None,
    eager_layout: bool = False,
) -> ExportReport:
    """Export a deploy-form model at its fixed input size in the graph layout, optionally int8, and check the file.

    The file is written under a temporary name and renamed only once every check passed.

    Args:
        model: a deploy-form model (see :func:`repmlp.convert_to_deploy`), float32 on the CPU.
        path: the .onnx file to write.
        input_size: (C, H, W); default: the size the model is built for.
        batch_size: batch of the exported (static) input shape.
        opset: ONNX opset.
        tolerance: max relative error of onnxruntime (float32) against PyTorch on a random input.
        seed: seed of that input.
        quantize: 'none', or 'dynamic' / 'static' int8 by onnxruntime's tools (:func:`repmlp.int8.quantize_onnx`).
        calibration: input batches for 'static'.
        check_batches: inputs on which the int8 file is compared with the float32 one (default: the random input).
        check_data: what ``check_batches`` are, for the report.
        min_agreement: least argmax agreement of int8 with float32 on ``check_batches`` for the file to be written.
        reduce_range: 7-bit int8 weights (default: on CPUs without VNNI, see :func:`repmlp.quantize.weight_qmax`).
        eager_layout: export the layout eager PyTorch runs (batched matmuls) instead, to compare with.

    Returns:
        The report. Raises ValueError for a model with training-only modules left or a tensor of rank > 5,
        RuntimeError when onnxruntime disagrees with PyTorch or the int8 file with the float32 one; then nothing
        is written (the file is exported under a temporary name, checked, then renamed).
    """
    import onnx

    if not is_deploy_form(model):
        raise ValueError(
            "export_onnx: the model still has training-only modules (BatchNorm or blocks not "
            "re-parameterized); convert it with repmlp.convert_to_deploy first"
        )
    if opset not in OPSETS:
        raise ValueError(f"export_onnx: opset must be from {OPSETS.start} to {OPSETS.stop - 1}, got {opset}")
    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"export_onnx: quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    model = model.eval()
    shape = (batch_size, *(input_size or model_input_size(model)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    reduce_range = resolve_reduce_range(reduce_range)
    report = ExportReport(str(path), shape, opset, 0, 0, 0.0, quantize, reduce_range if quantize != "none" else None)

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(dir=Path(path).parent) as work:
            float_path = tmp if quantize == "none" else os.path.join(work, "float32.onnx")
            report.max_rel_err = _export_float(model, x, float_path, opset, tolerance, str(path), eager_layout)
            if quantize != "none":
                _quantize_checked(float_path, tmp, report, calibration, check_batches or [x], check_data, min_agreement)
            proto = onnx.load(tmp)
            onnx.checker.check_model(proto)
            ranks = tensor_ranks(proto)  # ONNX shape inference, once
            report.max_rank, report.tensors = _checked_max_rank(ranks, MAX_RANK), len(ranks)

    atomic_write(path, write)
    return report


def _export_float(
    model: nn.Module, x: torch.Tensor, path: str, opset: int, tolerance: float, target: str, eager_layout: bool
) -> float:
    """Export in the graph layout; the max relative error of onnxruntime against PyTorch (RuntimeError above
    ``tolerance``, naming ``target``, the file that is then not written)."""
    y = model(x)
    with contextlib.nullcontext() if eager_layout else graph_layout(model):
        write_onnx(model, x, path, opset)
    stats = ErrorStats.of(y, onnx_predictor(path)(x))
    if not stats.within(tolerance):  # NaN anywhere fails
        where = f" ({stats.describe_nonfinite()})" if stats.nonfinite else ""
        raise RuntimeError(
            f"export_onnx: onnxruntime output differs from PyTorch's: max rel err {stats.max_rel_err:.2e} > "
            f"{tolerance:.0e}{where} ({target} not written)"
        )
    return stats.max_rel_err


def _quantize_checked(
    float_path: str,
    path: str,
    report: ExportReport,
    calibration: Iterable[torch.Tensor],
    check_batches: Sequence[torch.Tensor],
    check_data: str,
    min_agreement: float,
) -> None:
    """Quantize ``float_path`` into ``path`` and compare the two in onnxruntime (RuntimeError below
    ``min_agreement``)."""
    quantize_onnx(float_path, path, report.quantize, calibration, report.reduce_range)
    report.int8 = compare_outputs(onnx_predictor(float_path), onnx_predictor(path), check_batches, check_data)
    if not report.int8.finite:
        raise RuntimeError(
            f"export_onnx: the {report.quantize} int8 model or its float32 form outputs non-finite values on "
            f"{check_data} inputs ({report.int8.describe_nonfinite()}); {report.path} not written"
        )
    if not report.int8.argmax_agreement >= min_agreement:
        raise RuntimeError(
            f"export_onnx: the {report.quantize} int8 model agrees with float32 on only "
            f"{report.int8.argmax_agreement:.2%} of {report.int8.count} {check_data} inputs "
            f"(< {min_agreement:.0%}); {report.path} not written"
        )
