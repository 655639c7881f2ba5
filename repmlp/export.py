"""ONNX export of deploy forms, checked: rank <= 5 everywhere, onnxruntime reproduces PyTorch at any batch.

Runtimes such as ncnn and several NPU toolchains reject tensors of rank 6, which the usual partition code
(a 6-D reshape/permute) produces; our blocks partition with rank-5 tensors, and the export verifies that
every tensor of the graph (inputs, outputs, initializers, constants and every intermediate value after ONNX
shape inference) keeps to that. Needs the ``onnx`` extra (onnx, onnxruntime).
"""

from __future__ import annotations

__all__ = [
    "MAX_RANK",
    "OPSETS",
    "ExportReport",
    "OpenVINOReport",
    "check_ranks",
    "export_onnx",
    "export_openvino",
    "tensor_ranks",
]

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
from .layers import graph_layout
from .models import model_input_size
from .onnx_io import onnx_predictor, write_onnx
from .quantize.ort import QUANTIZE_MODES, Int8Check, quantize_checked
from .quantize.scheme import resolve_reduce_range
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
    dynamic_batch: bool = True  # the batch dimension is free (checked at input_shape[0] and one more)
    quantize: str = "none"
    reduce_range: bool | None = None
    int8: Int8Check | None = None

    def __str__(self) -> str:
        batch = f"any batch (checked at {self.input_shape[0]} and {self.input_shape[0] + 1})"
        shape = f"(N, {', '.join(map(str, self.input_shape[1:]))}), {batch}" if self.dynamic_batch else self.input_shape
        text = (
            f"{self.path}: input {shape}, opset {self.opset}, {self.tensors} tensors of rank <= "
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
    dynamic_batch: bool = True,
) -> ExportReport:
    """Export a deploy-form model at its input size in the graph layout, optionally int8, and check the file.

    The file is written under a temporary name and renamed only once every check passed.

    Args:
        model: a deploy-form model (see :func:`repmlp.convert_to_deploy`), float32 on the CPU.
        path: the .onnx file to write.
        input_size: (C, H, W); default: the size the model is built for.
        batch_size: batch of the example the export traces and checks (and of the input shape if not
            ``dynamic_batch``).
        opset: ONNX opset.
        tolerance: max relative error of onnxruntime (float32) against PyTorch on a random input.
        seed: seed of that input.
        quantize: 'none', or 'dynamic' / 'static' int8 by onnxruntime's tools (:func:`repmlp.quantize.quantize_onnx`).
        calibration: input batches for 'static'.
        check_batches: inputs on which the int8 file is compared with the float32 one (default: the random input).
        check_data: what ``check_batches`` are, for the report.
        min_agreement: least argmax agreement of int8 with float32 on ``check_batches`` for the file to be written.
        reduce_range: 7-bit int8 weights (default: on CPUs without VNNI, see :func:`repmlp.quantize.weight_qmax`).
        eager_layout: export the layout eager PyTorch runs (batched matmuls) instead, to compare with.
        dynamic_batch: a free batch dimension (as timm's ONNX export writes it), checked in onnxruntime at
            ``batch_size`` and ``batch_size + 1``; else the batch is fixed to ``batch_size``.

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
    reduce_range = reduce_range if quantize != "none" else None
    report = ExportReport(str(path), shape, opset, 0, 0, 0.0, dynamic_batch, quantize, reduce_range)

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(dir=Path(path).parent) as work:
            float_path = tmp if quantize == "none" else os.path.join(work, "float32.onnx")
            report.max_rel_err = _export_float(
                model, x, float_path, opset, tolerance, str(path), eager_layout, dynamic_batch, seed
            )
            if quantize != "none":
                checks = check_batches or [x]
                report.int8 = quantize_checked(
                    float_path, tmp, quantize, calibration, reduce_range, checks, check_data, min_agreement, str(path)
                )
            proto = onnx.load(tmp)
            onnx.checker.check_model(proto)
            ranks = tensor_ranks(proto)  # ONNX shape inference, once
            report.max_rank, report.tensors = _checked_max_rank(ranks, MAX_RANK), len(ranks)

    atomic_write(path, write)
    return report


def _export_float(
    model: nn.Module,
    x: torch.Tensor,
    path: str,
    opset: int,
    tolerance: float,
    target: str,
    eager_layout: bool,
    dynamic_batch: bool = True,
    seed: int = 0,
) -> float:
    """Export in the graph layout; the max relative error of onnxruntime against PyTorch (RuntimeError above
    ``tolerance``, naming ``target``, the file that is then not written), on ``x`` and, for a dynamic batch, on a
    batch one larger."""
    with contextlib.nullcontext() if eager_layout else graph_layout(model):
        write_onnx(model, x, path, opset, dynamic_batch=dynamic_batch)
    checks = [x]
    if dynamic_batch:
        checks.append(torch.randn((x.shape[0] + 1, *x.shape[1:]), generator=torch.Generator().manual_seed(seed + 1)))
    predict = onnx_predictor(path)
    errors = []
    for c in checks:
        stats = ErrorStats.of(model(c), predict(c))
        if not stats.within(tolerance):  # NaN anywhere fails
            where = f" ({stats.describe_nonfinite()})" if stats.nonfinite else ""
            raise RuntimeError(
                f"export_onnx: onnxruntime output differs from PyTorch's at batch {c.shape[0]}: max rel err "
                f"{stats.max_rel_err:.2e} > {tolerance:.0e}{where} ({target} not written)"
            )
        errors.append(stats.max_rel_err)
    return max(errors)


@dataclass
class OpenVINOReport:
    """Outcome of :func:`export_openvino`."""

    path: str
    input_shape: tuple[int, ...]
    dynamic_batch: bool
    max_rel_err: float  # the IR in OpenVINO (float32) against PyTorch

    def __str__(self) -> str:
        batch = f"any batch (checked at {self.input_shape[0]} and {self.input_shape[0] + 1})"
        shape = f"(N, {', '.join(map(str, self.input_shape[1:]))}), {batch}" if self.dynamic_batch else self.input_shape
        return (
            f"{self.path} (+ {Path(self.path).with_suffix('.bin').name}): OpenVINO IR, input {shape}, "
            f"OpenVINO (f32) vs PyTorch max rel err {self.max_rel_err:.2e}"
        )


@torch.no_grad()
def export_openvino(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    tolerance: float = 1e-4,
    seed: int = 0,
    dynamic_batch: bool = True,
    metadata: dict[str, str] | None = None,
) -> OpenVINOReport:
    """Write a deploy-form model as OpenVINO IR (``path``, an ``.xml``, and its ``.bin``) and check it.

    Converted by ``openvino.convert_model`` in the graph layout (:func:`repmlp.openvino_io.to_openvino`), written with
    float32 weights, read back and run in OpenVINO in float32 against PyTorch at ``batch_size`` (and one more for a
    dynamic batch); both files are renamed into place only once that passed. Needs the ``openvino`` extra.

    Args:
        model: a deploy-form model, float32 on the CPU.
        path: the ``.xml`` file to write (the weights go to the same name with ``.bin``).
        input_size: (C, H, W); default: the size the model is built for.
        batch_size: batch of the example converted and checked.
        tolerance: max relative error of OpenVINO against PyTorch.
        seed: seed of the random inputs.
        dynamic_batch: a free batch dimension; else fixed to ``batch_size``.
        metadata: what predicting needs (:mod:`repmlp.preprocess`), kept in the IR's ``rt_info`` section ``repmlp``.

    Returns:
        The report. ValueError for a model with training-only modules or a path not ending in ``.xml``,
        RuntimeError when OpenVINO disagrees with PyTorch (then nothing is written).
    """
    from .openvino_io import openvino_predictor, to_openvino, write_openvino
    from .preprocess import set_openvino_metadata

    if not is_deploy_form(model):
        raise ValueError("export_openvino: the model still has training-only modules; convert it first")
    path = Path(path)
    if path.suffix != ".xml":
        raise ValueError(f"export_openvino writes OpenVINO IR: name the file *.xml, got {str(path)!r}")
    model = model.eval()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *(input_size or model_input_size(model))), generator=gen)
    checks = [x, torch.randn((batch_size + 1, *x.shape[1:]), generator=gen)] if dynamic_batch else [x]
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        tmp = Path(work) / "model.xml"
        ov_model = to_openvino(model, x, dynamic_batch)
        set_openvino_metadata(ov_model, metadata or {})
        write_openvino(ov_model, tmp)
        predict = openvino_predictor(tmp, dtype=torch.float32)
        err = max(ErrorStats.of(model(c), predict(c)).max_rel_err for c in checks)
        if not err <= tolerance:
            raise RuntimeError(
                f"export_openvino: OpenVINO's output differs from PyTorch's: max rel err {err:.2e} > "
                f"{tolerance:.0e} ({path} not written)"
            )
        os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))  # the weights first: the .xml names a model
        os.replace(tmp, path)
    return OpenVINOReport(str(path), tuple(x.shape), dynamic_batch, err)
