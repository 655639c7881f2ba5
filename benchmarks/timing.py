"""Timing on a shared machine: interleaved rounds, percentiles, the machine's state beside every figure."""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence

import torch

from repmlp.cpu import available_cores, cpu_name, instruction_sets


def sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def machine_state() -> dict:
    """What else decides a timing on a shared machine: threads, OpenMP wait policy, load average."""
    return dict(
        threads=torch.get_num_threads(),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "unset"),
        loadavg=[round(v, 2) for v in os.getloadavg()],
        cpus=os.cpu_count(),
    )


def machine_description(device: torch.device | None = None) -> dict:
    """The machine a figure was measured on: the CPU and its instruction sets (AVX2, AVX-512, AVX512-BF16, AMX, VNNI:
    what bf16 and int8 run fast on), the cores this process may use, the kernels PyTorch dispatches to, the GPU."""
    description = dict(
        cpu=cpu_name(),
        instruction_sets=instruction_sets(),
        available_cores=available_cores(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
        torch=torch.__version__,
    )
    if device is not None and device.type == "cuda":
        description["gpu"] = torch.cuda.get_device_name(device)
    return description


def format_machine(description: dict) -> str:
    """One line: the CPU, the instruction sets it has and lacks, the cores."""
    sets = description["instruction_sets"]
    has = ", ".join(name for name, present in sets.items() if present) or "none listed"
    lacks = ", ".join(name for name, present in sets.items() if not present) or "none"
    gpu = f"; GPU {description['gpu']}" if description.get("gpu") else ""
    return (
        f"{description['cpu']} ({description['available_cores']} cores available; has {has}; lacks {lacks}; "
        f"torch dispatches {description['torch_cpu_capability']}){gpu}"
    )


_KINETO_NOISE = ("USDT:", "gpuGetDeviceCount", "SyncActivityProfilerHandler", "DeviceProperties.cpp")


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Run torch.profiler without the lines its C++ backend (kineto) writes to stderr on a machine without a GPU
    (``ERROR: ... gpuGetDeviceCount failed``, ``profiler_start``): stderr is caught at the file-descriptor level and
    every other line written back."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            for line in caught.read().decode(errors="replace").splitlines(keepends=True):
                if not any(noise in line for noise in _KINETO_NOISE):
                    sys.stderr.write(line)


#: Where a deploy form spends its time: aten operators (self time) by kind.
OP_KINDS = {
    "matmul": ("bmm", "baddbmm", "addmm", "mm", "addbmm", "_addmm_activation", "linear", "matmul"),
    "conv": (
        "mkldnn_convolution",
        "convolution",
        "_convolution",
        "conv2d",
        "thnn_conv2d",
        "_slow_conv2d_forward",
        "cudnn_convolution",
    ),
    "copy/layout": ("copy_", "clone", "contiguous", "_to_copy", "to", "cat", "constant_pad_nd", "pad", "slice"),
    "pool": ("avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "mean", "max_pool2d_with_indices"),
}


def op_kind(name: str) -> str:
    """The kind (:data:`OP_KINDS`) of an aten operator, ``elementwise`` for the other aten ops, else ``other``."""
    op = name.removeprefix("aten::")
    for kind, ops in OP_KINDS.items():
        if op in ops:
            return kind
    return "elementwise" if name.startswith("aten::") else "other"


def _event_kind(event) -> str:
    """An operator's kind, or ``conv`` inside a conv (a conv's own GEMMs and copies are the conv's time)."""
    parent = event.cpu_parent
    while parent is not None:
        if op_kind(parent.name) == "conv":
            return "conv"
        parent = parent.cpu_parent
    return op_kind(event.name)


@torch.inference_mode()
def profile_ops(call: Callable[[], object], runs: int = 3) -> dict[str, float]:
    """Milliseconds per call spent in each kind of operator (:func:`op_kind`, self CPU time of the calling thread,
    which waits for its intra-op workers) over ``runs`` calls of an eager PyTorch model, largest first."""
    from torch.profiler import ProfilerActivity, profile

    call()
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(runs):
            call()
    totals: dict[str, float] = {}
    for event in prof.events():
        kind = _event_kind(event)
        totals[kind] = totals.get(kind, 0.0) + event.self_cpu_time_total / 1e3 / runs
    totals.pop("other", None)  # profiler bookkeeping, Python-level ranges
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def timed_round(
    calls: Sequence[Callable[[], object]], r: int, device: torch.device | None = None
) -> list[tuple[float, float]]:
    """One interleaved round: every call once, starting at call ``r % len(calls)`` (so that no call is always first
    after the same other); (wall seconds, process CPU seconds) per call, in the calls' order."""
    out: list[tuple[float, float]] = [(0.0, 0.0)] * len(calls)
    for i in [*range(len(calls))][r % len(calls) :] + [*range(len(calls))][: r % len(calls)]:
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        calls[i]()
        sync(device)
        out[i] = (time.perf_counter() - start, time.process_time() - cpu_start)
    return out


def percentile(values: list[float], p: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[p - 1] if len(values) > 1 else values[0]


def spread(ratios: list[float]) -> dict:
    """Median, interquartile range and extremes of per-round ratios."""
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else ratios * 3
    return dict(median=statistics.median(ratios), p25=q1, p75=q3, min=min(ratios), max=max(ratios), rounds=len(ratios))
