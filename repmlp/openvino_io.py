"""OpenVINO primitives: a model converted to OpenVINO (graph layout, dynamic batch), compiled for the CPU with its
threads, streams and precision set explicitly, written as IR (``.xml`` with its ``.bin``). Needs the ``openvino``
extra."""

from __future__ import annotations

__all__ = ["PRECISIONS", "check_precision", "compile_openvino", "openvino_predictor", "to_openvino", "write_openvino"]

import os
import warnings
from collections.abc import Callable

import torch
from torch import nn

from .layers import graph_layout

#: OpenVINO's inference precision per torch dtype (its ``INFERENCE_PRECISION_HINT``).
PRECISIONS = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}


@torch.no_grad()
def to_openvino(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True):
    """``openvino.convert_model`` of a float32 ``model`` in the graph layout (FC3 as one linear layer per group, as
    for ONNX), traced on ``example``; the batch dimension free unless ``dynamic_batch`` is False."""
    import openvino as ov

    shape = [-1 if dynamic_batch else example.shape[0], *example.shape[1:]]
    with warnings.catch_warnings(), graph_layout(model.eval()):
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return ov.convert_model(model, example_input=example, input=[ov.PartialShape(shape)])


def compile_openvino(model, threads: int | None = None, dtype: torch.dtype = torch.float32):
    """An OpenVINO model (or the path of an IR ``.xml``) compiled for the CPU: ``threads`` inference threads
    (default PyTorch's), one stream, the latency hint, no core pinning, and ``dtype``'s inference precision.

    OpenVINO quietly runs float32 where the CPU lacks the hinted precision (bf16 needs AVX512-BF16 or AMX): that
    is refused here (ValueError), so that a figure labelled bf16 is never float32's.
    """
    import openvino as ov

    check_precision(dtype)
    config = {
        "INFERENCE_NUM_THREADS": threads or torch.get_num_threads(),
        "NUM_STREAMS": 1,
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": False,  # a shared machine: threads are not bound to cores
        "INFERENCE_PRECISION_HINT": PRECISIONS[dtype],
    }
    compiled = ov.Core().compile_model(str(model) if isinstance(model, (str, os.PathLike)) else model, "CPU", config)
    _refuse_other_precision(compiled.get_property("INFERENCE_PRECISION_HINT").to_string(), dtype)
    return compiled


def check_precision(dtype: torch.dtype) -> None:
    """ValueError unless OpenVINO's CPU plugin runs ``dtype`` on this CPU (before any conversion is spent)."""
    import openvino as ov

    if dtype not in PRECISIONS:
        raise ValueError(f"OpenVINO precisions: {', '.join(map(str, PRECISIONS))}; got {dtype}")
    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    needs = {torch.bfloat16: "BF16", torch.float16: "FP16"}.get(dtype)  # the plugin's names for them
    if needs is not None and needs not in capabilities:
        _refuse_other_precision("f32", dtype, capabilities)


def _refuse_other_precision(runs: str, dtype: torch.dtype, capabilities: list[str] | None = None) -> None:
    if runs != PRECISIONS[dtype]:
        import openvino as ov

        capabilities = capabilities or ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        raise ValueError(
            f"OpenVINO runs {runs} on this CPU when asked for {PRECISIONS[dtype]} (its capabilities: "
            f"{', '.join(capabilities)}; bf16 needs AVX512-BF16 or AMX)"
        )


def openvino_predictor(
    model, threads: int | None = None, dtype: torch.dtype = torch.float32
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> output`` (float32 tensors) through :func:`compile_openvino` of an OpenVINO model or IR path."""
    compiled = compile_openvino(model, threads, dtype)
    request = compiled.create_infer_request()  # one request, reused: no per-call setup
    return lambda x: torch.from_numpy(request.infer([x.detach().float().contiguous().numpy()])[0].copy())


def write_openvino(model, path: str | os.PathLike) -> None:
    """Write an OpenVINO model as IR: ``path`` (``.xml``) and the weights beside it (``.bin``), float32 weights
    kept (no compression to float16)."""
    import openvino as ov

    ov.save_model(model, str(path), compress_to_fp16=False)
