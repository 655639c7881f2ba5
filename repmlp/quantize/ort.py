"""Int8 ONNX files by onnxruntime's quantization tools (dynamic and static), checked against their float32 source,
and where onnxruntime spends its time in them.

Models are exported in the graph layout (:func:`repmlp.layers.graph_layout`): FC3 as one linear layer per group, so
that each group gets its own per-output-channel scales.
"""

from __future__ import annotations

__all__ = [
    "QUANTIZE_MODES",
    "Int8Check",
    "batched_weight_products",
    "compare_outputs",
    "onnx_batch_size",
    "profile_onnx",
    "quantize_checked",
    "quantize_onnx",
]

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..onnx_io import onnx_batch_size, onnx_predictor, ort_session
from ..verify import Agreement, compare_predictors
from .scheme import resolve_reduce_range

QUANTIZE_MODES = ("none", "dynamic", "static")


def quantize_onnx(
    src: str | Path,
    dst: str | Path,
    mode: str,
    calibration: Iterable[torch.Tensor] = (),
    reduce_range: bool | None = None,
) -> None:
    """Write the int8 version of the float32 ONNX file ``src`` to ``dst`` with onnxruntime's quantization tools.

    ``dynamic``: weights int8 per output channel, activations quantized per batch at run time (MatMulInteger,
    ConvInteger). ``static``: activation ranges calibrated (min/max) on ``calibration`` inputs, QDQ format
    (onnxruntime fuses it into QLinear kernels; its QOperator format gave wrong outputs for these graphs).
    Matrix products with a batched (3-D) constant weight stay float32: onnxruntime's per-channel scales are per
    column of the last axis, shared across the batch, which its int8 kernels then reject.
    """
    from onnxruntime.quantization import (  # the int8 extra: imported when used
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode not in ("dynamic", "static"):
        raise ValueError(f"quantize mode must be 'dynamic' or 'static', got {mode!r}")
    common = dict(
        per_channel=True,
        reduce_range=resolve_reduce_range(reduce_range),
        weight_type=QuantType.QInt8,
        nodes_to_exclude=batched_weight_products(src),
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            x = next(self.batches, None)
            return None if x is None else {"input": x.numpy()}

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it advises pre-processing (shape inference), which the export has done
    try:
        if mode == "dynamic":
            quantize_dynamic(str(src), str(dst), **common)
        else:
            static = dict(quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8)
            quantize_static(str(src), str(dst), Reader(), calibrate_method=CalibrationMethod.MinMax, **static, **common)
    finally:
        root.setLevel(level)


def batched_weight_products(path: str | Path) -> list[str]:
    """Names of the MatMul nodes of an ONNX file whose constant operand has rank 3 (small shared FC3s, see
    :class:`repmlp.models.repmlpnet.SharedFC`)."""
    import onnx  # the onnx extra: imported when used

    graph = onnx.load(str(path), load_external_data=False).graph
    ranks = {init.name: len(init.dims) for init in graph.initializer}
    return [n.name for n in graph.node if n.op_type == "MatMul" and any(ranks.get(i) == 3 for i in n.input)]


@dataclass
class Int8Check(Agreement):
    """Agreement of an int8 model with its float32 form on the same inputs (:func:`repmlp.verify.compare_predictors`)
    and what those inputs were."""

    data: str = ""

    def __str__(self) -> str:
        return (
            f"int8 vs float32 on {self.count} {self.data} inputs: argmax agreement {self.argmax_agreement:.2%}, "
            f"max rel err {self.max_rel_err:.2e}"
        )


def compare_outputs(reference, candidate, batches: Iterable[torch.Tensor], data: str) -> Int8Check:
    """:func:`repmlp.verify.compare_predictors` of two predictors (tensor -> logits) on ``batches``, labelled with
    what the inputs were."""
    return Int8Check(**vars(compare_predictors(reference, candidate, batches)), data=data)


def profile_onnx(path: str | Path, x: torch.Tensor, runs: int = 5, threads: int | None = None) -> dict[str, float]:
    """Milliseconds per run spent in each operator type of an ONNX file in onnxruntime (its profiler, after the
    graph optimizations: fused and quantized kernels appear under their own names), largest first."""
    session = ort_session(path, threads, profile_prefix=str(Path(path).with_suffix("")) + "_profile")
    for _ in range(runs + 1):  # the first run warms up and is not counted
        session.run(None, {"input": x.numpy()})
    trace = Path(session.end_profiling())  # the profiler's JSON, written next to the model
    events = json.loads(trace.read_text())
    trace.unlink()
    run_events = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    counted_from = run_events[0]["ts"] + run_events[0]["dur"]
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= counted_from:
            totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"] / 1e3 / runs
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def quantize_checked(
    float_path: str | Path,
    path: str | Path,
    mode: str,
    calibration: Iterable[torch.Tensor],
    reduce_range: bool,
    check_batches: Sequence[torch.Tensor],
    check_data: str,
    min_agreement: float,
    target: str,
) -> Int8Check:
    """Quantize ``float_path`` into ``path`` (:func:`quantize_onnx`) and compare the two in onnxruntime; a
    RuntimeError below ``min_agreement`` argmax agreement, naming ``target``, the file that is then not written."""
    quantize_onnx(float_path, path, mode, calibration, reduce_range)
    check = compare_outputs(onnx_predictor(float_path), onnx_predictor(path), check_batches, check_data)
    if not check.finite:
        raise RuntimeError(
            f"export_onnx: the {mode} int8 model or its float32 form outputs non-finite values on {check_data} "
            f"inputs ({check.describe_nonfinite()}); {target} not written"
        )
    if not check.argmax_agreement >= min_agreement:
        raise RuntimeError(
            f"export_onnx: the {mode} int8 model agrees with float32 on only {check.argmax_agreement:.2%} of "
            f"{check.count} {check_data} inputs (< {min_agreement:.0%}); {target} not written"
        )
    return check
