"""Runtimes for a model, usually a deploy form: eager PyTorch, ``torch.compile`` and onnxruntime.

:func:`in_runtime` returns a callable that computes what the model computes in the chosen runtime, checked
against eager PyTorch on an example before it is handed out, with the seconds it took to build (export or
compile, and the first call):

- ``eager``: the model itself, called in inference mode.
- ``compile``: ``torch.compile`` with inductor and ``freezing`` on (weights folded into the compiled graph as
  constants, so oneDNN prepacks them once); the graph is specialised to the example's shape and is rebuilt for
  another batch size. Needs a C++ compiler on CPU. Later changes to the model's weights are not seen.
- ``onnxruntime``: the model exported to ONNX (:func:`repmlp.onnx_io.write_onnx`, dynamic batch) and run by
  an onnxruntime CPU session (:func:`repmlp.onnx_io.ort_session`) with the same number of threads as PyTorch,
  whose threads do not spin between runs unless ``OMP_WAIT_POLICY=ACTIVE``. Needs the ``onnx`` extra.
"""

from __future__ import annotations

__all__ = ["RUNTIMES", "RuntimeModel", "check_against_eager", "in_runtime"]

import io
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .onnx_io import onnx_predictor, write_onnx
from .verify import TOLERANCES, ErrorStats

RUNTIMES = ("eager", "compile", "onnxruntime")


@dataclass
class RuntimeModel:
    """A model in a runtime; call it like the model (inference only)."""

    runtime: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    build_s: float  # export or compile, and the first call on the example
    max_rel_err: float  # against eager PyTorch on the example

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _eager(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    return run


def _compiled(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), inductor_config.patch(freezing=True):
            return compiled(x)

    return run


def _onnxruntime(model: nn.Module, example: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    if example.device.type != "cpu":
        raise ValueError(f"the onnxruntime runtime runs on the CPU; got an example on {example.device}")
    graph = io.BytesIO()
    write_onnx(model, example, graph, dynamic_batch=True)
    return onnx_predictor(graph.getvalue())


_BUILDERS = {"eager": _eager, "compile": _compiled, "onnxruntime": _onnxruntime}


def check_against_eager(
    model: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tolerance: float | None = None
) -> float:
    """Max relative error of ``fn(x)`` against ``model(x)`` in eager PyTorch; RuntimeError above ``tolerance``
    (default: :data:`repmlp.verify.TOLERANCES` of ``x``'s dtype)."""
    with torch.inference_mode():
        reference = model(x)
    err = ErrorStats.of(reference, fn(x)).max_rel_err
    tolerance = TOLERANCES.get(x.dtype, 1e-5) if tolerance is None else tolerance
    if not err <= tolerance:
        raise RuntimeError(
            f"the runtime's outputs differ from eager PyTorch's: max rel err {err:.2e} > {tolerance:.0e}"
        )
    return err


def in_runtime(model: nn.Module, runtime: str, example: torch.Tensor, tolerance: float | None = None) -> RuntimeModel:
    """``model`` (put in eval mode) run by ``runtime``, one of :data:`RUNTIMES`, checked on ``example``.

    Args:
        model: the model, usually a deploy form (:func:`repmlp.convert_to_deploy`).
        runtime: ``'eager'``, ``'compile'`` or ``'onnxruntime'``.
        example: an input of the shape, dtype and device it will be called with (``compile`` specialises to it).
        tolerance: max relative error against eager PyTorch; default by the example's dtype.

    Returns:
        The callable; RuntimeError when its outputs on ``example`` differ from eager PyTorch's.
    """
    if runtime not in _BUILDERS:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    model.eval()
    start = time.perf_counter()
    fn = _BUILDERS[runtime](model, example)
    fn(example)
    build_s = time.perf_counter() - start
    return RuntimeModel(runtime, fn, build_s, check_against_eager(model, fn, example, tolerance))
