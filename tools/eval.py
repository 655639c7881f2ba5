#!/usr/bin/env python
"""Top-1, top-5 and loss of a train- or deploy-form checkpoint on a dataset.

The tool's code is ``repmlp/cli/eval.py``; ``--help`` describes it.
"""

from _launch import run, tool

main = tool("repmlp.cli.eval")

if __name__ == "__main__":
    run("repmlp.cli.eval")
