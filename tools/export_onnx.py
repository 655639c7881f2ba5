#!/usr/bin/env python
"""Export a model's deploy form to ONNX (or OpenVINO IR) at its input size and any batch, optionally int8, and check
the file.

The tool's code is ``repmlp/cli/export_onnx.py``; ``--help`` describes it.
"""

from _launch import run, tool

main = tool("repmlp.cli.export_onnx")

if __name__ == "__main__":
    run("repmlp.cli.export_onnx")
