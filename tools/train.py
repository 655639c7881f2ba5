#!/usr/bin/env python
"""Train a model from a YAML recipe; single process, or ``torchrun`` on one node or several.

The tool's code is ``repmlp/cli/train.py``; ``--help`` describes it.
"""

from _launch import run, tool

main = tool("repmlp.cli.train")

if __name__ == "__main__":
    run("repmlp.cli.train")
