#!/usr/bin/env python
"""Images/s of the training input pipeline alone: our loader against timm's create_loader.

The tool's code is ``benchmarks/pipeline_tool.py`` (beside the library, in a clone only); ``--help`` describes it.
"""

import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside the library in a clone
    from benchmarks.pipeline_tool import main as run  # here, so that torch loads after the environment below is set

    return run(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp reads it when torch loads: no spin-waiting
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
