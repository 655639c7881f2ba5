"""What every script here does: set the environment torch reads when it loads, then run its tool's ``main`` (the
console scripts do the same, :func:`repmlp.cli.console`). Nothing here imports torch."""

import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

#: ``repmlp.cli.ENV_DEFAULTS`` (a test keeps them equal): libgomp reads OMP_WAIT_POLICY once, when torch loads.
ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the clone's packages (benchmarks/ is only there)


def tool(module: str) -> Callable[..., int]:
    """The ``main(argv)`` of ``module``, imported when it is called (so that torch loads after :func:`run` sets the
    environment)."""

    def main(argv: list[str] | None = None) -> int:
        return importlib.import_module(module).main(argv)

    return main


def run(module: str) -> None:
    """Run ``module``'s ``main`` as this program, with the :data:`ENV_DEFAULTS` a user has not set."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    sys.exit(tool(module)())
