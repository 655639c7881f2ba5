#!/usr/bin/env python
"""Images/s of the training input pipeline alone: our loader against timm's create_loader.

The tool's code is ``benchmarks/pipeline_tool.py`` (beside the library, in a clone only); ``--help`` describes it.
"""

from _launch import run, tool

main = tool("benchmarks.pipeline_tool")

if __name__ == "__main__":
    run("benchmarks.pipeline_tool")
