"""Datasets and loaders: ImageNet-style folders, CIFAR-10/100 python batches, Fashion-MNIST IDX files, a synthetic
set, and timm's dataset specs (``tar``, ``wds/...``, ``hfds/...``, ``torch/...``, see :mod:`repmlp.data_timm`), all
feeding timm's transforms.

Each reader checks the on-disk layout and raises a ValueError (missing or malformed data) that names
the path and the layout it expected.
"""

from __future__ import annotations

import gzip
import itertools
import os
import pickle
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_transform
from timm.utils.misc import natural_key
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset
from torchvision import transforms

from .data_timm import align_to_training_classes, is_timm_spec, restart_epoch, shard_iterable, timm_dataset

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

DATASETS = ("imagefolder", "cifar10", "cifar100", "fashion_mnist", "synthetic")
#: timm's dataset specs, read by :func:`repmlp.data_timm.timm_dataset`.
TIMM_SPECS = ("tar", "wds/NAME", "hfds/PATH", "torch/NAME")
SPLITS = ("train", "val")

_IMAGEFOLDER_LAYOUT = "<root>/train/<class>/<image> and <root>/val/<class>/<image>"
_CIFAR_LAYOUT = {
    "cifar10": "CIFAR-10 python batches: <root>/data_batch_1 .. data_batch_5 and <root>/test_batch "
    "(or the same inside <root>/cifar-10-batches-py)",
    "cifar100": "CIFAR-100 python pickles: <root>/train and <root>/test (or inside <root>/cifar-100-python)",
}
_FMNIST_LAYOUT = (
    "Fashion-MNIST IDX files, gzipped or raw: <root>/train-images-idx3-ubyte[.gz], "
    "train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] "
    "(Debian: apt-get install dataset-fashion-mnist)"
)


#: The label of an image that could not be decoded, where bad images are skipped (``skip_bad_images``): evaluation
#: leaves such samples out and counts them.
SKIPPED_LABEL = -1
#: Most bytes of images a synthetic dataset may hold in memory.
MAX_SYNTHETIC_BYTES = 4 << 30


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raise ValueError naming ``where`` and the first offending label unless every label is in [0, num_classes)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise ValueError(
            f"{where}: label {int(labels[bad[0]])} (sample {int(bad[0])}, {bad.size} such) is outside the "
            f"{num_classes} classes 0..{num_classes - 1}; the labels file is corrupt or of another dataset"
        )


class ArrayImageDataset(Dataset):
    """Images held in memory as uint8 arrays (N, H, W) or (N, H, W, 3), served as PIL images."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable | None = None,
        num_classes: int | None = None,
        where: str = "ArrayImageDataset",
    ) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{where}: {len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, labels.astype(np.int64), transform
        self.num_classes = num_classes or int(self.labels.max()) + 1
        check_labels(self.labels, self.num_classes, where)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[object, int]:
        img = Image.fromarray(self.images[index])
        return (self.transform(img) if self.transform else img), int(self.labels[index])


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise ValueError(f"dataset directory {path} not found; expected {layout}")
    return path


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (MNIST format, optionally gzipped) of unsigned bytes into a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(
            f"{path} is not an IDX file of unsigned bytes (magic 0x0000 08 nd expected, "
            f"got {data[:4].hex() or 'empty file'})"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) != header + int(np.prod(shape)):
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({header + int(np.prod(shape))} bytes) "
            f"but the file has {len(data)} bytes; the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (root / name).is_file():
            return root / name
    raise ValueError(f"Fashion-MNIST file {root / stem}[.gz] not found; expected {_FMNIST_LAYOUT}")


def fashion_mnist(root: str | Path | None, split: str, transform: Callable | None = None) -> ArrayImageDataset:
    """Fashion-MNIST from IDX files: 60,000 train / 10,000 test 28x28 grayscale images, 10 classes."""
    root = _require_dir(Path(root or FASHION_MNIST_ROOT), _FMNIST_LAYOUT)
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"Fashion-MNIST in {root}: images {images.shape} and labels {labels.shape} do not "
            f"match; expected (N, 28, 28) images and (N,) labels"
        )
    dataset = ArrayImageDataset(images, labels, transform, 10, f"Fashion-MNIST {split} split in {root}")
    dataset.label_names = list(FASHION_MNIST_LABELS)
    return dataset


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles built-in containers, numbers, strings and numpy arrays only: a crafted file cannot name a
    function to run. The allowed names are those numpy (1.x and 2.x) and Python 2/3 write for arrays and bytes."""

    ALLOWED = {
        (core, name)
        for core in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    ALLOWED |= {
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a dataset batch holds only arrays, lists, dicts, numbers and strings"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy 2 reads numpy.core.* via a shim
            return super().find_class(module, name)


def _unpickle(path: Path, layout: str) -> dict:
    if not path.is_file():
        raise ValueError(f"CIFAR file {path} not found; expected {layout}")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a malformed file
        raise ValueError(f"CIFAR file {path} is not a python pickle of arrays ({e}); expected {layout}") from e
    if not isinstance(batch, dict):
        raise ValueError(f"CIFAR file {path} holds a {type(batch).__name__}, not a dict; expected {layout}")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def cifar(name: str, root: str | Path, split: str, transform: Callable | None = None) -> ArrayImageDataset:
    """CIFAR-10 or CIFAR-100 from the python pickles as distributed (``name`` 'cifar10' or 'cifar100')."""
    layout = _CIFAR_LAYOUT[name]
    root = _require_dir(Path(root), layout)
    sub = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    root = sub if sub.is_dir() else root
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key = "labels"
    else:
        files, label_key = ["train" if split == "train" else "test"], "fine_labels"
    images, labels = [], []
    for file in files:
        batch = _unpickle(root / file, layout)
        if "data" not in batch or label_key not in batch:
            raise ValueError(f"CIFAR file {root / file} lacks the 'data' and '{label_key}' entries; expected {layout}")
        data = np.asarray(batch["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[label_key]):
            raise ValueError(
                f"CIFAR file {root / file}: 'data' has shape {data.shape} for "
                f"{len(batch[label_key])} labels; expected (N, 3072) uint8 rows"
            )
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[label_key]))
    num_classes = 10 if name == "cifar10" else 100
    where = f"{name} {split} split in {root}"
    dataset = ArrayImageDataset(np.concatenate(images), np.concatenate(labels), transform, num_classes, where)
    if name == "cifar10":
        dataset.label_names = list(CIFAR10_LABELS)
    return dataset


def folder_classes(root: str | Path) -> dict[str, int]:
    """Class index of each class folder of ``<root>/train``, in timm's (natural) order; both splits use it, so a
    class missing from ``val/`` cannot shift the others."""
    train = _require_dir(Path(root) / "train", _IMAGEFOLDER_LAYOUT)
    names = sorted((entry.name for entry in os.scandir(train) if entry.is_dir()), key=natural_key)
    if not names:
        raise ValueError(f"image folder {train} holds no class folders; expected {_IMAGEFOLDER_LAYOUT}")
    return {name: index for index, name in enumerate(names)}


class ImageFolderDataset(ImageDataset):
    """timm's image-folder dataset, decoding each image once: an image that cannot be decoded (corrupt, empty, over
    PIL's pixel bound) is a ValueError naming its file, or with ``skip_bad`` a sample labelled
    :data:`SKIPPED_LABEL` (a blank image) that evaluation leaves out and counts; never, as timm does, silently
    another image in its place."""

    skip_bad = False

    def __getitem__(self, index: int) -> tuple[object, int]:
        source, target = self.reader[index][:2]
        try:
            img = Image.open(source)
            img = img.convert(self.input_img_mode)  # decodes the pixels
        except Image.DecompressionBombError as err:  # kept: a bound against images that exhaust memory
            img, target = self._bad(
                index,
                f"is too large to decode ({err}); resize it, or raise PIL.Image.MAX_IMAGE_PIXELS if it is a real image",
            )
        except (OSError, SyntaxError, ValueError) as err:  # PIL raises these for undecodable files
            img, target = self._bad(index, f"cannot be decoded ({err}); remove or replace it")
        if self.transform is not None:
            img = self.transform(img)
        if target != SKIPPED_LABEL and self.target_transform is not None:
            target = self.target_transform(target)
        return img, target

    def _bad(self, index: int, problem: str) -> tuple[Image.Image, int]:
        if not self.skip_bad:
            raise ValueError(
                f"image {self.filename(index, absolute=True)} {problem} (or evaluate with --skip-bad-images to leave "
                "such images out and count them)"
            )
        return Image.new(self.input_img_mode, (8, 8)), SKIPPED_LABEL


def image_folder(
    root: str | Path, split: str, transform: Callable | None = None, skip_bad_images: bool = False
) -> Dataset:
    """ImageNet-style class folders: ``<root>/<split>/<class>/<image>``, classes numbered by ``<root>/train``.

    A ``val/`` class folder unknown to ``train/`` is an error; a training class without a ``val/`` folder is
    allowed and reported (a warning). An image that cannot be decoded is an error naming it, or with
    ``skip_bad_images`` left out and counted by evaluation (:class:`ImageFolderDataset`).
    """
    folder = _require_dir(Path(root) / split, _IMAGEFOLDER_LAYOUT)
    class_to_idx = folder_classes(root)
    try:
        dataset = ImageFolderDataset(str(folder))
        dataset.skip_bad = skip_bad_images
    except Exception as e:  # noqa: BLE001 - timm raises RuntimeError/AssertionError for empty folders
        raise ValueError(f"cannot read image folder {folder}: {e}; expected {_IMAGEFOLDER_LAYOUT}") from e
    if len(dataset) == 0:
        raise ValueError(f"image folder {folder} holds no images; expected {_IMAGEFOLDER_LAYOUT}")
    align_to_training_classes(dataset, class_to_idx, f"image folder {folder}")
    dataset.num_classes, dataset.transform = len(class_to_idx), transform
    dataset.label_names = list(class_to_idx)  # the folder names, in class-index order
    return dataset


def synthetic(
    split: str,
    num_samples: int = 256,
    num_classes: int = 10,
    img_size: int = 32,
    in_chans: int = 3,
    seed: int = 0,
    transform: Callable | None = None,
) -> ArrayImageDataset:
    """Random images whose mean brightness depends on the class, so a model can learn them (smoke tests)."""
    if in_chans not in (1, 3):
        raise ValueError(f"synthetic: in_chans must be 1 or 3 (PIL images), got {in_chans}")
    size = int(num_samples) * int(img_size) ** 2 * in_chans
    if size > MAX_SYNTHETIC_BYTES:
        raise ValueError(
            f"synthetic: {num_samples} images of {in_chans}x{img_size}x{img_size} would take {size / 2**30:.3g} GiB "
            f"of memory (at most {MAX_SYNTHETIC_BYTES / 2**30:.0f} GiB); lower data.synthetic.num_samples"
        )
    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    labels = rng.integers(0, num_classes, num_samples)
    shape = (num_samples, img_size, img_size) + ((in_chans,) if in_chans == 3 else ())
    base = (labels * (200 // max(num_classes - 1, 1))).reshape(-1, *([1] * (len(shape) - 1)))
    images = np.clip(base + rng.integers(0, 56, shape), 0, 255).astype(np.uint8)
    return ArrayImageDataset(images, labels, transform, num_classes, "synthetic")


def label_names_of(dataset: Dataset) -> list[str] | None:
    """Class names of a dataset made by :func:`build_dataset`, in class-index order (None where the data names
    none: synthetic images, WebDataset labels)."""
    names = getattr(dataset, "label_names", None)
    return list(names) if names is not None else None


def num_classes_of(dataset: Dataset) -> int:
    """Number of classes of a dataset made by :func:`build_dataset` (the training classes, also for val)."""
    return dataset.num_classes


def build_dataset(
    name: str,
    split: str,
    root: str | None = None,
    transform: Callable | None = None,
    split_names: dict[str, str | None] | None = None,
    classes: int | None = None,
    skip_bad_images: bool = False,
    **synthetic_args,
) -> Dataset:
    """A dataset by name (one of :data:`DATASETS`, or a timm spec of :data:`TIMM_SPECS`) and split ('train' or
    'val'; 'val' is the test set of CIFAR and Fashion-MNIST). The one place that decides how a spec is read.

    ``split_names`` (timm specs only) are the splits' names on disk, {'train': ..., 'val': ...}; ``classes`` the
    class count (data.num_classes),
    needed by WebDataset shards without one in their ``_info.json`` and checked against the data's for the others.
    ``skip_bad_images`` (image folders): leave undecodable images out, labelled :data:`SKIPPED_LABEL`, instead of
    stopping at the first with an error naming it.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if is_timm_spec(name):
        return timm_dataset(name, split, root, transform, split_names, classes)
    for key, value in (split_names or {}).items():
        if value is not None:
            raise ValueError(f"data.{key}_split={value!r} applies to timm's specs {TIMM_SPECS}, not {name!r}")
    if name == "imagefolder" and root is not None:
        dataset = image_folder(root, split, transform, skip_bad_images)
    else:
        dataset = _named_dataset(name, split, root, transform, synthetic_args)
    if classes and classes != dataset.num_classes:
        raise ValueError(f"data.num_classes={classes} but dataset {name!r} has {dataset.num_classes} classes")
    return dataset


def _named_dataset(name: str, split: str, root: str | None, transform: Callable | None, synthetic_args: dict):
    if name == "synthetic":
        return synthetic(split, transform=transform, **synthetic_args)
    if name == "fashion_mnist":
        return fashion_mnist(root, split, transform)
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory (data.root)")
    if name in ("cifar10", "cifar100"):
        return cifar(name, root, split, transform)
    if name == "imagefolder":
        return image_folder(root, split, transform)
    raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS} or a timm spec {TIMM_SPECS}")


def build_transform(
    is_training: bool,
    input_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    crop_pct: float = 1.0,
    interpolation: str = "bilinear",
    crop_padding: int = 0,
    crop_mode: str = "center",
    **train_args,
) -> Callable:
    """timm's train or eval transform; ``crop_padding`` > 0 prepends a pad-and-random-crop (the CIFAR
    recipe) and then keeps timm's random-resized crop at full scale so it does not resize. ``crop_mode`` is timm's
    for evaluation ('center': resize the short edge to size / crop_pct; 'squash': both edges).

    ``train_args`` go to :func:`timm.data.create_transform` (hflip, scale, ratio, color_jitter,
    auto_augment, re_prob, ...) for training and are ignored for evaluation.
    """
    common = dict(input_size=tuple(input_size), mean=tuple(mean), std=tuple(std), interpolation=interpolation)
    if not is_training:
        return create_transform(is_training=False, crop_pct=crop_pct, crop_mode=crop_mode, **common)
    if crop_padding:
        train_args = dict(train_args, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    transform = create_transform(is_training=True, **common, **train_args)
    if crop_padding:
        pad_crop = transforms.RandomCrop(tuple(input_size[-2:]), padding=crop_padding)
        transform = transforms.Compose([pad_crop, *transform.transforms])
    return transform


class EpochSampler(DistributedSampler):
    """A :class:`DistributedSampler` that can start an epoch part-way: it skips its first ``skip`` indices
    (a run resumed mid-epoch sees exactly the samples the interrupted one had not reached)."""

    skip: int = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def build_loader(
    dataset: Dataset,
    batch_size: int,
    is_training: bool,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over this rank's share of ``dataset``.

    Training shuffles with an :class:`EpochSampler` (start each epoch with :func:`epoch_batches`; the
    order is a function of seed and epoch only, which makes resumed runs exact) and drops the last
    partial batch (Mixup needs even batches). Evaluation reads every ``world_size``-th sample in order,
    without padding, so the ranks' counts sum to the dataset size. An iterable dataset (WebDataset shards)
    is sharded by its reader, by shard: see :func:`repmlp.data_timm.shard_iterable`.
    """
    if isinstance(dataset, IterableDataset):
        shard_iterable(dataset, batch_size, num_workers, rank, world_size, seed)
        sampler = None
        if is_training and len(dataset) < batch_size:
            raise ValueError(
                f"the training shards hold {len(dataset)} samples per process, fewer than one batch "
                f"(train.batch_size={batch_size}); use more data or a smaller batch"
            )
    elif is_training:
        sampler = EpochSampler(dataset, world_size, rank, shuffle=True, seed=seed, drop_last=True)
        if len(sampler) < batch_size:  # drop_last would leave no batch at all
            fix = f"set train.batch_size to at most {len(sampler)} or " if len(sampler) else ""
            raise ValueError(
                f"the training set has {len(dataset)} samples, {len(sampler)} per process on "
                f"{world_size} process(es), fewer than one batch (train.batch_size={batch_size}); "
                f"{fix}use more data"
            )
    else:
        sampler = range(rank, len(dataset), world_size)
    return DataLoader(
        dataset,
        batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=is_training,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
    )


def worker_error(err: BaseException) -> str:
    """The message of an error raised in a DataLoader worker without the traceback torch puts in it."""
    text = str(err)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def epoch_batches(loader: DataLoader, epoch: int, skip: int = 0) -> Iterator:
    """The batches of training epoch ``epoch``, from batch ``skip`` on (a run resumed mid-epoch).

    A map-style dataset's sampler skips the first ``skip * batch_size`` indices. An iterable dataset has no random
    access, so its first ``skip`` batches are read again and dropped: exact, given the same processes and loader
    workers, at the cost of reading them.
    """
    if isinstance(loader.dataset, IterableDataset):
        restart_epoch(loader.dataset, epoch)
        batches = iter(loader)
        replayed = sum(1 for _ in itertools.islice(batches, skip))
        if replayed < skip:
            raise ValueError(
                f"cannot resume epoch {epoch} at batch {skip}: the shards now give {replayed} batches per epoch; "
                "resume with the data, processes and data.num_workers of the interrupted run"
            )
        return batches
    loader.sampler.set_epoch(epoch)
    loader.sampler.skip = skip * loader.batch_size
    return iter(loader)
