"""Guards the tools run before any work, so that a refusal comes first and touches nothing: numeric arguments in
range, and an output that is never one of the inputs and is checked writable (the writes themselves go through
:func:`atomic_write`)."""

from __future__ import annotations

import argparse
import glob
import os
import re
import socket
import tempfile
import warnings
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


#: The overwrite policy of every tool, as its --overwrite flag states it.
OVERWRITE_HELP = (
    "replace existing output files (without it a tool refuses an existing output before any work; inputs, and "
    "files inside an input folder, are never replaced, with or without it)"
)


def add_overwrite_argument(parser: argparse.ArgumentParser, help: str = OVERWRITE_HELP) -> None:
    """The ``--overwrite`` flag of a tool (the one overwrite policy: see :data:`OVERWRITE_HELP`)."""
    parser.add_argument("--overwrite", action="store_true", help=help)


def _inside(path: Path, folder: Path) -> bool:
    """True when ``path`` (resolved, links followed) lies inside the directory ``folder``."""
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike | None], what: str) -> None:
    """Refuse an output ``path`` that is one of ``inputs`` (a link or hard link to it included), or an existing
    file inside an input that is a folder (which the command may read: a model folder's weights or config). New
    files beside the inputs are fine."""
    path = Path(path)
    for source in inputs:
        if source is None:
            continue
        source = Path(source)
        if same_file(path, source):
            raise ValueError(
                f"{what} {path} is the input file {source}: writing it would destroy the input; "
                "choose another output path"
            )
        if source.is_dir() and (path.exists() or path.is_symlink()) and _inside(path, source):
            raise ValueError(
                f"{what} {path} is a file of the input folder {source}: writing it would replace what the command "
                "reads; choose a new file name or another folder"
            )


def check_output_file(
    output: str | os.PathLike,
    inputs: Iterable[str | os.PathLike | None] = (),
    what: str = "--output",
    overwrite: bool = True,
) -> Path:
    """Refuse, before any work, an output file that is or lies in one of ``inputs`` (:func:`check_not_input`), a
    directory, read-only, in a place that cannot be written, or (unless ``overwrite``) an existing file; returns it
    as a Path.

    Args:
        output: the file a tool is about to write (replaced atomically when it exists).
        inputs: the files and folders the tool reads (None entries are skipped).
        what: the argument name used in messages, e.g. '--output'.
        overwrite: allow replacing an existing file; tools pass their ``--overwrite`` flag (:data:`OVERWRITE_HELP`).
    """
    path = Path(output)
    check_not_input(path, inputs, what)
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory; give the path of a file (inside it, or elsewhere)")
    if path.exists() and not (path.stat().st_mode & 0o222 and os.access(path, os.W_OK)):
        raise PermissionError(f"{what} {path} exists and is read-only; make it writable or choose another path")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{what} {path} exists; pass --overwrite to replace it, or choose another path")
    check_writable_dir(path.parent, f"{what} {path}")
    return path


def check_outputs(
    outputs: dict[str, str | os.PathLike | None],
    inputs: Iterable[str | os.PathLike | None] = (),
    overwrite: bool = False,
    suffixes: dict[str, tuple[str, ...]] | None = None,
) -> dict[str, Path]:
    """The one output guard of the tools: every output of one command checked by :func:`check_output_file`, no two
    of them one file, each with one of its ``suffixes`` where given; returns the given ones as Paths.

    Args:
        outputs: {argument name, e.g. '--json': path or None (not written)}.
        inputs: the files and folders the command reads.
        overwrite: the tool's ``--overwrite``.
        suffixes: {argument name: accepted file suffixes}, e.g. {'--output': ('.safetensors',)}.
    """
    inputs = list(inputs)
    checked: dict[str, Path] = {}
    for what, output in outputs.items():
        if output is None:
            continue
        path = Path(output)
        for other, seen in checked.items():
            if path.absolute() == seen.absolute() or same_file(path, seen):
                raise ValueError(f"{what} {path} and {other} {seen} are one file: give each output its own path")
        checked[what] = check_output_file(path, inputs, what, overwrite)
        accepted = (suffixes or {}).get(what)
        if accepted and path.suffix.lower() not in accepted:
            raise ValueError(f"{what} {path}: the file is written as {' or '.join(accepted)}; name it so")
    return checked


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_HOST = socket.gethostname().replace(".", "_")


def stale_temporaries(path: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """Temporary files :func:`atomic_write` left beside ``path`` when killed mid-write: (those of processes of this
    host that are gone, which can be removed; others it cannot tell about: another host's, or left by versions that
    did not name their process)."""
    path = Path(path)
    gone, unknown = [], []
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        middle = tmp.name[len(path.name) + 2 : -len(".tmp")]
        named = re.fullmatch(r"(\d+)@([^.]+)\.\w+", middle)  # PID@HOST.random: this version's names
        if named and named[2] == _HOST:
            if int(named[1]) != os.getpid() and not _process_alive(int(named[1])):
                gone.append(tmp)
        elif named or re.fullmatch(r"\w{8}", middle):  # another host's, or mkstemp's bare random part
            unknown.append(tmp)
    return gone, unknown


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file next to ``path``, then rename it over ``path``.

    A run killed midway leaves the previous file intact; the temporary file it leaves is removed by the next
    write to ``path`` (or, where it cannot tell whether its writer is gone, named in a warning). An existing file
    keeps its permission bits; a new one gets the usual ``0o666 & ~umask``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gone, unknown = stale_temporaries(path)
    for tmp in gone:
        tmp.unlink(missing_ok=True)
    if unknown:
        warnings.warn(
            f"temporary files of an interrupted write of {path} (remove them if no process is writing it): "
            f"{', '.join(str(t) for t in unknown)}",
            stacklevel=2,
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        mode = path.stat().st_mode & 0o7777
    except OSError:  # a new file
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    try:
        write(tmp)
        os.chmod(tmp, mode)  # mkstemp's 0600 -> the existing file's mode, or a new file's usual one
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
