"""The shipped weights listed in ``pretrained/manifest.json``."""
from __future__ import annotations

import json
from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
MANIFEST = PRETRAINED_DIR / "manifest.json"


def shipped_models() -> list[dict]:
    """Entries of the manifest ({model, tag, file, sha256, form, dataset, top1, config, command}); [] if none."""
    if not MANIFEST.is_file():
        return []
    return json.loads(MANIFEST.read_text())
