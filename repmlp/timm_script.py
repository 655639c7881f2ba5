"""Run one of timm's scripts (``train.py``, ``validate.py``, ``benchmark.py``, ``inference.py``, ``onnx_export.py``
from timm's repository) on the zoo's models.

timm has no plugin hook: a model is known to ``timm.create_model`` only once the module registering it is imported,
so ``import repmlp`` must run in the script's process first. This runs it, then the script as ``python SCRIPT``
would (``__main__``, ``sys.argv``, the script's folder first on ``sys.path``)::

    python -m repmlp.timm_script validate.py --model repmlp_fmnist_mlp.fmnist --pretrained --data-dir DIR
"""

from __future__ import annotations

__all__ = ["USAGE", "main", "run_script"]

import runpy
import sys
from pathlib import Path

import repmlp  # noqa: F401 - registers the zoo with timm, which is the point of this module

USAGE = (
    "usage: python -m repmlp.timm_script SCRIPT.py [ARGS ...]   (a timm script, e.g. validate.py, and its arguments)"
)


def run_script(script: str | Path, args: list[str]) -> None:
    """Run ``script`` as ``__main__`` with ``args`` as its command line, the zoo registered with timm.

    Raises:
        FileNotFoundError: no such script (the message says where timm's scripts are).
    """
    script = Path(script)
    if not script.is_file():
        raise FileNotFoundError(
            f"timm script not found: {script}; timm's scripts (train.py, validate.py, benchmark.py, inference.py, "
            "onnx_export.py) are in its repository, https://github.com/huggingface/pytorch-image-models, "
            "not in the pip package"
        )
    sys.argv = [str(script), *args]
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    try:
        run_script(argv[0], argv[1:])
    except FileNotFoundError as err:
        if Path(argv[0]).is_file():
            raise  # the script's own error
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
