#!/usr/bin/env python
"""Convert a train-form checkpoint to its deploy form, prove the two agree, write it atomically.

The tool's code is ``repmlp/cli/convert_deploy.py``; ``--help`` describes it.
"""

from _launch import run, tool

main = tool("repmlp.cli.convert_deploy")

if __name__ == "__main__":
    run("repmlp.cli.convert_deploy")
