"""ONNX primitives: write a model to ONNX, run an ONNX file in an onnxruntime CPU session."""

from __future__ import annotations

__all__ = [
    "load_onnx",
    "onnx_batch_size",
    "onnx_input",
    "onnx_metadata",
    "onnx_predictor",
    "ort_session",
    "set_onnx_metadata",
    "write_onnx",
]

import io
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .locations import regular_file

_GIVE = "give a .onnx file tools/export_onnx.py wrote"


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
    if isinstance(model, bytes):
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    regular_file(model, "ONNX file", _GIVE)
    source: str | bytes = str(model)
    if source != source.encode("utf-8", "replace").decode():  # a name that is not UTF-8, which onnxruntime refuses:
        source = Path(model).read_bytes()  # the file's bytes (external data beside it is then not found)
    try:
        return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except _ort_errors() as err:
        raise ValueError(f"{model} is not an ONNX file onnxruntime can run ({err}); {_GIVE}") from None


def _ort_errors() -> tuple[type[Exception], ...]:
    """onnxruntime's exceptions for a file it cannot load (they derive from Exception only)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort

    return ort.Fail, ort.InvalidArgument, ort.InvalidGraph, ort.InvalidProtobuf, ort.NoSuchFile, ort.NotImplemented


def onnx_predictor(
    model: str | os.PathLike | bytes, threads: int | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``x -> output`` through an :func:`ort_session` of an ONNX file or its bytes (input named ``input``)."""
    session = ort_session(model, threads)
    return lambda x: torch.from_numpy(session.run(None, {"input": x.detach().contiguous().numpy()})[0])


def load_onnx(path: str | os.PathLike, external_data: bool = False):
    """An ONNX file's ``onnx.ModelProto`` (its external data unread unless ``external_data``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a regular file (a FIFO or device is never read), or no ONNX model (bytes that do not decode,
            or decode to no graph with an input), naming the file.
    """
    import onnx
    from google.protobuf.message import DecodeError

    regular_file(path, "ONNX file", _GIVE)
    try:
        proto = onnx.load(str(path), load_external_data=external_data)
    except DecodeError as err:
        raise ValueError(f"{path} is not a valid ONNX file ({err}); {_GIVE}") from None
    if not proto.graph.input:  # protobuf decodes an empty file, and some other bytes, to an empty model
        raise ValueError(f"{path} is not a valid ONNX file (it decodes to no graph with an input); {_GIVE}")
    return proto


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """An ONNX file's ``metadata_props`` (the graph's weights are not read)."""
    return {prop.key: prop.value for prop in load_onnx(path).metadata_props}


def onnx_batch_size(path: str | os.PathLike) -> int | None:
    """The static batch of an ONNX file's input; None for a dynamic batch."""
    return _input_shape(load_onnx(path))[0]


def onnx_input(path: str | os.PathLike) -> tuple[dict, int | None]:
    """The transform an ONNX file records (:func:`repmlp.preprocess.parse_input_metadata`), its ``input_size``
    checked against the graph's input (a file may record another size than its graph takes), and the graph's static
    batch (None: any), from one read of the file."""
    from .preprocess import parse_input_metadata

    proto = load_onnx(path)
    settings = parse_input_metadata({p.key: p.value for p in proto.metadata_props}, str(path))
    size, takes = settings.get("input_size"), _input_shape(proto)[1:]
    if size and (len(takes) != 3 or any(d not in (None, s) for d, s in zip(takes, size))):
        raise ValueError(
            f"{path}: field 'input_size' is {size}, but its graph takes inputs of {takes} (None: any); write the "
            "file again with repmlp-export"
        )
    return settings, _input_shape(proto)[0]


def _input_shape(proto) -> list[int | None]:
    """The shape of an ONNX model's input, None for a dynamic dimension."""
    return [d.dim_value if d.HasField("dim_value") else None for d in proto.graph.input[0].type.tensor_type.shape.dim]


def set_onnx_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Record ``metadata`` in an ONNX file's ``metadata_props`` (replacing entries of the same keys), atomically."""
    import onnx

    from .guards import atomic_write

    proto = load_onnx(path, external_data=True)
    kept = {prop.key: prop.value for prop in proto.metadata_props if prop.key not in metadata}
    del proto.metadata_props[:]
    for key, value in {**kept, **metadata}.items():
        proto.metadata_props.add(key=key, value=str(value))
    atomic_write(path, lambda tmp: onnx.save(proto, tmp))
