"""The weights shipped with the package: where they are (:func:`weights_dir`) and how they are found and checked.

Each shipped model is a folder ``<model>.<tag>/`` that timm's ``local-dir:`` loader reads (docs/loading.md): timm's
``config.json`` plus ``files`` (``{name: {sha256, form}}``, checked on every load by
:class:`repmlp.weights_file.WeightsFile`), the train-form ``model.safetensors`` and the ``README.md`` model card.
The registry's ``pretrained_cfg['file']`` names the folder relative to :func:`weights_dir`.
"""

from __future__ import annotations

__all__ = [
    "ENV_VAR",
    "WEIGHTS_NAME",
    "read_config",
    "resolve_weights",
    "sha256",
    "shipped_folder",
    "shipped_models",
    "shipped_weights",
    "weights_dir",
    "weights_file",
]

import hashlib
import os
from pathlib import Path

from .locations import read_json

ENV_VAR = "REPMLP_PRETRAINED_DIR"
WEIGHTS_NAME = "model.safetensors"  # the file a shipped folder holds: the first of timm's names
_PACKAGE = Path(__file__).resolve().parent
_OLD_PREFIX = Path("repmlp", "pretrained")  # where a clone kept them before 0.2 (CHANGELOG.md)


def weights_dir() -> Path:
    """Directory of the shipped weights: ``$REPMLP_PRETRAINED_DIR``, a wheel's package data, or a clone's
    top-level ``pretrained/``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    in_wheel = _PACKAGE / "pretrained"
    return in_wheel if in_wheel.is_dir() else _PACKAGE.parent / "pretrained"


def read_config(folder: str | os.PathLike) -> dict:
    """A model folder's ``config.json`` ({} when there is none; read bounded, :func:`repmlp.locations.read_json`)."""
    return read_json(Path(folder) / "config.json")


def shipped_models() -> list[dict]:
    """One entry per shipped file: {model, tag, folder, file (relative to :func:`weights_dir`), sha256, form}."""
    entries = []
    for config in sorted(weights_dir().glob("*/config.json")):
        cfg, folder = read_config(config.parent), config.parent.name
        model, tag, files = cfg["architecture"], cfg["pretrained_cfg"]["tag"], cfg.get("files", {})
        entries += [
            dict(model=model, tag=tag, folder=folder, file=f"{folder}/{n}", **info) for n, info in files.items()
        ]
    return entries


def shipped_folder(model: str, tag: str) -> str | None:
    """Folder (relative to :func:`weights_dir`) of a shipped model, or None."""
    return next((e["folder"] for e in shipped_models() if (e["model"], e["tag"]) == (model, tag)), None)


def shipped_weights(name: str) -> Path | None:
    """The (train-form) weights file of a shipped ``NAME.TAG``, e.g. ``repmlp_fmnist_mlp.fmnist``; None for a name
    without a tag or with no shipped folder. Its metadata records the model's dataset, classes and arguments."""
    base, _, tag = name.partition(".")
    entry = next((e for e in shipped_models() if (e["model"], e["tag"], e["form"]) == (base, tag, "train")), None)
    return weights_dir() / entry["file"] if tag and entry else None


def resolve_weights(path: str | os.PathLike) -> Path:
    """``path`` as given when it exists, else the shipped file or folder of that name in :func:`weights_dir`
    (also when named by its old path in a clone, ``repmlp/pretrained/NAME``)."""
    path = Path(path)
    if path.exists() or path.is_absolute():
        return path
    name = Path(*path.parts[2:]) if path.parts[:2] == _OLD_PREFIX.parts and len(path.parts) > 2 else path
    return weights_dir() / name if (weights_dir() / name).exists() else path


def sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_file(path: str | os.PathLike) -> Path:
    """The weights file ``path`` names (:func:`repmlp.weights_file.resolve`); a ValueError when it does not match the
    sha256 its folder's ``config.json`` lists for it (corrupted, truncated or replaced)."""
    from .weights_file import WeightsFile, resolve  # reads the file once (and checks its listed sha256)

    path = resolve(path)
    return WeightsFile.open(path).path if path.is_file() else path
