"""Run a model file on image files: the top-k classes by name.

One function for the three file kinds a deployment has (:func:`load_predictor`): our safetensors files, model
folders and run directories (any form; a train-form file runs as it is), ONNX files (onnxruntime) and OpenVINO IR
``.xml`` files (when ``openvino`` is installed). Each file carries what running it needs
(:mod:`repmlp.preprocess`): class names, input size, mean/std, interpolation and crop, so no model name or data
setting is asked for.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from .data import build_transform
from .locations import regular_file
from .onnx_io import onnx_input, onnx_predictor
from .preprocess import LABEL_KEY, OPENVINO_SECTION, input_metadata, parse_input_metadata
from .quantize import FixedBatch
from .sources import judged_record, model_from_checkpoint
from .weights_file import WeightsFile

__all__ = ["IMAGE_SUFFIXES", "Prediction", "Predictor", "image_files", "load_predictor", "predict"]

#: File name endings read as images where a folder is given (files named one by one may have any name).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


@dataclass
class Prediction:
    """The top-k classes of one image, best first: (class name, probability)."""

    path: str
    top: list[tuple[str, float]]

    def __str__(self) -> str:
        return f"{self.path}: " + ", ".join(f"{name} {prob:.1%}" for name, prob in self.top)


class Predictor:
    """A model file ready to run on images: ``logits(images)`` and :meth:`predict`."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], settings: dict[str, Any], source: str) -> None:
        missing = [key for key in ("input_size", "mean", "std") if key not in settings]
        if missing:
            raise ValueError(
                f"{source} records no {', '.join(missing)}: it cannot say how to prepare images. Write it with "
                "repmlp-convert, repmlp-export (--format openvino for an IR) or tools/train.py, which record them"
            )
        self.run, self.settings, self.source = run, settings, source
        self.input_size = tuple(settings["input_size"])
        self.label_names: list[str] | None = settings.get(LABEL_KEY)
        self.transform = build_transform(
            False,
            self.input_size,
            settings["mean"],
            settings["std"],
            settings.get("crop_pct", 1.0),
            settings.get("interpolation", "bilinear"),
            crop_mode=settings.get("crop_mode", "center"),
        )

    def image(self, path: str | os.PathLike) -> torch.Tensor:
        """One image file as the model's input tensor (C, H, W): grey or RGB as the model takes it."""
        try:
            with Image.open(path) as img:
                img = img.convert("L" if self.input_size[0] == 1 else "RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from err
        return self.transform(img)

    @torch.no_grad()
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch (N, C, H, W) of prepared images."""
        return self.run(images).float()

    def predict(self, paths: Sequence[str | os.PathLike], top_k: int = 5, batch_size: int = 16) -> list[Prediction]:
        """The ``top_k`` classes of each image file, in the order given."""
        out = []
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            probs = self.logits(torch.stack([self.image(p) for p in chunk])).softmax(dim=1)
            values, indices = probs.topk(min(top_k, probs.shape[1]), dim=1)
            for path, vals, idxs in zip(chunk, values.tolist(), indices.tolist()):
                out.append(Prediction(str(path), [(self.class_name(i), v) for i, v in zip(idxs, vals)]))
        return out

    def class_name(self, index: int) -> str:
        """The recorded name of class ``index`` (``class <index>`` where the file records no names)."""
        names = self.label_names
        return names[index] if names and index < len(names) else f"class {index}"


def load_predictor(path: str | os.PathLike) -> Predictor:
    """A :class:`Predictor` for a model file: ``.onnx`` (onnxruntime, needs the ``onnx`` extra), ``.xml``
    (OpenVINO IR, needs ``openvino``), else weights our loader reads (safetensors, a model folder, a torch file).

    Raises:
        ValueError: a file that is missing, is no regular file, is not of its kind (ONNX, OpenVINO IR, weights),
            records too little to run alone or records a transform out of bounds; the message names the file and
            says what to do.
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"model file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        settings, batch = onnx_input(path)  # checked before a session is built
        run = FixedBatch(onnx_predictor(path), batch)  # batch None: any batch
        return Predictor(run, settings, str(path))
    if suffix == ".xml":
        return _openvino_predictor(path)
    weights = WeightsFile.open(path)  # read once: the model and what the file records
    model = model_from_checkpoint(weights).eval()
    recorded = {**input_metadata(model), **judged_record(weights.metadata, weights.path)}  # the file's over the model's
    return Predictor(model, parse_input_metadata(recorded, str(weights.path)), str(path))


def _openvino_predictor(path: Path) -> Predictor:
    weights = path.with_suffix(".bin")  # read beside the .xml: checked too where it is there
    for file in (path, weights) if weights.exists() else (path,):
        regular_file(file, "OpenVINO IR file", "give the .xml (and its .bin) that repmlp-export wrote")
    try:
        import openvino
    except ImportError as err:
        raise ValueError(f"{path} is an OpenVINO IR file: install openvino to run it ({err})") from err
    core = openvino.Core()
    try:
        model = core.read_model(str(path))
    except RuntimeError as err:
        raise ValueError(f"{path} is not an OpenVINO IR file openvino can read ({err})") from None
    meta = {}
    if model.has_rt_info([OPENVINO_SECTION]):
        meta = {key: value.astype(str) for key, value in model.get_rt_info([OPENVINO_SECTION]).astype(dict).items()}
    settings = parse_input_metadata(meta, str(path))
    compiled = core.compile_model(model, "CPU")
    return Predictor(lambda x: torch.from_numpy(compiled(x.numpy())[0]), settings, str(path))


def image_files(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named one by one, and the images under folders (recursively, by :data:`IMAGE_SUFFIXES`, sorted).

    Raises:
        ValueError: a name that does not exist, or no image at all.
    """
    items, files = [Path(item) for item in items], []
    for item in items:
        if item.is_dir():
            files += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            files.append(item)
        else:
            raise ValueError(f"{item} does not exist")
    if not files:
        raise ValueError(f"no image files in {[str(i) for i in items]} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return files


def predict(
    model_file: str | os.PathLike, images: Iterable[str | os.PathLike], top_k: int = 5, batch_size: int = 16
) -> list[Prediction]:
    """The ``top_k`` classes, by name, of each image file (or image in a folder) under a model file.

    Example:
        >>> for p in predict("runs/mine/model_deploy.safetensors", ["new_photos/"]):  # doctest: +SKIP
        ...     print(p)  # new_photos/a.jpg: cat 91.2%, dog 8.1%, ...
    """
    return load_predictor(model_file).predict(image_files(images), top_k, batch_size)
