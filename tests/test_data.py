"""Dataset readers on small files written here (CIFAR pickles, IDX, image folders), malformed inputs,
transforms and loaders."""

import gzip
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from repmlp.data import (
    EpochSampler,
    build_dataset,
    build_loader,
    build_transform,
    num_classes_of,
    read_idx,
)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fmnist(root, n_train=6, n_test=4, gz=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[prefix] = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        for kind, array in zip(("images-idx3", "labels-idx1"), arrays[prefix]):
            path = root / f"{prefix}-{kind}-ubyte"
            data = _idx_bytes(array)
            if gz:
                with gzip.open(str(path) + ".gz", "wb") as f:
                    f.write(data)
            else:
                path.write_bytes(data)
    return arrays


def _write_cifar10(root, per_batch=2, protocol=pickle.DEFAULT_PROTOCOL):
    """Batches as distributed (protocol 2, numpy.core names as Python 2's numpy wrote them) or in a newer protocol."""
    rng = np.random.default_rng(1)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        batch = {
            b"batch_label": b"training batch",
            b"labels": labels,
            b"data": data,
            b"filenames": [b"x.png"] * per_batch,
        }
        blob = pickle.dumps(batch, protocol=protocol)
        (root / name).write_bytes(blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
        rows[name] = data, labels
    return rows


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_idx_files(tmp_path, gz):
    arrays = _write_fmnist(tmp_path, gz=gz)
    train = build_dataset("fashion_mnist", "train", str(tmp_path))
    test = build_dataset("fashion_mnist", "val", str(tmp_path))
    assert len(train) == 6 and len(test) == 4 and num_classes_of(train) == 10
    img, label = test[2]
    assert img.mode == "L" and img.size == (28, 28)
    assert np.array_equal(np.asarray(img), arrays["t10k"][0][2]) and label == arrays["t10k"][1][2]


def test_idx_malformed_files(tmp_path):
    bad_magic = tmp_path / "bad"
    bad_magic.write_bytes(b"\x01\x02\x03\x04" + bytes(8))
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad_magic)
    truncated = tmp_path / "short"
    truncated.write_bytes(_idx_bytes(np.zeros((3, 28, 28)))[:-10])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)
    not_gzip = tmp_path / "x.gz"
    not_gzip.write_bytes(b"plain bytes")
    with pytest.raises(ValueError, match="cannot read IDX file"):
        read_idx(not_gzip)


def test_fashion_mnist_missing_files_name_the_layout(tmp_path):
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        build_dataset("fashion_mnist", "train", str(tmp_path))
    with pytest.raises(ValueError, match=str(tmp_path / "nowhere")):
        build_dataset("fashion_mnist", "train", str(tmp_path / "nowhere"))


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_batches_in_pixel_order(tmp_path, protocol):
    rows = _write_cifar10(tmp_path, protocol=protocol)
    train, test = build_dataset("cifar10", "train", str(tmp_path)), build_dataset("cifar10", "val", str(tmp_path))
    assert len(train) == 10 and len(test) == 2
    img, label = test[1]
    data, labels = rows["test_batch"]
    # rows hold the R, G and B planes in turn, each 32x32 row-major
    assert np.array_equal(np.asarray(img), data[1].reshape(3, 32, 32).transpose(1, 2, 0)) and label == labels[1]


def test_cifar100_and_the_distribution_subfolder(tmp_path):
    sub = tmp_path / "cifar-100-python"
    sub.mkdir()
    for name, n in (("train", 5), ("test", 3)):
        with open(sub / name, "wb") as f:
            pickle.dump(
                {b"data": np.zeros((n, 3072), np.uint8), b"fine_labels": list(range(n)), b"coarse_labels": [0] * n}, f
            )
    assert len(build_dataset("cifar100", "train", str(tmp_path))) == 5
    assert len(build_dataset("cifar100", "val", str(tmp_path))) == 3


@pytest.mark.parametrize(
    "damage,match",
    [
        ("missing", "data_batch_3 not found"),
        ("garbage", "not a python pickle"),
        ("shape", "expected \\(N, 3072\\)"),
        ("keys", "lacks the 'data'"),
    ],
)
def test_cifar_malformed(tmp_path, damage, match):
    _write_cifar10(tmp_path)
    path = tmp_path / "data_batch_3"
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"not a pickle")
    else:
        entry = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]} if damage == "shape" else {b"x": 1}
        path.write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=match):
        build_dataset("cifar10", "train", str(tmp_path))


def test_image_folder(tmp_path):
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (40, 30), (i * 100, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    train = build_dataset("imagefolder", "train", str(tmp_path))
    assert len(train) == 4 and num_classes_of(train) == 2 and train[3][1] == 1
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(ValueError, match="train"):
        build_dataset("imagefolder", "train", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="<root>/train/<class>/<image>"):
        build_dataset("imagefolder", "val", str(tmp_path / "missing"))


def test_bad_names_and_splits():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        build_dataset("mnist", "train", "/tmp")
    with pytest.raises(ValueError, match="split must be one of"):
        build_dataset("synthetic", "test")
    with pytest.raises(ValueError, match="needs a root"):
        build_dataset("cifar10", "train")


def test_synthetic_is_deterministic():
    a, b = build_dataset("synthetic", "train", num_samples=8), build_dataset("synthetic", "train", num_samples=8)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, build_dataset("synthetic", "val", num_samples=8).images)


def test_eval_transform_keeps_28x28_images_as_they_are():
    pixels = np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)
    tf = build_transform(False, (1, 28, 28), (0.2860,), (0.3530,), crop_pct=1.0)
    expected = (torch.from_numpy(pixels).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(tf(Image.fromarray(pixels))[0], expected, atol=1e-6)


def test_train_transform_pad_crop_keeps_size():
    tf = build_transform(True, (3, 32, 32), (0.5,) * 3, (0.5,) * 3, crop_padding=4, color_jitter=None)
    assert tf(Image.new("RGB", (32, 32))).shape == (3, 32, 32)


def test_loaders_shard_and_resume_mid_epoch():
    dataset = build_dataset("synthetic", "val", num_samples=10, img_size=8)
    seen = [idx for rank in range(3) for idx in build_loader(dataset, 4, False, rank=rank, world_size=3).sampler]
    assert sorted(seen) == list(range(10))
    sampler = EpochSampler(dataset, 1, 0, shuffle=True, seed=0, drop_last=True)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip = 4
    assert list(sampler) == full[4:] and len(sampler) == 6
