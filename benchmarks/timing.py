"""Timing on a shared machine: interleaved rounds, percentiles, the machine's state beside every figure."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence

import torch


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
