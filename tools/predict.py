#!/usr/bin/env python
"""The top-k classes, by name, of image files under a model file (safetensors, ONNX, OpenVINO IR).

The tool's code is ``repmlp/cli/predict.py``; ``--help`` describes it.
"""

from _launch import run, tool

main = tool("repmlp.cli.predict")

if __name__ == "__main__":
    run("repmlp.cli.predict")
