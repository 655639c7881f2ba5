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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .convert import is_deploy_form
from .models import model_input_size
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
    max_rel_err: float

    def __str__(self) -> str:
        return (f"{self.path}: input {self.input_shape}, opset {self.opset}, {self.tensors} tensors of rank <= "
                f"{self.max_rank}, onnxruntime vs PyTorch max rel err {self.max_rel_err:.2e}")


@contextlib.contextmanager
def graph_layout(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model``'s layers that have a ``graph_layout`` run in it: FC3 as one linear layer per
    group, 1x1 convs as Conv2d (see :class:`repmlp.layers.GroupedLinear`). Same function, the layout that graph
    runtimes (onnxruntime, torch.export + inductor) run fast and int8 tools quantize."""
    modules = [m for m in model.modules() if hasattr(type(m), "graph_layout")]
    saved = [m.graph_layout for m in modules]
    for m in modules:
        m.graph_layout = True
    try:
        yield model
    finally:
        for m, value in zip(modules, saved):
            m.graph_layout = value


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
    ranks = tensor_ranks(model)
    too_high = {name: rank for name, rank in ranks.items() if rank is not None and rank > max_rank}
    unknown = [name for name, rank in ranks.items() if rank is None]
    if too_high:
        raise ValueError(f"ONNX graph has {len(too_high)} tensors of rank > {max_rank}, e.g. "
                         f"{dict(itertools.islice(too_high.items(), 5))}")
    if unknown:
        raise ValueError(f"ONNX shape inference left the rank of {len(unknown)} tensors unknown, e.g. {unknown[:5]}")
    return max(ranks.values(), default=0)


@torch.no_grad()
def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: tuple[int, int, int] | None = None,
    batch_size: int = 1,
    opset: int = 17,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> ExportReport:
    """Export a deploy-form model at its fixed input size and check the file.

    Args:
        model: a deploy-form model (see :func:`repmlp.convert_to_deploy`), float32 on the CPU.
        path: the .onnx file to write.
        input_size: (C, H, W); default: the size the model is built for.
        batch_size: batch of the exported (static) input shape.
        opset: ONNX opset.
        tolerance: max relative error of onnxruntime against PyTorch on a random input.
        seed: seed of that input.

    Returns:
        The report. Raises ValueError for a model with training-only modules left or a tensor of rank > 5,
        RuntimeError when onnxruntime disagrees with PyTorch.
    """
    import onnx
    import onnxruntime

    if not is_deploy_form(model):
        raise ValueError("export_onnx: the model still has training-only modules (BatchNorm or blocks not "
                         "re-parameterized); convert it with repmlp.convert_to_deploy first")
    model = model.eval()
    shape = (batch_size, *(input_size or model_input_size(model)))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    y = model(x)
    # The TorchScript-based exporter (deprecated in favour of the dynamo one, which needs onnxscript): shape checks
    # in forward() become constants of the fixed size, as intended.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                          opset_version=opset)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    max_rank = check_ranks(proto)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y_ort = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    err = ErrorStats.of(y, y_ort).max_rel_err
    if err > tolerance:
        raise RuntimeError(f"export_onnx: onnxruntime output differs from PyTorch's: max rel err {err:.2e} > "
                           f"{tolerance:.0e} ({path})")
    return ExportReport(str(path), shape, opset, len(tensor_ranks(proto)), max_rank, err)
