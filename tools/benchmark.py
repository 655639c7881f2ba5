#!/usr/bin/env python
"""Inference speed of RepMLP models: train form, deploy form, the authors' deploy form (emulated) and baselines, in
eager PyTorch, torch.compile and onnxruntime.

The tool's code is ``benchmarks/benchmark_tool.py`` (beside the library, in a clone only); ``--help`` describes it.
"""

from _launch import run, tool

main = tool("benchmarks.benchmark_tool")

if __name__ == "__main__":
    run("benchmarks.benchmark_tool")
