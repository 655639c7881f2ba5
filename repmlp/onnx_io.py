"""ONNX primitives: write a model to ONNX, run an ONNX file in an onnxruntime CPU session."""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable

import torch
from torch import nn


@torch.no_grad()
def write_onnx(
    model: nn.Module, x: torch.Tensor, f: str | os.PathLike | io.BytesIO, opset: int = 17, dynamic_batch: bool = False
) -> None:
    """``torch.onnx.export`` of ``model`` traced on ``x`` (input ``input``, output ``output``), optionally with a
    dynamic batch dimension."""
    axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
    # The TorchScript-based exporter (deprecated in favour of the dynamo one, which needs onnxscript): shape checks
    # in forward() become constants of the fixed size, as intended.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (x,),
            f,
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            opset_version=opset,
            dynamic_axes=axes,
        )


def ort_session(model: str | os.PathLike | bytes, threads: int | None = None, profile_prefix: str | None = None):
    """A CPU onnxruntime session for an ONNX file or its bytes: ``threads`` intra-op threads (default PyTorch's),
    one inter-op thread, and threads that sleep between runs unless ``OMP_WAIT_POLICY=ACTIVE`` (onnxruntime's
    spin-waiting starves other processes on a shared machine and skews interleaved timings). With
    ``profile_prefix``, onnxruntime's profiler writes its trace there."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads or torch.get_num_threads(), 1
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "ACTIVE":
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix:
        options.enable_profiling, options.profile_file_prefix = True, profile_prefix
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_predictor(
    model: str | os.PathLike | bytes, threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> output`` through an :func:`ort_session` of an ONNX file or its bytes (input named ``input``)."""
    session = ort_session(model, threads)
    return lambda x: torch.from_numpy(session.run(None, {"input": x.detach().contiguous().numpy()})[0])


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (the graph's weights are not read)."""
    import onnx

    return {prop.key: prop.value for prop in onnx.load(str(path), load_external_data=False).metadata_props}


def set_onnx_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Record ``metadata`` in an ONNX file's ``metadata_props`` (replacing entries of the same keys), atomically."""
    import onnx

    from .guards import atomic_write

    proto = onnx.load(str(path))
    kept = {prop.key: prop.value for prop in proto.metadata_props if prop.key not in metadata}
    del proto.metadata_props[:]
    for key, value in {**kept, **metadata}.items():
        proto.metadata_props.add(key=key, value=str(value))
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
