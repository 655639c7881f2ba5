"""Which file holds a model's weights, in a model folder or a Hugging Face Hub repository: timm's rule, from timm's
own names (:data:`WEIGHT_NAMES`), so a folder ``timm.models.save_for_hf`` wrote or ``local-dir:`` reads is read here
too; and a folder's ``config.json``, read bounded (:func:`read_json`)."""

from __future__ import annotations

__all__ = ["WEIGHT_NAMES", "folder_weights", "hub_weights", "read_json", "regular_file"]

import json
import logging
import os
import stat
from pathlib import Path

from timm.models._hub import _EXT_PRIORITY, _PREFERRED_FILES, hf_split

_logger = logging.getLogger(__name__)
MAX_JSON_BYTES = 1 << 20  # a config.json is a few KB; more is not one

#: timm's weight file names for a model folder or Hub repository, in its order of preference.
WEIGHT_NAMES: tuple[str, ...] = tuple(_PREFERRED_FILES)


def folder_weights(folder: str | os.PathLike) -> Path | None:
    """The weights file of a model folder, found as timm's ``local-dir:`` loader finds it: the first of
    :data:`WEIGHT_NAMES` present, else, in a folder whose ``config.json`` is timm's (it names an ``architecture``:
    what makes a folder a model for ``local-dir:``), the first file (by name) of the first extension present of
    .safetensors, .pth, .pth.tar and .bin; None when there is none. (A training run's directory holds several files
    of those extensions and a config.json of its own; none of them is picked.)"""
    folder = Path(folder)
    for name in WEIGHT_NAMES:
        if (folder / name).exists():  # as timm's: a FIFO or device under the name is then refused as not a file
            return folder / name
    if not _is_timm_config(folder / "config.json"):
        return None
    for ext in _EXT_PRIORITY:
        files = sorted(f for f in folder.glob(f"*{ext}") if f.is_file())
        if files:
            if len(files) > 1:
                _logger.warning("%d %s files in %s; reading %s", len(files), ext, folder, files[0].name)
            return files[0]
    return None


def _is_timm_config(path: Path) -> bool:
    try:
        return "architecture" in read_json(path)
    except ValueError:  # not a regular file, too large, not JSON, not an object: no model folder
        return False


def regular_file(path: str | os.PathLike, what: str, fix: str) -> int:
    """The size of ``path`` (symlinks followed) if it is a regular file, checked before anything opens it: a FIFO
    waits for a writer for ever, a device such as ``/dev/zero`` never ends.

    Args:
        path: the file.
        what: what it should be, for messages (``"weights file"``, ``"ONNX file"``).
        fix: what would work, ending the message (``"give the file"``).

    Raises:
        FileNotFoundError: no such file (or a dangling symlink), naming it.
        ValueError: not a regular file (naming what it is), or a file that cannot be looked at.
    """
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as err:
        raise ValueError(f"{what} {path}: cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{what} {path} is not a regular file but {_kind(info.st_mode)}; {fix}")
    return info.st_size


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for is_kind, name in kinds if is_kind(mode)), "no file to read")


def read_json(path: str | os.PathLike, what: str = "config") -> dict:
    """A JSON object from ``path`` if it is a regular file of at most :data:`MAX_JSON_BYTES` ({} when there is no
    file): a FIFO, a device, a huge or non-JSON file is a ValueError naming it, never a hang or a flood."""
    path = Path(path)
    try:
        size = regular_file(path, what, "replace it with a file")
    except FileNotFoundError:
        return {}
    if size > MAX_JSON_BYTES:
        raise ValueError(f"{what} {path} is {size} bytes, more than a config's {MAX_JSON_BYTES}; not read")
    with open(path, "rb") as f:
        text = f.read(MAX_JSON_BYTES + 1)
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(f"{what} {path} is not valid JSON ({err}); fix or remove it") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} holds a JSON {type(data).__name__}, not an object; fix or remove it")
    return data


def hub_weights(hub_id: str, filename: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """The weights file of the Hub model ``hub_id`` (``org/name``, optionally ``@revision``), from the local Hugging
    Face cache (``cache_dir``, default the Hub's) or downloaded into it; offline (``HF_HUB_OFFLINE=1``) only the cache
    is read. ``filename`` if given, else the first of :data:`WEIGHT_NAMES` the repository has.

    Raises:
        FileNotFoundError: none of the names is in the repository (or, offline, in the cache); the message names
            them and where they were looked for.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    repo, revision = hf_split(hub_id)
    names = (filename,) if filename else WEIGHT_NAMES
    for name in names:
        try:
            return Path(hf_hub_download(repo, name, revision=revision, cache_dir=cache_dir))
        except EntryNotFoundError:  # not in the repository, or (offline, no connection) not in the cache
            continue
    where = f"the Hugging Face cache {cache_dir or constants.HF_HUB_CACHE}"
    if not constants.HF_HUB_OFFLINE:
        where = f"the repository or {where}"
    raise FileNotFoundError(
        f"hf-hub:{hub_id}: no weights file ({', '.join(names)}) in {where}; save the model with "
        "timm.models.save_for_hf (or push_to_hf_hub), or pass pretrained_cfg_overlay=dict(hf_hub_filename=NAME)"
    )
