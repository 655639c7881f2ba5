"""The command-line tools. Each module's ``main(argv)`` is one tool; ``[project.scripts]`` installs them as
``repmlp-train``, ``repmlp-convert``, ``repmlp-eval``, ``repmlp-export``, ``repmlp-predict``, ``repmlp-model-table``
and ``repmlp-ship`` (the ``run_*`` entry points below, named apart from the modules), and ``tools/<module>.py`` runs
them from a clone."""

from __future__ import annotations

import importlib
import os
import sys
from typing import NoReturn

__all__ = [
    "ENV_DEFAULTS",
    "console",
    "run_convert",
    "run_eval",
    "run_export",
    "run_model_table",
    "run_predict",
    "run_ship",
    "run_train",
]

# Set before torch loads. libgomp reads OMP_WAIT_POLICY once, when torch loads it: its default spin-waiting made
# 2-thread runs on a loaded machine many times slower (docs/speed.md). HF_HUB_OFFLINE: the tools read the Hugging
# Face cache and never the network. A value the user set is kept (OMP_WAIT_POLICY=ACTIVE to spin).
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}


def console(tool: str, argv: list[str] | None = None) -> NoReturn:
    """Run ``repmlp.cli.<tool>``'s ``main`` as a program.

    torch is already loaded when an entry point runs (``import repmlp`` loads it), so a missing default is set and
    the program starts again in its place (``os.execv``: same process id, so torchrun and shells see no change).
    """
    args = sys.argv[1:] if argv is None else argv
    missing = {key: value for key, value in ENV_DEFAULTS.items() if key not in os.environ}
    if missing:
        os.environ.update(missing)
        script = sys.argv[0]
        if os.path.isfile(script):  # the installed script itself: its name stays the program's name in --help
            os.execv(sys.executable, [sys.executable, script, *args])
        os.execv(sys.executable, [sys.executable, "-m", f"repmlp.cli.{tool}", *args])
    sys.exit(importlib.import_module(f"repmlp.cli.{tool}").main(args))


def run_train() -> NoReturn:
    """``repmlp-train``: :mod:`repmlp.cli.train`."""
    console("train")


def run_convert() -> NoReturn:
    """``repmlp-convert``: :mod:`repmlp.cli.convert_deploy`."""
    console("convert_deploy")


def run_eval() -> NoReturn:
    """``repmlp-eval``: :mod:`repmlp.cli.eval`."""
    console("eval")


def run_export() -> NoReturn:
    """``repmlp-export``: :mod:`repmlp.cli.export_onnx`."""
    console("export_onnx")


def run_predict() -> NoReturn:
    """``repmlp-predict``: :mod:`repmlp.cli.predict`."""
    console("predict")


def run_model_table() -> NoReturn:
    """``repmlp-model-table``: :mod:`repmlp.cli.model_table`."""
    console("model_table")


def run_ship() -> NoReturn:
    """``repmlp-ship``: :mod:`repmlp.cli.ship_model`."""
    console("ship_model")
