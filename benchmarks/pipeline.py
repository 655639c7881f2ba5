"""Speed of the training input pipeline alone: our loader (:func:`repmlp.data.build_loader` over timm's transforms)
against timm's ``create_loader`` (uint8 collation, normalisation in its prefetcher, which reads one batch ahead), and
our sampler with timm's uint8 path but no read-ahead ('ours_uint8': ``create_transform(use_prefetcher=True)``,
``fast_collate``, the batch normalised as it arrives), on the same JPEG folder with the same augmentation, in
interleaved rounds (medians)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_dataset, create_loader, create_transform
from timm.data.loader import fast_collate
from torch.utils.data import DataLoader

from repmlp.data import EpochSampler, build_dataset, build_loader, build_transform, epoch_batches

from .timing import machine_state

LOADERS = ("ours", "timm", "ours_uint8")
_MEAN_255 = torch.tensor([255 * m for m in IMAGENET_DEFAULT_MEAN]).view(1, 3, 1, 1)
_STD_255 = torch.tensor([255 * s for s in IMAGENET_DEFAULT_STD]).view(1, 3, 1, 1)


def write_jpegs(root: Path, count: int, size: tuple[int, int] = (375, 500), classes: int = 8, seed: int = 0) -> Path:
    """``count`` JPEGs of ImageNet's typical size (smooth colour fields with noise) in ``root/train/<class>/``."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        folder = root / "train" / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (size[0] // 25 + 1, size[1] // 25 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize(size[::-1], Image.BILINEAR)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-20, 21, (*size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(noisy).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def make_loader(kind: str, root: Path, img_size: int, batch_size: int, workers: int):
    """A training loader of ``kind`` (one of :data:`LOADERS`) over ``root/train`` with timm's default augmentation."""
    input_size = (3, img_size, img_size)
    if kind == "ours":
        dataset = build_dataset("imagefolder", "train", str(root))
        dataset.transform = build_transform(True, input_size, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        return build_loader(dataset, batch_size, True, workers)
    if kind == "ours_uint8":
        dataset = build_dataset("imagefolder", "train", str(root))
        dataset.transform = create_transform(input_size, is_training=True, use_prefetcher=True)
        sampler = EpochSampler(dataset, 1, 0, shuffle=True, seed=0, drop_last=True)
        return DataLoader(
            dataset, batch_size, sampler=sampler, num_workers=workers, drop_last=True, collate_fn=fast_collate
        )
    dataset = create_dataset("", root=str(root / "train"))
    return create_loader(
        dataset,
        input_size,
        batch_size,
        is_training=True,
        num_workers=workers,
        device=torch.device("cpu"),
        use_prefetcher=True,
        persistent_workers=False,
    )


def time_epoch(kind: str, loader, epoch: int) -> float:
    """Seconds for one epoch of batches as a training step receives them (float tensors, normalised)."""
    start = time.perf_counter()
    batches = iter(loader) if kind == "timm" else epoch_batches(loader, epoch)
    for x, _ in batches:
        if kind == "ours_uint8":
            x = x.float().sub_(_MEAN_255).div_(_STD_255)
        if x.dtype != torch.float32:
            raise RuntimeError(f"{kind} loader gave {x.dtype} batches, not normalised float32 ones")
    return time.perf_counter() - start


def run_pipeline_benchmark(
    root: Path, images: int, img_size: int, batch_size: int, workers: list[int], rounds: int, log=print
) -> dict:
    """Images/s of each loader and worker count: one epoch per loader per round, the order alternating by round."""
    seconds = {(kind, w): [] for w in workers for kind in LOADERS}
    loaders = {(kind, w): make_loader(kind, root, img_size, batch_size, w) for kind, w in seconds}
    for r in range(rounds):
        for w in workers:
            for kind in LOADERS if r % 2 == 0 else LOADERS[::-1]:
                seconds[(kind, w)].append(time_epoch(kind, loaders[(kind, w)], r))
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k}/{w}w {s[-1]:.2f}s" for (k, w), s in seconds.items()))
    images_per_epoch = images // batch_size * batch_size
    rows = []
    for w in workers:
        rates = {kind: [images_per_epoch / s for s in seconds[(kind, w)]] for kind in LOADERS}
        row = {"workers": w, **{f"{kind}_img_s": statistics.median(rates[kind]) for kind in LOADERS}}
        for kind in LOADERS[1:]:
            ratios = [other / ours for ours, other in zip(rates["ours"], rates[kind])]
            row[f"{kind}_over_ours"] = [statistics.median(ratios), min(ratios), max(ratios)]
        rows.append(row)
    return {
        "images": images_per_epoch,
        "img_size": img_size,
        "batch_size": batch_size,
        "rounds": rounds,
        "rows": rows,
        "machine": machine_state(),
    }


def format_pipeline_table(report: dict) -> str:
    """A markdown table: images/s per loader, and each one's speed over ours (median of the rounds' ratios, range)."""
    lines = [
        f"| images/s (median of {report['rounds']} rounds), {report['images']} JPEGs at {report['img_size']}, "
        f"batch {report['batch_size']} | ours | timm create_loader | ours, uint8 (timm's fast_collate) |",
        "|---|---|---|---|",
    ]
    for row in report["rows"]:
        cells = [f"{row['ours_img_s']:.0f}"]
        for kind in LOADERS[1:]:
            median, low, high = row[f"{kind}_over_ours"]
            cells.append(f"{row[f'{kind}_img_s']:.0f} ({median:.2f}x, {low:.2f}-{high:.2f})")
        lines.append(f"| {row['workers']} worker(s) | " + " | ".join(cells) + " |")
    return "\n".join(lines)
