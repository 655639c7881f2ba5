"""What the CPU offers: its instruction sets (the matrix engines reduced precision runs fast on) and the cores this
process may use. The one place that reads ``/proc/cpuinfo``."""

from __future__ import annotations

__all__ = ["INSTRUCTION_SETS", "available_cores", "cpu_flags", "cpu_has_vnni", "cpu_name", "instruction_sets"]

import functools
import os
import platform
from pathlib import Path

#: Instruction sets that decide the speed of float32, bf16 and int8 matrix products, by the Linux flags that show them.
INSTRUCTION_SETS = {
    "AVX2": ("avx2",),
    "FMA": ("fma",),
    "AVX-512": ("avx512f",),
    "AVX512-BF16": ("avx512_bf16",),
    "AVX512-FP16": ("avx512_fp16",),
    "VNNI": ("avx512_vnni", "avx_vnni"),
    "AMX-BF16": ("amx_bf16",),
    "AMX-INT8": ("amx_int8",),
    "AMX-FP16": ("amx_fp16",),
}


@functools.cache
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo cannot be read)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def instruction_sets() -> dict[str, bool]:
    """Which of :data:`INSTRUCTION_SETS` this CPU has."""
    flags = cpu_flags()
    return {name: any(f in flags for f in names) for name, names in INSTRUCTION_SETS.items()}


def cpu_has_vnni() -> bool:
    """Whether this CPU has int8 dot-product instructions (VNNI or AMX), where full-range int8 weights are safe."""
    sets = instruction_sets()
    return sets["VNNI"] or sets["AMX-INT8"]


def cpu_name() -> str:
    """The CPU's model name."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def available_cores() -> int:
    """The CPUs this process may run on (its affinity mask: what a container or taskset grants, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
