"""Data checked where it is read: labels against the class count, images that cannot be decoded named (or, asked
for, left out and counted, never replaced by another image), PIL's pixel bound kept and named, one class refused
for training, the model's channels against the data's before the first step, a synthetic set too large refused."""

import pickle
import struct
import zlib

import numpy as np
import pytest
import torch
from conftest import train_tiny
from PIL import Image
from torchvision.transforms import ToTensor

from repmlp.data import SKIPPED_LABEL, build_dataset, build_loader
from repmlp.training.distributed import DistEnv
from repmlp.training.engine import evaluate


def _cifar10(root, bad_label):
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, bad_label if name == "data_batch_3" else 0]}
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    return root


def _idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def _fashion_mnist(root, bad_label):
    root.mkdir()
    for prefix in ("train", "t10k"):
        _idx(root / f"{prefix}-images-idx3-ubyte", np.zeros((3, 28, 28)))
        _idx(root / f"{prefix}-labels-idx1-ubyte", np.array([0, bad_label, 9]))
    return root


@pytest.mark.parametrize(
    "name, make, label",
    [("cifar10", _cifar10, 50), ("fashion_mnist", _fashion_mnist, 12)],
    ids=["CIFAR-10 label 50", "Fashion-MNIST label 12"],
)
def test_a_label_outside_the_class_count_is_refused_where_read(name, make, label, tmp_path):
    root = make(tmp_path / name, label)
    with pytest.raises(ValueError, match=f"label {label} .* outside the 10 classes 0..9") as info:
        build_dataset(name, "train", str(root))
    assert str(root) in str(info.value)


def _folder(root, classes=2, per_class=1, bad=()):
    """root/{train,val}/<class>/<i>.png; ``bad``: (name, bytes) files added to val/c0."""
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (10 * c, 0, 0)).save(root / split / f"c{c}" / f"{i}.png")
    for name, data in bad:
        (root / "val" / "c0" / name).write_bytes(data)
    return root


def _huge_png_header(width=60_000, height=60_000) -> bytes:
    """A PNG that claims 3.6 gigapixels (no pixel data: PIL refuses it from the header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


BAD_IMAGES = {
    "corrupt.png": (b"not an image at all", "image .*corrupt.png cannot be decoded"),
    "empty.png": (b"", "image .*empty.png cannot be decoded"),
    "huge.png": (_huge_png_header(), "image .*huge.png is too large to decode .*MAX_IMAGE_PIXELS"),
}


@pytest.mark.parametrize("bad", BAD_IMAGES, ids=str)
def test_an_undecodable_image_is_an_error_naming_it_never_another_image(bad, tmp_path):
    data, message = BAD_IMAGES[bad]
    root = _folder(tmp_path, bad=[(bad, data)])
    val = build_dataset("imagefolder", "val", str(root), ToTensor())
    index = next(i for i in range(len(val)) if val.filename(i).endswith(bad))
    with pytest.raises(ValueError, match=message):
        val[index]


def _classifier(classes):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, classes))


def test_eval_skips_and_counts_bad_images_only_when_asked(tmp_path):
    bad = [(name, data) for name, (data, _) in BAD_IMAGES.items()]
    root = _folder(tmp_path, classes=2, per_class=6, bad=bad)
    for skip in (False, True):
        val = build_dataset("imagefolder", "val", str(root), ToTensor(), skip_bad_images=skip)
        loader = build_loader(val, 4, False)
        if not skip:
            with pytest.raises(ValueError, match="cannot be decoded|too large"):
                evaluate(_classifier(2), loader, DistEnv())
            continue
        metrics = evaluate(_classifier(2), loader, DistEnv())
        assert (metrics["count"], metrics["skipped"]) == (12, 3)  # on main: 15 counted, bad ones replaced
        assert sum(label == SKIPPED_LABEL for _, label in val) == 3


def test_labels_the_model_has_no_class_for_are_refused_in_eval(tmp_path):
    val = build_dataset("imagefolder", "val", str(_folder(tmp_path, classes=12)), ToTensor())
    with pytest.raises(ValueError, match="the data has label 11 but the model has 2 classes"):
        evaluate(_classifier(2), build_loader(val, 12, False), DistEnv())


def test_training_refuses_one_class_and_a_channel_mismatch_before_the_first_step(tmp_path):
    with pytest.raises(ValueError, match="has 1 class; a classifier needs at least 2"):
        train_tiny(tmp_path / "one", "data.synthetic={num_samples: 32, num_classes: 1}")
    root = _folder(tmp_path / "rgb", per_class=4)
    with pytest.raises(
        ValueError, match=r"takes 1-channel images but .* 3-channel ones; .*model.kwargs=\{in_chans: 3\}"
    ):
        train_tiny(tmp_path / "rgb_run", "data.dataset=imagefolder", f"data.root={root}", "train.batch_size=2")
    assert not (tmp_path / "one").exists() and not (tmp_path / "rgb_run").exists()


def test_a_synthetic_set_too_large_for_memory_is_refused():
    with pytest.raises(ValueError, match=r"10\^12|1000000000000 images .* GiB"):
        build_dataset("synthetic", "train", num_samples=10**12, img_size=28, in_chans=1)
