"""Datasets as timm names them, read by :func:`timm.data.create_dataset`: a tar of class folders (``tar``),
WebDataset shards (``wds/NAME``), a local Hugging Face dataset (``hfds/PATH``) and torchvision sets
(``torch/NAME``). What this module adds to timm's readers: the val split numbered by the train split's classes,
sizes and labels checked, and errors that name the spec, the path and what was found there.

WebDataset shards are read as an iterable dataset (no random access): :func:`shard_iterable` sets the sharding
a loader needs, and a resumed epoch replays its first batches (see ``repmlp.data.epoch_batches``).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_VAL_SPLIT",
    "TIMM_PREFIXES",
    "LabelCheck",
    "align_to_training_classes",
    "class_names",
    "is_timm_spec",
    "restart_epoch",
    "shard_iterable",
    "spec_kind",
    "timm_dataset",
    "wds_num_classes",
]

import os
import warnings
from collections.abc import Callable
from pathlib import Path

from timm.data import create_dataset
from timm.utils.misc import natural_key
from torch.utils.data import Dataset, IterableDataset

from .locations import read_json

#: Prefixes of the dataset specs read by timm (``tar`` is a spec of its own).
TIMM_PREFIXES = ("wds/", "hfds/", "torch/")
#: The on-disk name of the val split when data.val_split is not given.
DEFAULT_VAL_SPLIT = {"tar": "val", "wds": "validation", "hfds": "validation", "torch": "val"}

_LAYOUT = {
    "tar": "<root>/<split>.tar holding <class>/<image> entries (or one <class>.tar per class)",
    "wds": "WebDataset shards in <root> with <root>/_info.json naming each split's files and sizes "
    "(timm's format), or a split given as a brace pattern with its size, e.g. 'train-{0000..0099}.tar|128000'",
    "hfds": "a Hugging Face dataset on disk (save_to_disk, parquet or arrow files) with 'image' and 'label' "
    "columns; data.root is the datasets cache directory",
    "torch": "a torchvision dataset already in <root> (nothing is downloaded)",
}


def is_timm_spec(name: str) -> bool:
    return name == "tar" or name.lower().startswith(TIMM_PREFIXES)


def spec_kind(name: str) -> str:
    """'tar', 'wds', 'hfds' or 'torch'."""
    return "tar" if name == "tar" else name.partition("/")[0].lower()


class LabelCheck:
    """Target transform that renumbers labels into the training classes and refuses any outside them."""

    def __init__(self, num_classes: int, where: str, lookup: list[int] | None = None) -> None:
        self.num_classes, self.where, self.lookup = num_classes, where, lookup

    def __call__(self, label: int) -> int:
        label = int(label)
        if self.lookup is not None:
            label = self.lookup[label]
        if not 0 <= label < self.num_classes:
            raise ValueError(f"{self.where}: label {label} is outside the {self.num_classes} training classes")
        return label


def class_names(dataset: Dataset) -> dict[str, int] | None:
    """Class name -> index of a dataset timm built (None where the data names no classes: WebDataset labels)."""
    reader = getattr(dataset, "reader", None)
    for source in (reader, dataset):
        for attribute in ("class_to_idx", "class_name_to_idx"):
            names = getattr(source, attribute, None)
            if names:
                return dict(names)
    return None


def align_to_training_classes(
    dataset: Dataset, train_classes: dict[str, int], where: str, present: set[str] | None = None
) -> None:
    """Number ``dataset``'s labels by the training classes (a target transform where its own numbering differs).

    ``present``: the classes that have samples, where the data lists classes it has none of (a Hugging Face
    ClassLabel); default: all it names.

    Raises:
        ValueError: a class the training split lacks.
    Warns:
        UserWarning: training classes absent from ``dataset`` (the others keep their training indices).
    """
    own = class_names(dataset) or {}
    unknown = sorted(set(own) - set(train_classes), key=natural_key)
    if unknown:
        raise ValueError(
            f"{where} has {len(unknown)} classes that the train split lacks: {unknown[:10]}; both splits must use "
            "the training classes"
        )
    missing = sorted(set(train_classes) - set(own if present is None else present), key=natural_key)
    if missing:
        warnings.warn(
            f"{where} has no images of {len(missing)} of the {len(train_classes)} training classes: {missing[:10]}; "
            "the others keep their training indices",
            stacklevel=3,
        )
    lookup = [0] * len(own)
    for name, index in own.items():
        lookup[index] = train_classes[name]
    identity = lookup == list(range(len(own)))
    dataset.target_transform = LabelCheck(len(train_classes), where, None if identity else lookup)


def _found(path: Path) -> str:
    if not path.exists():
        return f"{path} does not exist"
    if path.is_file():
        return f"{path} is a file"
    names = sorted(os.listdir(path))
    return f"{path} holds {names[:10]}" + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _create(name: str, root: str | None, split: str, is_training: bool, where: str) -> Dataset:
    """timm's ``create_dataset``, its errors turned into a ValueError naming the spec, the path and the layout."""
    kind = spec_kind(name)
    timm_name, timm_root = name, root
    if kind == "tar":
        timm_name, timm_root = "", str(Path(root) / f"{split}.tar")
        if not Path(timm_root).is_file():
            raise ValueError(f"{where}: {_found(Path(timm_root))}; expected {_LAYOUT['tar']}")
    if kind == "hfds" and not Path(name[5:]).exists():
        raise ValueError(f"{where}: {_found(Path(name[5:]))}; expected {_LAYOUT['hfds']} (nothing is downloaded)")
    if kind == "hfds" and root and Path(name[5:]).resolve() in (Path(root).resolve(), *Path(root).resolve().parents):
        raise ValueError(
            f"{where}: data.root is the datasets cache directory, which datasets writes into; give one outside the "
            f"dataset {name[5:]} (or null for the default cache)"
        )
    try:
        return create_dataset(timm_name, root=timm_root, split=split, is_training=is_training, download=False)
    except Exception as err:  # noqa: BLE001 - timm's readers raise AssertionError, RuntimeError, KeyError, ...
        found = _found(Path(name[5:] if kind == "hfds" else timm_root)) if (timm_root or kind == "hfds") else ""
        raise ValueError(
            f"cannot read {where}: {type(err).__name__}: {err}; {found + '; ' if found else ''}expected {_LAYOUT[kind]}"
        ) from err


def _hfds_classes_present(dataset: Dataset, path: str, split_name: str, where: str) -> set[str]:
    """The classes with samples in a Hugging Face split, after checking that ``load_dataset`` read the split with
    the class list it was saved with: it reads a ``save_to_disk`` folder with its first split's features, which
    would silently renumber a split saved with a class list of its own."""
    reader = dataset.reader
    names = reader.dataset.features[reader.label_key].names
    saved_info = Path(path) / split_name / "dataset_info.json"
    if saved_info.is_file():
        saved = read_json(saved_info, "dataset info").get("features", {}).get(reader.label_key, {}).get("names")
        if saved is not None and saved != names:
            raise ValueError(
                f"{where} was saved with classes {saved[:10]} but datasets.load_dataset reads it with the first "
                f"split's {names[:10]}, which would renumber its labels; save every split with one ClassLabel "
                "(e.g. split.cast_column('label', train.features['label']) after mapping labels by name)"
            )
    return {names[i] for i in set(reader.dataset[reader.label_key])}


_TAR_CLASSES: dict[tuple, dict[str, int]] = {}  # a train tar's classes by (path, mtime, size): one scan per process


def _training_classes(name: str, root: str | None, train_name: str, train_set: Dataset | None) -> dict[str, int]:
    """The train split's classes, which number the val split (a tar is scanned whole for them: the scan is kept)."""
    tar = Path(root or ".") / f"{train_name}.tar"
    key = (str(tar), tar.stat().st_mtime_ns, tar.stat().st_size) if spec_kind(name) == "tar" and tar.is_file() else None
    if train_set is None and key in _TAR_CLASSES:
        return _TAR_CLASSES[key]
    if train_set is None:
        train_set = _create(name, root, train_name, True, f"dataset {name!r} (data.root={root}) split {train_name!r}")
    classes = class_names(train_set) or {}
    if key is not None and classes:
        _TAR_CLASSES[key] = classes
    return classes


def wds_num_classes(root: str | None, where: str, num_classes: int | None) -> int:
    """The class count of WebDataset shards: data.num_classes, else ``num_classes`` in ``<root>/_info.json``."""
    info_path = Path(root or ".") / "_info.json"
    info = read_json(info_path, "WebDataset info")
    count = num_classes or info.get("num_classes")
    if not count:
        raise ValueError(
            f"{where}: WebDataset labels are integers with no class list; give data.num_classes, or "
            f"'num_classes' in {info_path} ({'it has ' + str(sorted(info)) if info else 'not found'})"
        )
    if num_classes and info.get("num_classes") and num_classes != info["num_classes"]:
        raise ValueError(f"{where}: data.num_classes={num_classes} but {info_path} says {info['num_classes']}")
    return int(count)


def timm_dataset(
    name: str,
    split: str,
    root: str | None,
    transform: Callable | None = None,
    split_names: dict[str, str | None] | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """A split ('train' or 'val') of a dataset spec read by timm, labels numbered by the train split's classes.

    Args:
        name: ``tar``, ``wds/NAME``, ``hfds/PATH`` or ``torch/NAME``.
        split: 'train' or 'val'.
        root: the data directory (for ``hfds/``: the datasets cache directory, None for the default).
        split_names: the splits' names on disk, {'train': ..., 'val': ...} (default, or None: 'train', and
            :data:`DEFAULT_VAL_SPLIT`'s for val).
        num_classes: the class count (WebDataset shards carry no class list; checked against the others').
    """
    kind = spec_kind(name)
    names = {"train": "train", "val": DEFAULT_VAL_SPLIT[kind]}
    names.update({k: v for k, v in (split_names or {}).items() if v})
    split_name = names[split]
    where = f"dataset {name!r} (data.root={root}) split {split_name!r}"
    if kind in ("tar", "torch") and root is None:
        raise ValueError(f"{where}: needs data.root; expected {_LAYOUT[kind]}")
    dataset = _create(name, root, split_name, split == "train", where)
    if isinstance(dataset, IterableDataset):
        dataset.num_classes = wds_num_classes(root, where, num_classes)
        dataset.target_transform = LabelCheck(dataset.num_classes, where)
        if not len(dataset.reader.split_info.filenames):
            raise ValueError(f"{where}: no shards; {_found(Path(root or '.'))}; expected {_LAYOUT['wds']}")
    else:
        train_classes = _training_classes(name, root, names["train"], dataset if split == "train" else None)
        if not train_classes:
            raise ValueError(f"{where}: the train split names no classes; expected {_LAYOUT[kind]}")
        present = _hfds_classes_present(dataset, name[5:], split_name, where) if kind == "hfds" else None
        align_to_training_classes(dataset, train_classes, where, present)
        dataset.num_classes = len(train_classes)
        dataset.label_names = sorted(train_classes, key=train_classes.__getitem__)
        if num_classes and num_classes != dataset.num_classes:
            raise ValueError(f"data.num_classes={num_classes} but {where} has {dataset.num_classes} classes")
    if len(dataset) == 0:
        raise ValueError(f"{where} holds no images; expected {_LAYOUT[kind]}")
    dataset.transform = transform
    return dataset


def shard_iterable(
    dataset: IterableDataset, batch_size: int, num_workers: int, rank: int, world_size: int, seed: int
) -> None:
    """Tell timm's WebDataset reader this process's share, the batch size and the seed, before a loader iterates it.

    timm's reader reads the process group when it is made; setting the share here lets a loader decide it
    (e.g. one process reading the whole val split while the group exists). Every process and loader worker needs
    at least one shard, else the ranks would see different numbers of batches.
    """
    reader = dataset.reader
    reader.dist_rank, reader.dist_num_replicas = rank, world_size
    reader.batch_size, reader.common_seed = batch_size, seed
    reader.ds = None  # built on first iteration, from the share set here
    dataset.set_loader_cfg(num_workers=num_workers)
    shards, readers = len(reader.split_info.filenames), world_size * max(1, num_workers)
    if shards < readers:
        raise ValueError(
            f"WebDataset split {reader.split_info.name or '?'} of {reader.root} has {shards} shards for {world_size} "
            f"process(es) x {max(1, num_workers)} loader worker(s); each needs one: use at most {shards} in all "
            "(data.num_workers) or write more shards"
        )


def restart_epoch(dataset: IterableDataset, epoch: int) -> None:
    """Start epoch ``epoch`` of a WebDataset: shard order by (seed, epoch), and a new pipeline, whose sample
    shuffle is seeded when it is built, so each epoch is a function of the seed and the epoch alone.

    Loader workers seed the sample shuffle with their torch seed (drawn anew each epoch); without workers, timm's
    reader would use the one seed every epoch, so it gets (seed + epoch) here.
    """
    dataset.set_epoch(epoch)
    dataset.reader.ds = None
    dataset.reader.worker_seed = dataset.reader.common_seed + epoch
