"""Reading a weights file: once (one memory map, :class:`WeightsFile`), bounded, as data: a safetensors header is
checked against the file's size before any tensor is touched; a torch file is unpickled with ``weights_only=True``.
Nothing read here is run, imported or trusted: :mod:`repmlp.records` judges what a file says."""

from __future__ import annotations

__all__ = ["PLAIN_STATE_DICT", "WeightsFile", "listed_sha256", "resolve"]

import argparse
import hashlib
import json
import logging
import math
import mmap
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.models import clean_state_dict

from .locations import WEIGHT_NAMES, folder_weights, read_json, regular_file

_logger = logging.getLogger(__name__)
_MAX_HEADER_BYTES = 100 << 20  # the limit of the safetensors library itself
_SAFE_GLOBALS = [argparse.Namespace]  # what timm's loader unpickles besides tensors: train.py's args
_PLAIN_KEYS = ("state_dict", "model")  # trainers' entries for the weights, in timm's order of preference
_EMA_KEYS = ("state_dict_ema", "model_ema")  # ... and for their EMA weights
_WRAPPER_PREFIXES = {"module.": "'module.' (DistributedDataParallel)", "_orig_mod.": "'_orig_mod.' (torch.compile)"}
_LIGHTNING_KEY = "pytorch-lightning_version"
_WEIGHT_FORMATS = ("pt", "np", "tf", "flax", "mlx")  # what safetensors writers of weights put in 'format'
PLAIN_STATE_DICT = "a state dict"  # what a file that holds nothing else held
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
}  # fmt: skip
#: What other files a weights path turns out to be, by their first bytes: (magic, what it is, what would work).
_NOT_CHECKPOINTS = (
    (b"\x89PNG", "a PNG image", "give the weights file (.safetensors or .pth)"),
    (b"\xff\xd8\xff", "a JPEG image", "give the weights file (.safetensors or .pth)"),
    (b"\x1f\x8b", "a gzip archive", "unpack it first"),
    (b"{", "a JSON or text file", "give the weights file it describes"),
)
_COMMAND_MODULES = ("os.", "posix.", "nt.", "subprocess.", "builtins.", "pty.", "runpy.", "shutil.", "webbrowser.")
_ONNX_FIELDS = (b"\x12", b"\x1a", b"\x22", b"\x3a")  # ModelProto: ir_version (field 1), then producer, domain, graph


def resolve(path: str | os.PathLike) -> Path:
    """The weights file ``path`` names: itself, or a model folder's file by timm's rule
    (:func:`repmlp.locations.folder_weights`)."""
    path = Path(path)
    return (folder_weights(path) or path) if path.is_dir() else path


def listed_sha256(path: Path) -> str | None:
    """The sha256 the ``config.json`` beside ``path`` lists for it (a shipped file), or None."""
    config = path.parent / "config.json"
    files = read_json(config).get("files", {})
    if not isinstance(files, dict):
        raise ValueError(f"{config}: field 'files' must be an object {{name: {{sha256, form}}}}, got {files!r:.100}")
    entry = files.get(path.name)
    if entry is None:
        return None
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        raise ValueError(f"{config}: field files.{path.name} must be an object with a 'sha256' string, got {entry!r}")
    return entry["sha256"]


@dataclass
class WeightsFile:
    """One weights file, read once: what every step of a load asks.

    Attributes:
        path: the file (a model folder's weights file, resolved).
        metadata: a safetensors file's string metadata, else what a timm ``train.py`` checkpoint's ``args`` record
            (``model``, ``num_classes``, ``model_kwargs``) in the same form; unjudged (:mod:`repmlp.sources`).
        state: the state dict (trainers' checkpoints unwrapped, wrapper prefixes stripped); a safetensors file's
            tensors are views of the file's memory map, copied only when loaded into a model.
        held: what the file held, for messages (:data:`PLAIN_STATE_DICT` when nothing else).
        sha256: hex digest of the file's bytes, from the same map, where its folder lists one (a shipped file: then
            checked against it); "" otherwise.
    """

    path: Path
    metadata: dict[str, str]
    state: dict[str, torch.Tensor]
    held: str = PLAIN_STATE_DICT
    sha256: str = field(default="", repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, use_ema: bool = False) -> WeightsFile:
        """Read ``path`` (a file or model folder); ``use_ema`` takes a trainer checkpoint's EMA weights.

        Raises:
            FileNotFoundError: no such file.
            ValueError: not a weights file (the message says what it is, where it is truncated, what would work),
                a listed sha256 that does not match, or no EMA weights though ``use_ema`` asks for them.
        """
        path = resolve(path)
        if path.is_dir():
            raise IsADirectoryError(
                f"weights path {path} is a directory and no model folder; give the weights file (.safetensors or "
                f".pth) or a folder holding one of timm's weight files ({', '.join(WEIGHT_NAMES)}; beside timm's "
                "config.json, any *.safetensors, *.pth, *.bin)"
            )
        regular_file(path, "weights file", "give the file")
        listed = listed_sha256(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise ValueError(f"weights file {path} is empty")
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable views, the file untouched
        digest = hashlib.sha256(buffer).hexdigest() if listed is not None else ""
        if listed is not None and digest != listed:
            raise ValueError(
                f"weights file {path} is corrupted or was replaced: its sha256 {digest} is not the {listed} listed "
                f"in {path.parent / 'config.json'}; reinstall the package (or restore the file)"
            )
        if _is_safetensors(buffer):
            metadata, state = _read_safetensors(buffer, path)
            _refuse_other_formats(metadata, path)
            held = PLAIN_STATE_DICT
        else:
            content = _read_torch(buffer, path)
            state, held = _unwrap(content, path, use_ema)
            metadata = _trainer_record(content)
        if use_ema and held == PLAIN_STATE_DICT:
            raise ValueError(f"use_ema=True, but {path} holds a plain state dict, no EMA weights; drop use_ema")
        cleaned = clean_state_dict(state)
        removed = {k[: len(k) - len(c)] for k, c in zip(state, cleaned) if k != c}  # e.g. 'module._orig_mod.'
        if removed:
            wrappers = [w for prefix, w in _WRAPPER_PREFIXES.items() if any(prefix in r for r in removed)]
            held += f"; stripped the {' and '.join(wrappers)} prefix"
        if held != PLAIN_STATE_DICT:
            _logger.info("%s: %s", path, held)
        return cls(path, metadata, cleaned, held, digest)


def _is_safetensors(buffer: mmap.mmap) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian) and the header, a JSON object."""
    return len(buffer) >= 9 and buffer[8:9] == b"{"


def _read_safetensors(buffer: mmap.mmap, path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Metadata and tensors (views of ``buffer``) of a safetensors file, every declared offset checked first."""
    size, length = len(buffer), int.from_bytes(buffer[:8], "little")
    bad = f"cannot read weights file {path}: not valid safetensors"
    if length > min(_MAX_HEADER_BYTES, size - 8):
        raise ValueError(f"{bad} (truncated at byte {size}): its header declares {length} bytes")
    metadata, header = _header(bytes(buffer[8 : 8 + length]), bad)
    start, state = 8 + length, {}
    for key, entry in header.items():
        dtype, shape, begin, end = _entry(entry)
        if dtype is None:
            raise ValueError(f"{bad}: tensor {key!r} has a malformed entry {entry!r:.200}")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise ValueError(f"{bad}: tensor {key!r} declares shape {shape} of {dtype} but {end - begin} bytes")
        if start + end > size:
            raise ValueError(f"{bad} (truncated at byte {size}): tensor {key!r} ends at byte {start + end}")
        state[key] = _view(buffer, start + begin, dtype, shape)
    return metadata, state


def _header(data: bytes, bad: str) -> tuple[dict[str, str], dict]:
    """(metadata, tensor entries) of a safetensors header's bytes; a ValueError (``bad``: its start) otherwise."""
    try:
        header = json.loads(data)
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{bad}: its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: its header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{bad}: its __metadata__ must map names to strings, got {metadata!r:.200}")
    return metadata, header


def _entry(entry: object) -> tuple[torch.dtype | None, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of a header entry; dtype None when it is malformed."""
    shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if isinstance(entry, dict) else (None, None)
    if not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
        return None, (), 0, 0
    ints = shape + offsets
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ints) or offsets[0] > offsets[1]:
        return None, (), 0, 0
    return _DTYPES.get(entry.get("dtype")), tuple(shape), offsets[0], offsets[1]


def _view(buffer: mmap.mmap, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor over the file's bytes, copied only when used (writers align the data to 8 bytes; CPU kernels read
    unaligned data of a file that does not)."""
    count = math.prod(shape)
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=count, offset=offset).view(shape)


def _refuse_other_formats(metadata: dict[str, str], path: Path) -> None:
    """A safetensors file whose metadata says it holds something else than weights (our training state) is refused."""
    fmt = metadata.get("format", "pt")
    if fmt not in _WEIGHT_FORMATS:
        what = (
            " (a training state of tools/train.py: resume it with --resume; the run's weights are its "
            "model_train.safetensors)"
            if "state" in metadata
            else ""
        )
        raise ValueError(f"weights file {path} is not a state dict: its metadata says format {fmt!r}{what}")


def _read_torch(buffer: mmap.mmap, path: Path) -> object:
    """A torch file's content, unpickled with ``weights_only=True``; any other file is named for what it is."""
    head = bytes(buffer[:16])
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and head[2:3] in _ONNX_FIELDS):
        raise ValueError(
            f"cannot read weights file {path}: not a checkpoint: this is an ONNX file (repmlp-eval --onnx "
            "runs it, and repmlp-predict once it is named *.onnx; to convert or export, give the file it came from)"
        )
    for magic, what, fix in _NOT_CHECKPOINTS:
        if head.startswith(magic):
            raise ValueError(f"cannot read weights file {path}: not a checkpoint: this is {what}; {fix}")
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip (torch >= 1.6), or a bare pickle
        raise ValueError(
            f"cannot read weights file {path}: not a checkpoint: neither safetensors nor a torch file (it starts with "
            f"{head[:8]!r}); give a .safetensors or .pth file"
        )
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(buffer, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" in str(err) and "GLOBAL" in str(err):
            raise ValueError(_needs_unpickling(path, err)) from None
        raise ValueError(f"cannot read weights file {path}: corrupted or truncated torch file ({err})") from None
    except Exception as err:  # noqa: BLE001 - whatever the unpickler raises means a broken file
        raise ValueError(
            f"cannot read weights file {path}: corrupted or truncated torch file ({type(err).__name__}: {err})"
        ) from None


def _needs_unpickling(path: Path, err: Exception) -> str:
    """What a torch file holds that ``weights_only=True`` (with timm's allowance) does not read, and what to do: a
    recipe for one's own trusted file, none for a file that names a function of the modules that run commands."""
    allowed = {f"{g.__module__}.{g.__qualname__}" for g in _SAFE_GLOBALS}
    found = [g for g in re.findall(r"GLOBAL (\S+)", str(err)) if g not in allowed]
    what = f"a {found[0]} object" if len(found) == 1 else f"{', '.join(found)} objects" if found else "Python objects"
    said = (
        f"cannot read weights file {path}: it holds {what} besides tensors and plain containers, and is not "
        f"unpickled (that can run code; only {', '.join(sorted(allowed))} is, as timm's loader allows)"
    )
    if any(g.startswith(_COMMAND_MODULES) for g in found):
        return f"{said}. Those run commands: do not unpickle this file; ask its sender for a .safetensors file"
    return (
        f"{said}. If you trust it, save its state dict alone and load that: torch.save(torch.load(path, "
        "weights_only=False)['state_dict'], 'weights.pth') (or the key that holds the tensors)"
    )


def _trainer_record(content: object) -> dict[str, str]:
    """``model``, ``num_classes`` and ``model_kwargs`` a timm ``train.py`` checkpoint's ``args`` record, in the form
    of our files' metadata (unjudged); {} for any other content."""
    args = content.get("args") if isinstance(content, dict) else None
    model = getattr(args, "model", None) if isinstance(args, argparse.Namespace) else None
    if not isinstance(model, str) or model.startswith(("hf-hub:", "local-dir:")):  # a source: the user names the model
        return {}
    record = {"model": model}
    if getattr(args, "num_classes", None) is not None:
        record["num_classes"] = str(args.num_classes)
    kwargs = getattr(args, "model_kwargs", None) or {}
    if getattr(args, "in_chans", None) is not None and isinstance(kwargs, dict):
        kwargs = {**kwargs, "in_chans": args.in_chans}
    try:
        record["model_kwargs"] = json.dumps(kwargs)
    except (TypeError, ValueError):  # not JSON: the caller's arguments must name them
        pass
    return record


def _tensors(value: object) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrap(content: object, path: Path, use_ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a torch file's content (itself, or a trainer checkpoint's entry) and what the file held."""
    if _tensors(content):
        return content, PLAIN_STATE_DICT
    if not isinstance(content, dict):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors (it holds a {type(content)})")
    ema = next((k for k in _EMA_KEYS if _tensors(content.get(k))), None)
    plain = next((k for k in _PLAIN_KEYS if _tensors(content.get(k))), None)
    what = _describe_trainer_file(content)
    if plain is None and ema is None:
        raise ValueError(
            f"weights file {path} does not hold a state dict of tensors: {what}, none of {_PLAIN_KEYS + _EMA_KEYS} "
            "holds tensors"
        )
    if use_ema and ema is None:
        raise ValueError(f"use_ema=True, but {path} holds no EMA weights ({what}); drop use_ema to load {plain!r}")
    key = ema if use_ema or plain is None else plain
    held = f"{what}; loaded {key!r}"
    if key == plain and ema is not None:
        held += f"; it also holds EMA weights {ema!r} (use_ema=True, or --ema in our tools, loads them)"
    elif key == ema and plain is None:
        held += " (the only weights in it)"
    if _LIGHTNING_KEY in content:
        return _lightning_module_weights(content[key], held)
    return content[key], held


def _lightning_module_weights(state: dict[str, torch.Tensor], held: str) -> tuple[dict[str, torch.Tensor], str]:
    """A Lightning checkpoint holds its LightningModule's state dict: the model's keys under the attribute that holds
    it (``model.``), stripped when every key has it."""
    attributes = {k.split(".", 1)[0] for k in state}
    if len(attributes) != 1 or not all("." in k for k in state):
        return state, f"{held}; keys of the LightningModule under {sorted(attributes)}, not stripped"
    prefix = f"{attributes.pop()}."
    return {k[len(prefix) :]: v for k, v in state.items()}, f"{held}; stripped the LightningModule's {prefix!r} prefix"


def _describe_trainer_file(content: dict) -> str:
    """What a trainer's checkpoint is: timm's (``args``, or its ``CheckpointSaver``'s entries), Lightning's, another."""
    if isinstance(content.get("args"), argparse.Namespace) or "saver" in content:
        facts = ", ".join(f"{k} {content[k]}" for k in ("arch", "epoch", "metric") if k in content)
        who = "timm train.py" if isinstance(content.get("args"), argparse.Namespace) else "timm CheckpointSaver"
        return f"a {who} checkpoint ({facts})"
    if _LIGHTNING_KEY in content:
        facts = ", ".join(f"{k} {content[k]}" for k in ("epoch", "global_step") if k in content)
        return f"a Lightning checkpoint ({facts})"
    return f"a checkpoint with entries {sorted(map(str, content))}"
