"""A training run's output directory: which files in it are the run's own (its manifest), what ``--overwrite`` may
delete, and the lock that keeps a second run out while one is writing there.

The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local and NFS v3+ filesystems, unlike ``flock``,
which network filesystems do not share between hosts) by rank 0 alone; it names its host and process, so a lock
whose process is gone on this host is taken over, and one of another host is refused with the command that
frees it.
"""

from __future__ import annotations

__all__ = ["RunFiles", "RunLock", "check_output_dir", "run_files", "start_afresh", "write_manifest"]

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..guards import atomic_write, check_writable_dir
from ..locations import read_json
from .state import LEGACY_STATE_FILE, STATE_FILE

MANIFEST = "run_files.json"
LOCK = "run.lock"
#: What a run writes in its output directory (the manifest lists them as the run's own).
RUN_FILES = (
    "config.json",
    "metrics.jsonl",
    "metrics.png",
    STATE_FILE,
    LEGACY_STATE_FILE,
    "final.json",
    "model_train.safetensors",
    "model_deploy.safetensors",
)
#: Files of a run that stopped before its first checkpoint: a retry starts afresh over them.
_SETUP_FILES = {"config.json", MANIFEST}
_FORMAT = "repmlp-run-files-1"


@dataclass
class RunFiles:
    """The files of ``RUN_FILES`` (and the manifest) in an output directory, sorted into a run's own and others."""

    own: list[str]  # written by a training run: listed in its manifest, or a run of a version without manifests
    foreign: list[str]  # named like a run's file but not a run's (a model folder's config.json, a project's)

    @property
    def trained(self) -> bool:
        """The run got as far as a checkpoint (anything beyond its config)."""
        return bool(set(self.own) - _SETUP_FILES)


def _is_run_config(path: Path) -> bool:
    """A run's config.json (written by versions without a manifest): a training config's sections."""
    try:
        cfg = read_json(path)
    except ValueError:
        return False
    return isinstance(cfg, dict) and {"train", "model", "data", "optimizer"} <= set(cfg)


def run_files(out_dir: Path) -> RunFiles:
    """Sort the run-named files in ``out_dir``: its manifest's own files, else (a directory of a version without
    manifests) all of them when its config.json is a training config, else none."""
    present = [name for name in RUN_FILES if (out_dir / name).exists()]
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            listed = set(read_json(manifest, "run manifest")["files"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"train.output_dir {out_dir}: {manifest} is damaged ({err}); remove it") from err
        own = [MANIFEST] + [n for n in present if n in listed]
        return RunFiles(own, [n for n in present if n not in listed])
    if _is_run_config(out_dir / "config.json") or (present and "config.json" not in present):
        return RunFiles(present, [])  # an earlier version's run (or its files without the config)
    return RunFiles([], present)


def check_output_dir(out_dir: Path, resume: bool | str, overwrite: bool) -> RunFiles:
    """Refuse, before any work, an output directory that cannot be written, one with files named like a run's that
    no run wrote (a model folder: they are never replaced), or one that holds an earlier run when neither
    resuming nor overwriting (a run that stopped before its first checkpoint is started afresh)."""
    if resume and overwrite:
        raise ValueError(
            "--resume continues the run in the output directory and --overwrite replaces it: give one of them"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"train.output_dir {out_dir} is a file; give a directory")
    check_writable_dir(out_dir, f"train.output_dir {out_dir}")
    files = run_files(out_dir) if out_dir.is_dir() else RunFiles([], [])
    if files.foreign:
        raise FileExistsError(
            f"train.output_dir {out_dir} holds {', '.join(files.foreign)}, which no training run wrote there (a model "
            "folder or another project's files?); a run would replace them, so it is refused with or without "
            "--overwrite: give another --output directory"
        )
    if files.trained and not resume and not overwrite:
        raise FileExistsError(
            f"train.output_dir {out_dir} holds an earlier run ({', '.join(files.own)}); continue it "
            "with --resume, replace it with --overwrite, or give another --output directory"
        )
    return files


def start_afresh(out_dir: Path, files: RunFiles) -> list[str]:
    """Delete the earlier run's own files (nothing else) and write this run's manifest; returns what was deleted."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in files.own:
        (out_dir / name).unlink(missing_ok=True)
    write_manifest(out_dir)
    return files.own


def write_manifest(out_dir: Path) -> None:
    """Record the files this run writes in ``out_dir`` (so --overwrite later deletes those alone)."""
    text = json.dumps({"format": _FORMAT, "files": [*RUN_FILES, MANIFEST]}, indent=2)
    atomic_write(out_dir / MANIFEST, lambda tmp: Path(tmp).write_text(text))


# -- the lock -------------------------------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The output directory's lock file, held by rank 0 of one run (:func:`acquire`, :meth:`release`)."""

    def __init__(self, path: Path, record: dict) -> None:
        self.path, self.record = path, record

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        """Create ``out_dir/run.lock``; a lock of a process of this host that is gone is taken over, a live one or
        another host's is a FileExistsError naming its holder."""
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / LOCK
        record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "argv": sys.argv}
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read_lock(path)
                if holder is not None and holder.get("host") == record["host"] and not _alive(holder.get("pid", -1)):
                    path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise FileExistsError(_held_message(out_dir, path, holder)) from None
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
            return cls(path, record)
        raise FileExistsError(_held_message(out_dir, path, _read_lock(path)))

    def release(self) -> None:
        """Remove the lock file if it is still this run's."""
        if _read_lock(self.path) == self.record:
            self.path.unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    try:
        record = read_json(path, "lock")
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _held_message(out_dir: Path, path: Path, holder: dict | None) -> str:
    who = (
        f"process {holder['pid']} on {holder.get('host')}, started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))}"
        if holder
        else "a run whose lock file cannot be read"
    )
    return (
        f"train.output_dir {out_dir} is in use by another training run ({who}); wait for it or give another "
        f"--output directory (if that run is gone, e.g. its node failed, delete {path})"
    )
