"""Calibration and check data for int8: seeded random inputs or images of a dataset, in the model's eval transform."""

from __future__ import annotations

__all__ = ["data_batches"]

import itertools

import torch
from timm.data import resolve_data_config
from torch import nn

from ..data import DATASETS, TIMM_SPECS, build_dataset, build_transform
from ..data_timm import is_timm_spec
from ..models import model_input_size


def data_batches(
    spec: str, model: nn.Module, batch_size: int, samples: int, split: str = "train", seed: int = 0
) -> list[torch.Tensor]:
    """``samples`` inputs (whole batches of ``batch_size``) for calibration or checks, from a dataset spec.

    ``spec``: ``'random'`` (seeded standard-normal inputs of the model's size) or ``DATASET[:ROOT]`` with a dataset
    name the training configs take (``fashion_mnist``, ``cifar10:data/cifar-10-batches-py``, ``imagefolder:DIR``,
    ``tar:DIR``, ``wds/NAME:DIR``); images get the model's evaluation transform and are drawn at random (seeded) from
    ``split`` (WebDataset shards, without random access: the first ones in shard order).
    """
    count = max(1, samples // batch_size) * batch_size
    gen = torch.Generator().manual_seed(seed)
    if spec == "random":
        return list(torch.randn((count, *model_input_size(model)), generator=gen).split(batch_size))
    name, _, root = spec.partition(":")
    if name not in DATASETS and not is_timm_spec(name):
        raise ValueError(
            f"calibration data {spec!r}: expected 'random' or DATASET[:ROOT] with DATASET one of "
            f"{DATASETS} or a timm spec {TIMM_SPECS}, e.g. 'fashion_mnist' or 'imagefolder:data/imagenet'"
        )
    cfg = resolve_data_config({}, model=model)
    dataset = build_dataset(
        name,
        split,
        root or None,
        transform=build_transform(
            False, cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"]
        ),
    )
    if len(dataset) < count:
        raise ValueError(f"calibration data {spec!r} has {len(dataset)} {split} images, fewer than the {count} asked")
    if isinstance(dataset, torch.utils.data.IterableDataset):  # WebDataset shards: the first images, in shard order
        images = torch.stack([image for image, _ in itertools.islice(dataset, count)])
    else:
        images = torch.stack([dataset[i][0] for i in torch.randperm(len(dataset), generator=gen)[:count].tolist()])
    return list(images.split(batch_size))
