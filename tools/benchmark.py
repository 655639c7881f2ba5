#!/usr/bin/env python
"""Inference speed of RepMLP models: train form, deploy form, the authors' deploy form (emulated) and baselines, in
eager PyTorch, torch.compile and onnxruntime.

The tool's code is ``benchmarks/benchmark_tool.py`` (beside the library, in a clone only); ``--help`` describes it.
"""

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the library in a clone
    from benchmarks.benchmark_tool import main as run  # here, so that torch loads after the environment below is set

    return run(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp reads it when torch loads: no spin-waiting
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
