"""Bad inputs, table-driven: each gives a clear error of the stated type (or tool exit status) whose message names
the offending value, and leaves every file as it was (byte for byte, nothing added). Then: a crafted pickle offered
to every entry point that reads a file never runs; a second training run into a run directory is refused."""

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_RUN, load_tool, train_tiny
from PIL import Image

import repmlp
from repmlp.checkpoint import read_state_dict
from repmlp.data import build_dataset
from repmlp.export import export_onnx
from repmlp.layers import RepMLP
from repmlp.training import load_config, model_from_checkpoint
from repmlp.training.state import LEGACY_STATE_FILE, STATE_FILE, read_state

TRAIN, DEPLOY = "run/model_train.safetensors", "run/model_deploy.safetensors"
TINY_ARGS = [arg for item in TINY_RUN for arg in ("--set", item)]


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tool(name: str, *argv: str) -> Callable[[], int]:
    def call() -> int:
        try:
            return load_tool(name).main([str(a) for a in argv])
        except SystemExit as exit_:  # argparse's errors
            return exit_.code

    return call


def _unwritable(tmp: Path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits: use /sys there)."""
    if os.geteuid() == 0:
        return Path("/sys")
    ro = tmp / "read_only"
    ro.mkdir(mode=0o555)
    return ro


def _text_file(tmp: Path) -> Path:
    (tmp / "notes.pth").write_text("hello, these are not weights\n")
    return tmp / "notes.pth"


def _authors_file(tmp: Path) -> Path:
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp / "authors.pth")
    return tmp / "authors.pth"


def _hard_link(tmp: Path) -> Path:
    os.link(tmp / TRAIN, tmp / "link.safetensors")
    return tmp / "link.safetensors"


def _no_dataset_record(tmp: Path) -> Path:
    repmlp.save_checkpoint(timm.create_model("repmlp_fmnist_mlp"), tmp / "bare.safetensors")
    return tmp / "bare.safetensors"


def _image_folders(tmp: Path, train: tuple[str, ...], val: tuple[str, ...]) -> Path:
    for split, classes in (("train", train), ("val", val)):
        for cls in classes:
            (tmp / "images" / split / cls).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp / "images" / split / cls / "0.png")
    return tmp / "images"


@dataclass
class Case:
    name: str
    call: Callable[[Path], Callable[[], object]]  # (tmp dir holding a copy of a tiny run in run/) -> the attempt
    error: type[BaseException] | int  # the exception, or a tool's exit status
    message: tuple[str, ...]  # fragments of the message ({tmp}: the tmp dir): the offending value, what would work


CASES = [
    # model arguments
    Case(
        "reparam_conv_k int",
        lambda t: lambda: RepMLP(4, 4, 8, 8, 4, 4, reparam_conv_k=3),
        ValueError,
        ("reparam_conv_k", "got 3", "[1, 3]"),
    ),
    Case(
        "reparam_conv_k float",
        lambda t: lambda: RepMLP(4, 4, 8, 8, 4, 4, reparam_conv_k=[3.0]),
        ValueError,
        ("got 3.0", "integer"),
    ),
    Case(
        "reparam_conv_k even",
        lambda t: lambda: RepMLP(4, 4, 8, 8, 4, 4, reparam_conv_k=[2]),
        ValueError,
        ("got 2", "odd"),
    ),
    # configs and training command lines
    Case(
        "quoted epochs",
        lambda t: lambda: load_config(None, ['train.epochs="1"']),
        ValueError,
        ("train.epochs='1'", "an integer", "train.epochs=1"),
    ),
    Case(
        "word for lr",
        lambda t: lambda: load_config(None, ["optimizer.lr=fast"]),
        ValueError,
        ("optimizer.lr='fast'", "a number"),
    ),
    Case(
        "zero epochs",
        lambda t: lambda: load_config(None, ["train.epochs=0"]),
        ValueError,
        ("train.epochs=0", "at least 1"),
    ),
    Case("typo key", lambda t: lambda: load_config(None, ["train.epoch=2"]), ValueError, ("'train.epoch'",)),
    Case(
        "train.py quoted epochs",
        lambda t: _tool("train", "--output", t / "new", "--set", 'train.epochs="1"'),
        2,
        ("train.epochs='1'",),
    ),
    Case(
        "train.py flag without value",
        lambda t: _tool("train", "--output", t / "new", "--train.epochs"),
        2,
        ("--train.epochs needs a value",),
    ),
    Case(
        "train.py into an earlier run",
        lambda t: _tool("train", *TINY_ARGS, "--output", t / "run"),
        2,
        ("holds an earlier run", "--resume", "--overwrite"),
    ),
    Case(
        "train.py --resume with --overwrite",
        lambda t: _tool("train", *TINY_ARGS, "--output", t / "run", "--resume", "--overwrite"),
        2,
        ("give one",),
    ),
    Case(
        "train.py output dir is a file",
        lambda t: _tool("train", *TINY_ARGS, "--output", t / TRAIN),
        2,
        ("model_train.safetensors is a file",),
    ),
    Case(
        "train.py unwritable output dir",
        lambda t: _tool("train", *TINY_ARGS, "--output", _unwritable(t) / "run"),
        2,
        ("cannot write in",),
    ),
    Case(
        "train.py set smaller than a batch",
        lambda t: _tool("train", *TINY_ARGS, "--output", t / "new", "--set", "train.batch_size=64"),
        2,
        ("32 samples", "train.batch_size=64", "at most 32"),
    ),
    *(
        Case(
            f"train.py unknown argument in {key}",
            lambda t, key=key, value=value: _tool(
                "train", *TINY_ARGS, "--output", t / "new", "--set", f"{key}={value}"
            ),
            2,
            (f"{key}: {name!r} is not an argument here", *more),
        )
        for key, value, name, more in [
            ("model.kwargs", "{widthz: [4, 8]}", "widthz", ("MLPCifarNet",)),
            ("data.synthetic", "{num_samples:96}", "num_samples:96", ("a space after the colon",)),
            ("data.train_transform", "{colour_jitter: 0.1}", "colour_jitter", ("create_transform",)),
            ("optimizer.kwargs", "{betaz: [0.9, 0.99]}", "betaz", ()),
            ("scheduler.kwargs", "{cycle_mull: 2}", "cycle_mull", ("create_scheduler_v2",)),
        ]
    ),
    Case(
        "train.py resume from a text file",
        lambda t: _tool("train", *TINY_ARGS, "--output", t / "run", "--resume", _text_file(t)),
        2,
        ("notes.pth", "not a training state"),
    ),
    Case(
        "train.py resume without a state",
        lambda t: _tool("train", *TINY_ARGS, "--output", t / "empty", "--resume"),
        2,
        (STATE_FILE, "not found"),
    ),
    # weights files
    Case(
        "save_checkpoint to .pth",
        lambda t: lambda: repmlp.save_checkpoint(timm.create_model("repmlp_fmnist_mlp"), t / "x.pth"),
        ValueError,
        ("x.pth", "*.safetensors"),
    ),
    Case(
        "text .pth",
        lambda t: partial(read_state_dict, _text_file(t)),
        ValueError,
        ("{tmp}/notes.pth", "not a checkpoint"),
    ),
    Case(
        "directory as weights",
        lambda t: _tool("convert_deploy", "--weights", t / "run"),
        2,
        ("{tmp}/run is a directory",),
    ),
    Case(
        "text .pth to convert",
        lambda t: _tool("convert_deploy", "--model", "repmlp_fmnist_mlp", "--weights", _text_file(t)),
        2,
        ("cannot read weights file {tmp}/notes.pth",),
    ),
    Case(
        "missing weights",
        lambda t: _tool("eval", "--checkpoint", t / "nope.safetensors"),
        2,
        ("{tmp}/nope.safetensors",),
    ),
    Case(
        "deploy form to convert",
        lambda t: _tool("convert_deploy", "--weights", t / DEPLOY),
        2,
        ("already in deploy form",),
    ),
    Case(
        "deploy form as train form",
        lambda t: _tool("eval", "--checkpoint", t / DEPLOY, "--form", "train"),
        2,
        ("deploy-form", "deploy=True"),
    ),
    Case(
        "authors' file without --model",
        lambda t: partial(model_from_checkpoint, _authors_file(t)),
        ValueError,
        ("{tmp}/authors.pth does not record its model", "--model"),
    ),
    # what a checkpoint records against the command line
    Case(
        "other model",
        lambda t: _tool("convert_deploy", "--weights", t / TRAIN, "--model", "repmlp_res50_light_224"),
        2,
        ("model 'repmlp_res50_light_224'", "records model 'repmlp_fmnist_mlp'"),
    ),
    Case(
        "other num_classes",
        lambda t: _tool("export_onnx", "--weights", t / TRAIN, "--model-kwargs", '{"num_classes": 10}'),
        2,
        ("num_classes 10", "num_classes 4"),
    ),
    Case(
        "other dataset",
        lambda t: _tool("eval", "--checkpoint", t / TRAIN, "--dataset", "cifar10"),
        2,
        ("dataset 'cifar10'", "records dataset 'synthetic'"),
    ),
    Case(
        "no dataset recorded",
        lambda t: _tool("eval", "--checkpoint", _no_dataset_record(t)),
        2,
        ("bare.safetensors does not record its dataset", "--dataset"),
    ),
    # outputs
    Case(
        "convert output is the input",
        lambda t: _tool("convert_deploy", "--weights", t / TRAIN, "--output", t / TRAIN),
        2,
        ("is the input file",),
    ),
    Case(
        "convert output is the input, other spelling",
        lambda t: _tool("convert_deploy", "--weights", t / TRAIN, "--output", t / "run/../run/model_train.safetensors"),
        2,
        ("is the input file",),
    ),
    Case(
        "convert output is a hard link of the input",
        lambda t: _tool("convert_deploy", "--weights", t / TRAIN, "--output", _hard_link(t)),
        2,
        ("link.safetensors is the input file",),
    ),
    Case(
        "export output is the input",
        lambda t: _tool("export_onnx", "--weights", t / DEPLOY, "--output", t / DEPLOY),
        2,
        ("is the input file",),
    ),
    Case(
        "output is a directory",
        lambda t: _tool("convert_deploy", "--weights", t / TRAIN, "--output", t / "run"),
        2,
        ("{tmp}/run is a directory",),
    ),
    Case(
        "output is read-only",
        lambda t: _tool("export_onnx", "--weights", t / DEPLOY, "--output", _read_only_file(t)),
        2,
        ("old.onnx exists and is read-only",),
    ),
    Case(
        "output in an unwritable place",
        lambda t: _tool("convert_deploy", "--weights", t / TRAIN, "--output", _unwritable(t) / "x.safetensors"),
        2,
        ("cannot write in",),
    ),
    Case(
        "output below a file",
        lambda t: _tool("convert_deploy", "--weights", t / TRAIN, "--output", t / TRAIN / "x.safetensors"),
        2,
        ("is a file, not a directory",),
    ),
    Case(
        "benchmark json is a directory",
        lambda t: _tool("benchmark", "--json", t / "run"),
        2,
        ("--json {tmp}/run is a directory",),
    ),
    Case("benchmark --rounds 0", lambda t: _tool("benchmark", "--rounds", "0"), 2, ("--rounds", "got 0")),
    Case(
        "convert_deploy --batch-size -1",
        lambda t: _tool("convert_deploy", "--batch-size", "-1"),
        2,
        ("--batch-size: must be an integer >= 1, got -1",),
    ),
    Case(
        "export_onnx --opset 9",
        lambda t: _tool("export_onnx", "--weights", t / DEPLOY, "--output", t / "x.onnx", "--opset", "9"),
        2,
        ("--opset: must be an integer from 11 to",),
    ),
    Case(
        "export_onnx --min-agreement as a percentage",
        lambda t: _tool("export_onnx", "--min-agreement", "97"),
        2,
        ("--min-agreement: must be a number from 0 to 1, got 97",),
    ),
    Case(
        "export_onnx(opset=9)",
        lambda t: partial(export_onnx, model_from_checkpoint(t / DEPLOY), t / "x.onnx", opset=9),
        ValueError,
        ("opset must be from 11 to",),
    ),
    Case(
        "int8 benchmark of a model without a deploy form",
        lambda t: _tool("benchmark", "--int8", "--models", "repmlp_cifar_mlp", "resnet18", "--batch-sizes", "1"),
        2,
        ("resnet18 keeps training-only modules", "timm.list_models('repmlp*')"),
    ),
    # data
    Case(
        "val class unknown to train",
        lambda t: partial(build_dataset, "imagefolder", "val", str(_image_folders(t, ("cat", "dog"), ("cat", "cow")))),
        ValueError,
        ("['cow']", "training classes"),
    ),
]


def _read_only_file(tmp: Path) -> Path:
    (tmp / "old.onnx").write_bytes(b"an earlier export")
    (tmp / "old.onnx").chmod(0o444)
    return tmp / "old.onnx"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_input(case, tmp_path, tiny_run, capsys):
    shutil.copytree(tiny_run, tmp_path / "run")
    (tmp_path / "empty").mkdir()
    attempt = case.call(tmp_path)  # builds the case's input files
    before = _snapshot(tmp_path)
    if isinstance(case.error, int):
        assert attempt() == case.error
        message = capsys.readouterr().err
    else:
        with pytest.raises(case.error) as info:
            attempt()
        message = str(info.value)
    for fragment in case.message:
        assert fragment.format(tmp=tmp_path) in message, message
    assert _snapshot(tmp_path) == before  # inputs byte-identical; no output, partial or temporary file


def test_val_class_missing_keeps_the_training_indices(tmp_path):
    root = _image_folders(tmp_path, ("cat", "cow", "dog"), ("cat", "dog"))
    with pytest.warns(UserWarning, match=r"1 of the 3 training classes: \['cow'\]"):
        val = build_dataset("imagefolder", "val", str(root))
    assert sorted(label for _, label in val) == [0, 2]  # dog keeps index 2, not 1


# -- crafted pickles ------------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates the file ``marker``: stands for any code a crafted pickle could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted(path: Path, marker: Path, kind: str) -> Path:
    """A file that creates ``marker`` when unpickled: a torch (zip) file, or a plain pickle as CIFAR ships."""
    if kind == "torch":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({b"data": _Payload(marker), b"labels": [0]}, protocol=2))
    return path


@pytest.mark.parametrize("kind", ["torch", "pickle"])
def test_the_crafted_pickle_runs_code_when_unpickled(tmp_path, kind):
    """The payload works: the tests below would see the marker if anything unpickled it."""
    marker = tmp_path / "marker"
    path = _crafted(tmp_path / "evil", marker, kind)
    if kind == "torch":
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


def _cifar_dir(tmp: Path, evil: Path) -> Path:
    root = tmp / "cifar"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        shutil.copy(evil, root / name)
    return root


ENTRY_POINTS = {  # name -> (call with the crafted file's path, file kinds offered)
    "train.py --resume FILE": (
        lambda p, t: _tool("train", *TINY_ARGS, "--output", t / "run", "--resume", p)(),
        ("torch", "pickle"),
    ),
    "train.py --resume, state file replaced": (
        lambda p, t: (
            shutil.copy(p, t / "run" / STATE_FILE),
            _tool("train", *TINY_ARGS, "--output", t / "run", "--resume")(),
        ),
        ("torch", "pickle"),
    ),
    "train.py --resume, legacy last.pth": (
        lambda p, t: (
            (t / "run" / STATE_FILE).unlink(),
            shutil.copy(p, t / "run" / LEGACY_STATE_FILE),
            _tool("train", *TINY_ARGS, "--output", t / "run", "--resume")(),
        ),
        ("torch", "pickle"),
    ),
    "read_state": (lambda p, t: read_state(p), ("torch", "pickle")),
    "CIFAR batch": (lambda p, t: build_dataset("cifar10", "train", str(_cifar_dir(t, p))), ("pickle",)),
    "convert_deploy --weights": (
        lambda p, t: _tool(
            "convert_deploy", "--model", "repmlp_fmnist_mlp", "--weights", p, "--output", t / "d.safetensors"
        )(),
        ("torch", "pickle"),
    ),
    "eval --checkpoint": (
        lambda p, t: _tool("eval", "--model", "repmlp_fmnist_mlp", "--checkpoint", p, "--dataset", "synthetic")(),
        ("torch", "pickle"),
    ),
    "export_onnx --weights": (
        lambda p, t: _tool("export_onnx", "--model", "repmlp_fmnist_mlp", "--weights", p, "--output", t / "x.onnx")(),
        ("torch", "pickle"),
    ),
    "load_checkpoint": (
        lambda p, t: repmlp.load_checkpoint(timm.create_model("repmlp_fmnist_mlp"), p),
        ("torch", "pickle"),
    ),
}


@pytest.mark.parametrize("entry,kind", [(e, k) for e, (_, kinds) in ENTRY_POINTS.items() for k in kinds])
def test_a_crafted_pickle_is_never_run(entry, kind, tmp_path, tiny_run, capsys):
    shutil.copytree(tiny_run, tmp_path / "run")
    marker = tmp_path / "marker"
    evil = _crafted(tmp_path / "evil.pth", marker, kind)
    try:
        outcome = ENTRY_POINTS[entry][0](evil, tmp_path)
    except ValueError as err:
        outcome = err
    assert not marker.exists()
    exit_status = outcome[-1] if isinstance(outcome, tuple) else outcome
    assert isinstance(exit_status, ValueError) or exit_status == 2  # refused, with a message
    assert not (tmp_path / "d.safetensors").exists() and not (tmp_path / "x.onnx").exists()


# -- runs into the same directory -----------------------------------------------------------------------------------


def test_second_run_into_a_run_directory_is_refused_then_overwritten_on_request(tmp_path, tiny_run, capsys):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    first = _snapshot(out)
    train = _tool("train", *TINY_ARGS, "--output", out, "--train.batch_size", "16")  # README's flag form
    assert train() == 2
    assert "holds an earlier run" in capsys.readouterr().err
    assert _snapshot(out) == first
    threads = torch.get_num_threads()
    try:
        assert _tool("train", *TINY_ARGS, "--output", out, "--train.batch_size", "16", "--overwrite")() == 0
    finally:
        torch.set_num_threads(threads)
    assert json.loads((out / "config.json").read_text())["train"]["batch_size"] == 16
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # the earlier run's records are gone
    assert _snapshot(out)["model_train.safetensors"] != first["model_train.safetensors"]


def test_resume_with_more_epochs_rebuilds_the_schedule(tmp_path, tiny_run, capsys):
    """A 1-epoch run resumed with train.epochs=3 gets the LR of a 3-epoch schedule (not the finished 1-epoch
    one, which would train at lr 0), the same as an uninterrupted 3-epoch run at the same updates."""
    shutil.copytree(tiny_run, tmp_path / "resumed")
    train_tiny(tmp_path / "resumed", "train.epochs=3", resume=True)
    assert "train.epochs 1 -> 3" in capsys.readouterr().out
    train_tiny(tmp_path / "straight", "train.epochs=3")
    resumed, straight = (
        [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("resumed", "straight")
    )
    assert [r["epoch"] for r in resumed] == [1, 2, 3]  # counted from 1
    assert resumed[1]["lr"] > 0.01 and resumed[1]["lr"] == pytest.approx(straight[1]["lr"], rel=1e-12)
    with pytest.raises(ValueError, match="set train.epochs to at least 3"):
        train_tiny(tmp_path / "resumed", "train.epochs=2", resume=True)


def test_training_state_round_trips_without_pickle(tmp_path):
    from repmlp.training.state import write_state

    state = {
        "t": torch.arange(3.0),
        "same": [torch.ones(2)] * 2,
        "ints": {0: (1, 2.5, None)},
        "np": np.random.get_state(),
        "nested": {"__tuple__": "a key that looks like a tag"},
    }
    write_state(tmp_path / "s.safetensors", state)
    back = read_state(tmp_path / "s.safetensors")
    assert torch.equal(back["t"], state["t"]) and all(torch.equal(t, torch.ones(2)) for t in back["same"])
    assert back["ints"] == {0: (1, 2.5, None)} and back["nested"] == state["nested"]
    assert back["np"][0] == "MT19937" and np.array_equal(back["np"][1], state["np"][1])
    assert back["np"][1].dtype == np.uint32
    with pytest.raises(TypeError, match="cannot store a 'object'"):
        write_state(tmp_path / "bad.safetensors", {"x": object()})
