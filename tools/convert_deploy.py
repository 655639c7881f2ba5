#!/usr/bin/env python
"""Convert a train-form checkpoint to its deploy form, prove the two agree, write it atomically.

The tool's code is ``repmlp/cli/convert_deploy.py``; ``--help`` describes it.
"""

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from repmlp.cli.convert_deploy import main as run  # here, so that torch loads after the environment below is set

    return run(argv)


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # libgomp reads it when torch loads: no spin-waiting
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
