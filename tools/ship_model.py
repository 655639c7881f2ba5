#!/usr/bin/env python
"""Write a trained checkpoint as a shipped model folder (config.json, model.safetensors).

The tool's code is ``repmlp/cli/ship_model.py``; ``--help`` describes it.
"""

from _launch import run, tool

main = tool("repmlp.cli.ship_model")

if __name__ == "__main__":
    run("repmlp.cli.ship_model")
