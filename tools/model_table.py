#!/usr/bin/env python
"""Print the zoo's model table (markdown): parameters and MACs of the train and deploy forms (fvcore).

The tool's code is ``repmlp/cli/model_table.py``; ``--help`` describes it.
"""

from _launch import run, tool

main = tool("repmlp.cli.model_table")

if __name__ == "__main__":
    run("repmlp.cli.model_table")
