"""timm's dataset specs on small real files written here: a WebDataset tar (``wds/``), a Hugging Face dataset saved to
disk (``hfds/``), a tar of JPEGs (``tar``) and an image folder. Each trains a few steps, and a run stopped mid-epoch
resumes to the same weights; the val split is numbered by the train split's classes."""

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torchvision import transforms

from repmlp.data import build_dataset, build_loader, epoch_batches, num_classes_of
from repmlp.training import load_config, train
from repmlp.training import loop as training_loop

CLASSES = ("cat", "cow", "dog", "owl")
PER_CLASS = {"train": 4, "val": 2}
TINY = [
    "model.name=repmlp_fmnist_mlp",
    "model.kwargs={widths: [4, 8], head_hidden_size: 16, in_chans: 3}",
    "data.input_size=[3, 28, 28]",
    "data.mean=[0.5, 0.5, 0.5]",
    "data.std=[0.25, 0.25, 0.25]",
    "data.num_workers=0",
    "data.train_transform={color_jitter: null}",
    "optimizer.lr=0.05",
    "train.epochs=2",
    "train.batch_size=4",  # 16 training images: 4 steps an epoch
    "train.eval_batch_size=8",
    "train.threads=1",
    "train.progress=false",
]


def _jpeg(label: int, i: int) -> bytes:
    pixels = np.random.default_rng(10 * label + i).integers(0, 60, (28, 28, 3)) + 60 * label
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _samples(split: str, classes=CLASSES):
    labels = {c: i for i, c in enumerate((*CLASSES, "emu"))}
    return [(c, labels[c], i, _jpeg(labels[c], i)) for c in classes for i in range(PER_CLASS[split])]


def write_folder(root, val_classes=CLASSES):
    for split, classes in (("train", CLASSES), ("val", val_classes)):
        for name, _, i, data in _samples(split, classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            (root / split / name / f"{i}.jpg").write_bytes(data)
    return "imagefolder", str(root)


def write_tar(root, val_classes=CLASSES):
    for split, classes in (("train", CLASSES), ("val", val_classes)):
        with tarfile.open(root / f"{split}.tar", "w") as tar:
            for name, _, i, data in _samples(split, classes):
                info = tarfile.TarInfo(f"{name}/{i}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return "tar", str(root)


def write_wds(root, shards=2, num_classes=4):
    import webdataset as wds

    splits = {}
    for split, name in (("train", "train"), ("val", "validation")):
        samples = _samples(split)
        files, lengths = [], []
        for shard in range(shards):
            files.append(f"{name}-{shard:04d}.tar")
            part = samples[shard::shards]
            with wds.TarWriter(str(root / files[-1])) as sink:
                for cls, label, i, data in part:
                    sink.write({"__key__": f"{cls}_{i}", "jpg": data, "cls": label})
            lengths.append(len(part))
        splits[name] = {"name": name, "num_samples": sum(lengths), "filenames": files, "shard_lengths": lengths}
    info = {"splits": splits} | ({"num_classes": num_classes} if num_classes else {})
    (root / "_info.json").write_text(json.dumps(info))
    return "wds/tiny", str(root)


def write_hfds(root, val_classes=CLASSES):
    """One ClassLabel for both splits, as Hugging Face datasets have; a val class outside it gets a list of its own."""
    import datasets

    parts = {}
    for split, classes, name in (("train", CLASSES, "train"), ("val", val_classes, "validation")):
        samples = _samples(split, classes)
        names = list(CLASSES) if set(classes) <= set(CLASSES) else list(classes)
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        rows = {
            "image": [{"bytes": d, "path": None} for *_, d in samples],
            "label": [names.index(c) for c, *_ in samples],
        }
        parts[name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(root / "saved"))
    (root / "cache").mkdir()
    return f"hfds/{root / 'saved'}", str(root / "cache")  # data.root: the datasets cache, never the user's folder


FORMATS = {"imagefolder": write_folder, "tar": write_tar, "wds": write_wds, "hfds": write_hfds}


def _train(out, spec, root, *extra, resume=False):
    threads = torch.get_num_threads()
    cfg = load_config(None, [*TINY, f"data.dataset={spec}", f"data.root={root}", *extra, f"train.output_dir={out}"])
    try:
        return train(cfg, resume=resume)
    finally:
        torch.set_num_threads(threads)


def _max_abs_diff(a, b) -> float:
    sa, sb = load_file(str(a)), load_file(str(b))
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_format_trains_and_resumes_mid_epoch_exactly(tmp_path, fmt, monkeypatch):
    (tmp_path / "data").mkdir()
    spec, root = FORMATS[fmt](tmp_path / "data")
    reference = _train(tmp_path / "reference", spec, root)
    assert reference["equivalence"]["passed"] and reference["equivalence"]["count"] == 8
    calls = []
    monkeypatch.setattr(training_loop.StopFlag, "__call__", lambda self: calls.append(1) or len(calls) == 6)
    stopped = _train(tmp_path / "stopped", spec, root)
    assert stopped == {"interrupted": True, "epoch": 1, "step": 2}  # epoch 2, after 2 of its 4 steps
    monkeypatch.undo()
    assert _train(tmp_path / "stopped", spec, root, resume=True)["equivalence"]["passed"]
    diff = _max_abs_diff(
        tmp_path / "reference" / "model_train.safetensors", tmp_path / "stopped" / "model_train.safetensors"
    )
    assert diff == 0.0


@pytest.mark.parametrize("fmt", ["tar", "hfds", "imagefolder"])
def test_val_split_is_numbered_by_the_training_classes(tmp_path, fmt):
    spec, root = FORMATS[fmt](tmp_path, val_classes=("cat", "dog"))  # cow and owl missing: dog keeps index 2
    with pytest.warns(UserWarning, match=r"2 of the 4 training classes: \['cow', 'owl'\]"):
        val = build_dataset(spec, "val", root)
    assert num_classes_of(val) == 4 and sorted({label for _, label in val}) == [0, 2]


@pytest.mark.parametrize(
    "fmt,match",
    [
        ("tar", r"1 classes that the train split lacks: \['emu'\]"),
        ("imagefolder", r"1 classes that the train split lacks: \['emu'\]"),
        # datasets.load_dataset would read the val split with the train split's class list: refused, not renumbered
        ("hfds", r"saved with classes \['cat', 'emu'\] but datasets.load_dataset reads it with the first split's"),
    ],
)
def test_val_class_unknown_to_train_is_an_error(tmp_path, fmt, match):
    spec, root = FORMATS[fmt](tmp_path, val_classes=("cat", "emu"))
    with pytest.raises(ValueError, match=match):
        build_dataset(spec, "val", root)


def test_wds_labels_are_checked_and_classes_come_from_info(tmp_path):
    spec, root = write_wds(tmp_path, num_classes=None)
    with pytest.raises(ValueError, match="give data.num_classes, or 'num_classes' in"):
        build_dataset(spec, "train", root)
    assert num_classes_of(build_dataset(spec, "train", root, classes=4)) == 4
    spec, root = write_wds(tmp_path, num_classes=3)  # labels 0..3 but 3 classes declared
    val = build_dataset(spec, "val", root)
    with pytest.raises(ValueError, match=r"label 3 is outside the 3 training classes"):
        list(build_loader(val, 8, False))


def test_wds_needs_a_shard_per_process_and_worker(tmp_path):
    spec, root = write_wds(tmp_path, shards=2)
    train_set = build_dataset(spec, "train", root)
    with pytest.raises(ValueError, match=r"2 shards for 2 process\(es\) x 2 loader worker\(s\)"):
        build_loader(train_set, 2, True, num_workers=2, rank=0, world_size=2)


@pytest.mark.parametrize("workers", [0, 2])
def test_wds_epochs_replay_exactly(tmp_path, workers):
    """A WebDataset epoch is a function of (seed, epoch) (and of the torch seed loader workers draw, which training
    sets at each epoch's start): a skipped start replays the same batches."""
    spec, root = write_wds(tmp_path)
    dataset = build_dataset(spec, "train", root, transform=transforms.PILToTensor())
    loader = build_loader(dataset, 4, True, num_workers=workers, seed=3)

    def labels(epoch, skip=0):
        torch.manual_seed(epoch)
        return [y.tolist() for _, y in epoch_batches(loader, epoch, skip)]

    epoch1 = labels(1)
    assert len(epoch1) == 4 and sorted(sum(epoch1, [])) == sorted(list(range(4)) * 4)
    assert labels(1, skip=2) == epoch1[2:]
    assert labels(2) != epoch1


def test_wds_processes_read_their_own_shards(tmp_path):
    """The loader decides each process's share of the shards (no process group needed to set it)."""
    spec, root = write_wds(tmp_path)
    ranks = []
    for rank in range(2):
        dataset = build_dataset(spec, "train", root, transform=lambda img: np.asarray(img).mean())
        ranks.append(
            sorted(float(x) for b, _ in epoch_batches(build_loader(dataset, 2, True, 0, rank, 2), 0) for x in b)
        )
    assert len(ranks[0]) == len(ranks[1]) == 8  # 16 images, 8 a process
    assert not set(ranks[0]) & set(ranks[1])  # disjoint: one shard each


@pytest.mark.parametrize(
    "spec,root,match",
    [
        ("tar", "{tmp}", "train.tar does not exist; expected <root>/<split>.tar"),
        ("tar", None, "needs data.root"),
        ("hfds/{tmp}/nowhere", None, "nowhere does not exist; expected a Hugging Face dataset"),
        ("wds/x", "{tmp}", "cannot read dataset 'wds/x'"),
        ("hfds/{tmp}", "{tmp}/cache", "data.root is the datasets cache directory"),
    ],
)
def test_bad_specs_name_what_was_found(tmp_path, spec, root, match):
    spec, root = spec.format(tmp=tmp_path), root and root.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=match.format(tmp=tmp_path)):
        build_dataset(spec, "train", root)


def test_split_names_on_disk(tmp_path):
    spec, root = write_tar(tmp_path, val_classes=("dog",))
    (tmp_path / "train.tar").rename(tmp_path / "training.tar")
    (tmp_path / "val.tar").rename(tmp_path / "valid.tar")
    with pytest.warns(UserWarning, match="3 of the 4 training classes"):
        val = build_dataset(spec, "val", root, split_names={"train": "training", "val": "valid"})
    assert {label for _, label in val} == {2}
    with pytest.raises(ValueError, match="data.val_split='valid' applies to timm's specs"):
        build_dataset("synthetic", "val", split_names={"val": "valid"})


@pytest.mark.parametrize("fmt", ["wds", "tar"])
def test_int8_calibration_reads_timm_specs(tmp_path, fmt):
    import timm

    from repmlp.int8 import data_batches

    spec, root = FORMATS[fmt](tmp_path)
    batches = data_batches(f"{spec}:{root}", timm.create_model("repmlp_fmnist_mlp"), 4, 8, split="val")
    assert [b.shape[0] for b in batches] == [4, 4] and batches[0].shape[-2:] == (28, 28)


def test_torchvision_spec_reads_a_set_already_on_disk(tmp_path):
    """``torch/fashion_mnist``: torchvision's reader over its own layout (<root>/FashionMNIST/raw), no download."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 4)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
            (raw / f"{prefix}-{kind}-ubyte").write_bytes(header + array.astype(np.uint8).tobytes())
    train_set, val = (build_dataset("torch/fashion_mnist", split, str(tmp_path)) for split in ("train", "val"))
    assert (len(train_set), len(val), num_classes_of(val)) == (6, 4, 10) and [val[i][1] for i in range(4)] == [
        0,
        1,
        2,
        3,
    ]
    with pytest.raises(ValueError, match="nothing is downloaded"):
        build_dataset("torch/fashion_mnist", "train", str(tmp_path / "elsewhere"))
