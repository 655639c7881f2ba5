"""Runtimes for a model, usually a deploy form: eager PyTorch, ``torch.compile``, onnxruntime and OpenVINO, in a
chosen precision.

:func:`in_runtime` returns a callable that computes what the model computes in the chosen runtime and dtype, checked
against eager PyTorch (the model as given) on an example before it is handed out, with the tolerance of the dtype it
runs in, and with the seconds it took to build (export or compile, and the first call):

- ``eager``: the model itself, called in inference mode.
- ``compile``: ``torch.compile`` with inductor and ``freezing`` on (weights folded into the compiled graph as
  constants, so oneDNN prepacks them once); the graph is specialised to the example's shape and is rebuilt for
  another batch size. Needs a C++ compiler on CPU. Later changes to the model's weights are not seen.
- ``onnxruntime``: the model exported to ONNX (:func:`repmlp.onnx_io.write_onnx`, dynamic batch) and run by
  an onnxruntime CPU session (:func:`repmlp.onnx_io.ort_session`) with the same number of threads as PyTorch,
  whose threads do not spin between runs unless ``OMP_WAIT_POLICY=ACTIVE``. float32 only. Needs the ``onnx`` extra.
- ``openvino``: the model converted by ``openvino.convert_model`` (:mod:`repmlp.openvino_io`, dynamic batch) and
  compiled for the CPU with the same number of threads, one stream, the latency hint and the dtype's inference
  precision, refused where the CPU would quietly run another (bf16 needs AVX512-BF16 or AMX). Needs the
  ``openvino`` extra.

In another dtype than the model's (``dtype=torch.bfloat16`` of a float32 deploy form), PyTorch runs a copy of the
model cast once to it; onnxruntime and OpenVINO take float32 inputs and weights and compute in their precision.
Inputs are cast to what the runtime takes; outputs come in the runtime's dtype.
"""

from __future__ import annotations

__all__ = ["RUNTIMES", "RuntimeModel", "check_against_eager", "in_runtime"]

import copy
import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .onnx_io import onnx_predictor, write_onnx
from .verify import TOLERANCES, ErrorStats

RUNTIMES = ("eager", "compile", "onnxruntime", "openvino")


@dataclass
class RuntimeModel:
    """A model in a runtime; call it like the model (inference only)."""

    runtime: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    build_s: float  # export or compile, and the first call on the example
    max_rel_err: float  # against eager PyTorch (the model as given) on the example
    dtype: torch.dtype = torch.float32  # the precision it computes in

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _param_dtype(model: nn.Module) -> torch.dtype:
    return next(iter(model.parameters()), torch.empty(0)).dtype


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model`` itself in ``dtype``, else a copy cast once to it (the caller's model is never cast)."""
    return model if _param_dtype(model) == dtype else copy.deepcopy(model).to(dtype)


def _eager(model: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    model = _in_dtype(model, dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x.to(dtype))

    return run


def _compiled(model: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch._inductor.config as inductor_config

    compiled = torch.compile(_in_dtype(model, dtype), dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return compiled(x.to(dtype))

    return run


def _float32_on_cpu(runtime: str, model: nn.Module, example: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """The model and example as a graph runtime takes them: float32, on the CPU."""
    if example.device.type != "cpu":
        raise ValueError(f"the {runtime} runtime runs on the CPU; got an example on {example.device}")
    return _in_dtype(model, torch.float32), example.float()


def _onnxruntime(model: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    if dtype != torch.float32:
        raise ValueError(f"the onnxruntime runtime runs float32 here (its CPU kernels); got dtype {dtype}")
    model, example = _float32_on_cpu("onnxruntime", model, example)
    graph = io.BytesIO()
    write_onnx(model, example, graph, dynamic_batch=True)
    predict = onnx_predictor(graph.getvalue())
    return lambda x: predict(x.float())


def _openvino(model: nn.Module, example: torch.Tensor, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    from .openvino_io import check_precision, openvino_predictor, to_openvino

    check_precision(dtype)
    model, example = _float32_on_cpu("openvino", model, example)
    return openvino_predictor(to_openvino(model, example), dtype=dtype)


_BUILDERS = {"eager": _eager, "compile": _compiled, "onnxruntime": _onnxruntime, "openvino": _openvino}


def check_against_eager(
    model: nn.Module,
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    tolerance: float | None = None,
    dtype: torch.dtype | None = None,
) -> float:
    """Max relative error of ``fn(x)`` against ``model(x)`` in eager PyTorch (``x`` cast to the model's dtype);
    RuntimeError above ``tolerance``, or where an output is not finite. Default tolerance:
    :data:`repmlp.verify.TOLERANCES` of the least precise of ``dtype`` (the runtime's, default ``x``'s), ``x``'s
    and the model's dtype."""
    with torch.inference_mode():
        reference = model(x.to(_param_dtype(model)))
        out = fn(x)
    err = ErrorStats.of(reference, out).max_rel_err
    if tolerance is None:
        tolerance = max(TOLERANCES.get(d, 1e-5) for d in (dtype or x.dtype, x.dtype, _param_dtype(model)))
    if not bool(torch.isfinite(out).all()) or not err <= tolerance:
        raise RuntimeError(
            f"the runtime's outputs differ from eager PyTorch's: max rel err {err:.2e} > {tolerance:.0e}"
            + ("" if bool(torch.isfinite(out).all()) else " (non-finite outputs)")
        )
    return err


def in_runtime(
    model: nn.Module,
    runtime: str,
    example: torch.Tensor,
    tolerance: float | None = None,
    dtype: torch.dtype | None = None,
) -> RuntimeModel:
    """``model`` (put in eval mode) run by ``runtime``, one of :data:`RUNTIMES`, in ``dtype``, checked on ``example``.

    Args:
        model: the model, usually a deploy form (:func:`repmlp.convert_to_deploy`); never cast itself.
        runtime: ``'eager'``, ``'compile'``, ``'onnxruntime'`` or ``'openvino'``.
        example: an input of the shape and device it will be called with (``compile`` specialises to it).
        tolerance: max relative error against eager PyTorch running ``model`` as given; default:
            :data:`repmlp.verify.TOLERANCES` of the least precise dtype involved.
        dtype: the precision to compute in (float32, bfloat16, float16; onnxruntime: float32); default the
            example's.

    Returns:
        The callable; RuntimeError when its outputs on ``example`` differ from eager PyTorch's or are not finite,
        ValueError for a runtime that cannot run ``dtype`` here.
    """
    if runtime not in _BUILDERS:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    dtype = dtype or example.dtype
    model.eval()
    start = time.perf_counter()
    fn = _BUILDERS[runtime](model, example, dtype)
    fn(example)
    build_s = time.perf_counter() - start
    return RuntimeModel(runtime, fn, build_s, check_against_eager(model, fn, example, tolerance, dtype), dtype)
