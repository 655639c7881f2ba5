"""The weights shipped with the package: where they are, what the manifest says of them.

One rule finds them: ``$REPMLP_PRETRAINED_DIR`` if set, else ``pretrained/`` beside the package.
``pretrained/manifest.json`` lists every file ({model, tag, file, sha256, form, dataset, top1, config, command});
the zoo's ``default_cfgs`` take their file names from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

ENV_VAR = "REPMLP_PRETRAINED_DIR"


def weights_dir() -> Path:
    """Directory of the shipped weights: ``$REPMLP_PRETRAINED_DIR`` or ``<repo>/pretrained``."""
    return Path(os.environ.get(ENV_VAR) or Path(__file__).resolve().parent.parent / "pretrained")


def shipped_models() -> list[dict]:
    """Entries of the manifest; [] if there is none."""
    manifest = weights_dir() / "manifest.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else []


def shipped_file(model: str, tag: str, form: str = "train") -> str | None:
    """File name (relative to :func:`weights_dir`) of a shipped model's weights in ``form``, or None."""
    entry = next((e for e in shipped_models() if (e["model"], e["tag"], e["form"]) == (model, tag, form)), None)
    return entry["file"] if entry else None


def resolve_weights(path: str | os.PathLike) -> Path:
    """``path`` as given when it exists, else a shipped file of that name in :func:`weights_dir`."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (weights_dir() / path).is_file():
        return weights_dir() / path
    return path
