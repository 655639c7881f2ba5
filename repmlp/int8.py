"""The former home of the int8 deploy forms, kept so that its imports work: everything now lives in
:mod:`repmlp.quantize` (see CHANGELOG.md)."""

__all__ = [
    "QUANTIZE_MODES",
    "FakeQuantFC3",
    "FixedBatch",
    "Int8Check",
    "WeightRange",
    "batched_weight_products",
    "compare_outputs",
    "compile_frozen",
    "data_batches",
    "export_graph",
    "fake_quantize_weight",
    "format_ranges",
    "onnx_batch_size",
    "profile_onnx",
    "quantize_onnx",
    "quantize_pytorch",
    "resolve_reduce_range",
    "weight_qmax",
    "weight_ranges",
]

from .quantize.calibration import data_batches
from .quantize.ort import (
    QUANTIZE_MODES,
    Int8Check,
    batched_weight_products,
    compare_outputs,
    onnx_batch_size,
    profile_onnx,
    quantize_onnx,
)
from .quantize.pt2e import FixedBatch, compile_frozen, export_graph, quantize_pytorch
from .quantize.qat import FakeQuantFC3
from .quantize.ranges import WeightRange, format_ranges, weight_ranges
from .quantize.scheme import fake_quantize_weight, resolve_reduce_range, weight_qmax
