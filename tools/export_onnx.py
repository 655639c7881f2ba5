#!/usr/bin/env python
"""Export a model's deploy form to ONNX (or OpenVINO IR) at its input size and any batch, optionally int8, and check
the file.

The tool's code is ``repmlp/cli/export_onnx.py``; ``--help`` describes it.
"""

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from repmlp.cli.export_onnx import main as run  # here, so that torch loads after the environment below is set

    return run(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp reads it when torch loads: no spin-waiting
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
