"""Quantization, in one home: the int8 scheme, quantization-aware training, and the int8 deploy forms.

- :mod:`~repmlp.quantize.scheme`: the int8 scheme every part uses (symmetric per-channel int8 weights, uint8
  activations), with its fake quantization.
- :mod:`~repmlp.quantize.qat`: quantization-aware training, on the train form's equivalent FC3 or with a BN after
  the deploy form's FC3 (the authors' alternative).
- :mod:`~repmlp.quantize.calibration`: calibration and check inputs.
- :mod:`~repmlp.quantize.ort`: int8 ONNX files by onnxruntime's tools, checked against float32, and profiled.
- :mod:`~repmlp.quantize.pt2e`: PyTorch's x86 int8 path (PT2E, torchao, inductor).
- :mod:`~repmlp.quantize.ranges`: how a deploy form's weights sit in int8.

``repmlp.int8`` is the former home of the int8 parts and keeps their names.
"""

__all__ = [
    "QAT_MODES",
    "QUANTIZE_MODES",
    "FakeQuantFC3",
    "FixedBatch",
    "Int8Check",
    "WeightRange",
    "batched_weight_products",
    "compare_outputs",
    "compile_frozen",
    "cpu_has_vnni",
    "data_batches",
    "enable_fc3_qat",
    "equivalent_fc3",
    "export_graph",
    "fake_quantize_activation",
    "fake_quantize_weight",
    "fc3_blocks",
    "finish_qat",
    "fold_fc3_bn",
    "format_ranges",
    "insert_fc3_bn",
    "onnx_batch_size",
    "prepare_qat",
    "profile_onnx",
    "quantize_checked",
    "quantize_onnx",
    "quantize_pytorch",
    "remove_fake_quant",
    "resolve_reduce_range",
    "weight_qmax",
    "weight_ranges",
]

from .calibration import data_batches
from .ort import (
    QUANTIZE_MODES,
    Int8Check,
    batched_weight_products,
    compare_outputs,
    onnx_batch_size,
    profile_onnx,
    quantize_checked,
    quantize_onnx,
)
from .pt2e import FixedBatch, compile_frozen, export_graph, quantize_pytorch
from .qat import (
    QAT_MODES,
    FakeQuantFC3,
    enable_fc3_qat,
    equivalent_fc3,
    fc3_blocks,
    finish_qat,
    fold_fc3_bn,
    insert_fc3_bn,
    prepare_qat,
    remove_fake_quant,
)
from .ranges import WeightRange, format_ranges, weight_ranges
from .scheme import (
    cpu_has_vnni,
    fake_quantize_activation,
    fake_quantize_weight,
    resolve_reduce_range,
    weight_qmax,
)
