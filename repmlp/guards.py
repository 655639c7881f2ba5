"""Guards the tools run before any work, so that a refusal comes first and touches nothing: numeric arguments in
range, and an output that is never one of the inputs and is checked writable (the writes themselves go through
:func:`atomic_write`)."""

from __future__ import annotations

__all__ = ["atomic_write", "check_output_file", "check_writable_dir", "integer", "number", "same_file"]

import argparse
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``); argparse's error names the argument."""
    return _ranged(int, "an integer", minimum, maximum)


def number(minimum: float, maximum: float | None = None) -> Callable[[str], float]:
    """An argparse type: a number >= ``minimum`` (and <= ``maximum``), not NaN."""
    return _ranged(float, "a number", minimum, maximum)


def _ranged(kind: type, noun: str, minimum, maximum) -> Callable[[str], object]:
    span = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not minimum <= value <= (value if maximum is None else maximum):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be {noun} {span}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """True when ``a`` and ``b`` name one file: the same resolved path, or the same inode (hard links)."""
    a, b = Path(a), Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(directory: str | os.PathLike, what: str) -> None:
    """Raise unless files can be created in ``directory`` (or, where it does not exist yet, in its nearest
    existing ancestor, where it will be made).

    The check writes and removes one empty temporary file: permission bits alone do not tell (root, read-only
    mounts, ACLs).
    """
    existing = _nearest_existing(Path(directory))
    if not existing.is_dir():
        raise NotADirectoryError(
            f"{what}: {existing} is a file, not a directory; choose an output path whose parent folders are directories"
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".repmlp-write-check.", dir=existing)
    except OSError as err:
        raise PermissionError(
            f"{what}: cannot write in {existing} ({err.strerror}); choose a writable location"
        ) from err
    os.close(fd)
    os.remove(probe)


def check_output_file(
    output: str | os.PathLike, inputs: Iterable[str | os.PathLike | None] = (), what: str = "--output"
) -> Path:
    """Refuse, before any work, an output file that is one of ``inputs``, a directory, read-only or in a place
    that cannot be written; returns it as a Path.

    Args:
        output: the file a tool is about to write (replaced atomically when it exists).
        inputs: the files the tool reads (None entries are skipped).
        what: the argument name used in messages, e.g. '--output'.
    """
    path = Path(output)
    for source in inputs:
        if source is not None and same_file(path, source):
            raise ValueError(
                f"{what} {path} is the input file {source}: writing it would destroy the input; "
                "choose another output path"
            )
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give the path of a file (inside it, or elsewhere)")
    if path.exists() and not (path.stat().st_mode & 0o222 and os.access(path, os.W_OK)):
        raise PermissionError(f"{what} {path} exists and is read-only; make it writable or choose another path")
    check_writable_dir(path.parent, f"{what} {path}")
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    A run killed midway leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> the usual permissions of a new file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
