"""Hostile and mistaken files through every route that loads weights: the library, ``pretrained_cfg_overlay``,
``local-dir:``, the Hugging Face cache (``hf-hub:``) and the tools. A file is data: nothing it says is imported,
called or spawned; what it says wrong is a ValueError (tools: an ``error:`` line) naming the file and the field; no
input hangs or is read past its checked size; one load reads the file once."""

import builtins
import contextlib
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from conftest import load_tool
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import repmlp
from repmlp.sources import model_source
from repmlp.weights_file import WeightsFile

V01 = Path(__file__).resolve().parent / "fixtures" / "v0.1"
TRAIN = V01 / "tiny_train.safetensors"
ARGS = dict(img_size=8, partition=4, widths=[4, 8])
STATE = safetensors.torch.load_file(TRAIN)
META = {
    "model": "repmlp_cifar_mlp",
    "form": "train",
    "format": "pt",
    "num_classes": "3",
    "model_kwargs": json.dumps(ARGS),
}
SETTINGS = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _file(path: Path, **metadata: str) -> Path:
    """The fixture's weights with ``metadata`` over its own."""
    safetensors.torch.save_file(STATE, path, metadata={**META, **metadata})
    return path


def _tool(name: str, *argv) -> int:
    try:
        return load_tool(name).main([str(a) for a in argv])
    except SystemExit as exit_:
        return exit_.code


# ------------------------------------------------------------------------------ a file names no code, no command


def test_a_file_cannot_name_code_through_any_route(tmp_path, capsys):
    marker = tmp_path / "RAN"
    kwargs = json.dumps({"args": ["touch", str(marker)]})
    hostile = _file(tmp_path / "hostile.safetensors", model="subprocess:run", model_kwargs=kwargs)
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(hostile, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"hostile.safetensors: field 'model' is 'subprocess:run', not a registered"):
        model_source(weights=hostile)
    out = tmp_path / "out.safetensors"
    for weights in (hostile, folder):
        assert _tool("eval", "--checkpoint", weights) == 2
        assert _tool("convert_deploy", "--weights", weights, "--output", out) == 2
        assert _tool("export_onnx", "--weights", weights, "--output", tmp_path / "m.onnx") == 2
    assert "field 'model' is 'subprocess:run'" in capsys.readouterr().err
    assert not marker.exists() and not out.exists()


def test_a_recorded_dataset_cannot_name_a_command(tmp_path, capsys):
    marker = tmp_path / "RAN"
    config = json.dumps({"data": {"dataset": "wds/x", "root": f"pipe:touch {marker} #"}})
    path = _file(tmp_path / "w.safetensors", config=config, dataset="wds/x")
    source = model_source(weights=path)
    assert source.dataset is None and "pipe:" not in json.dumps(source.record)
    assert _tool("eval", "--checkpoint", path) == 2
    assert "does not record its dataset" in capsys.readouterr().err and not marker.exists()


def test_an_onnx_files_metadata_names_no_code_and_no_command(tmp_path, capsys):
    """``eval --onnx`` reads what the file records as any file's metadata: a model that is no registered name is
    refused, a recorded dataset on a ``pipe:`` root is not used."""
    from repmlp.export import export_onnx
    from repmlp.onnx_io import set_onnx_metadata

    marker, path = tmp_path / "RAN", tmp_path / "m.onnx"
    model = repmlp.convert_to_deploy(timm.create_model("repmlp_cifar_mlp", **ARGS, num_classes=3).eval())
    export_onnx(model, path, batch_size=2)
    inputs = {"input_size": "[3, 8, 8]", "mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]"}
    command = json.dumps({"args": ["touch", str(marker)]})
    set_onnx_metadata(path, {**inputs, "model": "subprocess:run", "model_kwargs": command})
    assert _tool("eval", "--onnx", path, "--dataset", "synthetic") == 2
    assert "not a registered timm model name" in capsys.readouterr().err and not marker.exists()
    config = json.dumps({"data": {"dataset": "wds/x", "root": f"pipe:touch {marker} #"}})
    set_onnx_metadata(path, {"model": "repmlp_cifar_mlp", "model_kwargs": "{}", "config": config, "dataset": "wds/x"})
    assert _tool("eval", "--onnx", path) == 2
    assert "does not record its dataset" in capsys.readouterr().err and not marker.exists()


@pytest.mark.parametrize(
    "field, value, says",
    [
        ("num_classes", "-5", "field 'num_classes' is '-5'"),
        ("num_classes", "ten", "field 'num_classes' is 'ten'"),
        ("model_kwargs", '{"deploy": "no"}', "field 'deploy'"),
        ("model_kwargs", '{"checkpoint_path": "/etc/passwd"}', "field 'checkpoint_path'"),
        ("model_kwargs", '{"pretrained_cfg_overlay": {"url": "http://x"}}', "field 'pretrained_cfg_overlay'"),
        ("model_kwargs", "{not json", "field 'model_kwargs' is not JSON"),
        ("model_kwargs", "[1, 2]", "must be a JSON object"),
        ("model_kwargs", '{"colour": 1}', "unknown constructor argument 'colour'"),
        ("model_kwargs", '{"widths": "abc"}', "field 'widths' is 'abc'"),
        ("model_kwargs", '{"in_chans": 0}', "field 'in_chans' is 0"),
        ("config", "[]", "field 'config' must be a JSON object"),
        ("config", "[" * 100_000 + "]" * 100_000, "field 'config' is not JSON (maximum recursion depth"),
        ("model_kwargs", '{"drop_rate": NaN}', "field 'drop_rate' is nan"),
        ("model_kwargs", '{"global_pool": "evil"}', "cannot build the model: AssertionError"),  # the constructor's
        ("num_classes", "9999999", "would have 5,130,032,195 parameters"),  # 20 GB, refused before it is allocated
    ],
)
def test_metadata_mistakes_name_file_and_field(tmp_path, field, value, says):
    path = _file(tmp_path / "w.safetensors", **{field: value})
    with pytest.raises(ValueError, match="w.safetensors") as err:
        model_source(weights=path)
    assert says in str(err.value)


@SETTINGS
@given(
    num_classes=st.one_of(st.text(max_size=6), st.integers(-3, 12).map(str)),
    kwargs=st.dictionaries(
        st.sampled_from(["widths", "partition", "deploy", "file", "img_size", "mixer", "x"]),
        st.one_of(st.integers(-2, 9), st.text(max_size=4), st.booleans(), st.lists(st.integers(0, 9), max_size=3)),
        max_size=3,
    ),
)
def test_any_metadata_loads_or_is_a_value_error_naming_the_file(tmp_path, num_classes, kwargs):
    path = _file(tmp_path / "w.safetensors", num_classes=num_classes, model_kwargs=json.dumps({**ARGS, **kwargs}))
    try:
        source = model_source(weights=path)
    except ValueError as err:
        assert str(path) in str(err)
    else:  # only what the file's tensors fit loads
        assert source.model.num_classes == 3 and not ({"deploy", "file", "x"} & set(kwargs))


def test_a_folders_config_json_names_no_location_and_no_argument_unchecked(tmp_path):
    folder = tmp_path / "folder"
    shutil.copytree(V01 / "hf_folder", folder)
    config = json.loads((folder / "config.json").read_text())
    source = model_source(f"local-dir:{folder}", pretrained=True)  # a tool's --model local-dir:DIR --pretrained
    assert source.model.num_classes == 3 and torch.equal(source.model.head.fc.weight, STATE["head.fc.weight"])
    (folder / "config.json").write_text(json.dumps({**config, "model_args": {**ARGS, "num_classes": 9_999_999}}))
    with pytest.raises(ValueError, match=r"folder/config.json: field 'model_args': the model would have 5,130,032,195"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)  # refused before timm allocates 20 GB
    for key, value in (("checkpoint_path", "/etc/passwd"), ("deploy", "no")):
        (folder / "config.json").write_text(json.dumps({**config, "model_args": {**ARGS, key: value}}))
        with pytest.raises(ValueError, match=rf"folder/config.json: field 'model_args'.*field '{key}'"):
            timm.create_model(f"local-dir:{folder}", pretrained=True)
    from test_publish import hub_cache  # the Hub cache's layout, read offline

    config["model_args"] = {"widths": "abc"}
    (folder / "config.json").write_text(json.dumps(config))
    repo = hub_cache(folder, tmp_path / "hub")
    with pytest.raises(ValueError, match=r"config.json: field 'model_args'.*'widths'"):
        timm.create_model(f"hf-hub:{repo}", pretrained=True, cache_dir=tmp_path / "hub")


def test_a_folders_config_json_is_read_only_as_a_regular_file_of_sane_size(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(TRAIN, folder / "model.safetensors")
    os.mkfifo(folder / "config.json")  # reading it would wait for a writer for ever
    with pytest.raises(ValueError, match=r"config.json is not a regular file"):
        model_source(weights=folder)
    with pytest.raises(ValueError, match=r"config.json is not a regular file"):
        repmlp.models.load_model(f"local-dir:{folder}")
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    assert _tool("eval", "--checkpoint", folder) == 2
    (folder / "config.json").unlink()
    with open(folder / "config.json", "wb") as f:
        f.truncate(1 << 30)  # sparse: 1 GB of nothing
    with pytest.raises(ValueError, match=r"config.json is 1073741824 bytes"):
        model_source(weights=folder)
    (folder / "config.json").write_text(json.dumps({"files": ["model.safetensors"]}))  # no skipping its sha256
    with pytest.raises(ValueError, match=r"config.json: field 'files' must be an object"):
        model_source(weights=folder)


# ------------------------------------------------------------------------------ strict about trained heads


def test_a_3_class_file_without_num_classes_is_an_error_naming_it(tmp_path):
    overlay = dict(file=str(TRAIN))
    with pytest.raises(ValueError, match=r"classifier for 3 classes, the model has 10 classes: pass num_classes=3"):
        timm.create_model("repmlp_cifar_mlp", pretrained=True, pretrained_cfg_overlay=overlay, **ARGS)
    model = timm.create_model(
        "repmlp_cifar_mlp", pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3, **ARGS
    )
    assert torch.equal(model.head.fc.weight, STATE["head.fc.weight"])  # not dropped (timm compares with the cfg's 10)
    fresh = timm.create_model("repmlp_cifar_mlp", **ARGS)
    with pytest.raises(ValueError, match=r"num_classes=3"):
        repmlp.load_checkpoint(fresh, TRAIN)
    with pytest.raises(ValueError, match=r"num_classes=3"):
        model_source("repmlp_cifar_mlp", _bare(tmp_path), model_kwargs=ARGS)  # a file that records nothing
    stem = dict(STATE, **{"stem.conv.weight": STATE["stem.conv.weight"][:, :1]})
    torch.save(stem, tmp_path / "grey.pth")
    with pytest.raises(ValueError, match=r"stem for 1 input channels, the model takes 3: pass in_chans=1"):
        model_source("repmlp_cifar_mlp", tmp_path / "grey.pth", model_kwargs={**ARGS, "num_classes": 3})


def _bare(tmp_path: Path) -> Path:
    torch.save(STATE, tmp_path / "bare.pth")
    return tmp_path / "bare.pth"


# ------------------------------------------------------------------------------ bounded reads, errors that point right


def test_a_header_that_declares_more_than_the_file_holds_is_refused_before_reading(tmp_path):
    path = tmp_path / "sparse.safetensors"
    header = json.dumps({"stem.conv.weight": {"dtype": "F32", "shape": [805_306_368], "data_offsets": [0, 3 << 30]}})
    path.write_bytes(len(header).to_bytes(8, "little") + header.encode() + bytes(4000))
    with pytest.raises(ValueError, match=r"not valid safetensors \(truncated at byte \d+\)"):
        WeightsFile.open(path)
    with open(path, "r+b") as f:  # now the file is that large (sparse): a shape mismatch, found without reading it
        f.truncate(8 + len(header) + (3 << 30))
    with pytest.raises(ValueError, match=r"stem.conv.weight: file \(805306368,\)"):
        repmlp.load_checkpoint(timm.create_model("repmlp_cifar_mlp", **ARGS, num_classes=0), path)


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("m.onnx", b"\x08\x08\x12\x07pytorch", "this is an ONNX file (repmlp-eval --onnx runs it"),
        ("m.pth", b"\x08\x08\x12\x07pytorch\x1a\x032.9", "this is an ONNX file (repmlp-eval --onnx runs it"),
        ("w.pth", b"\x89PNG\r\n\x1a\n" + bytes(32), "this is a PNG image"),
        ("w.pth", b'{"a": 1}', "a JSON or text file"),
        ("w.safetensors", (64).to_bytes(8, "little") + b'{"a": ', "not valid safetensors (truncated at byte 14)"),
        ("w.pth", b"", "is empty"),
    ],
)
def test_what_a_file_is_is_said(tmp_path, name, content, says):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as err:
        WeightsFile.open(tmp_path / name)
    assert says in str(err.value) and "weights_only=False" not in str(err.value)


def test_a_fifo_is_no_missing_file_and_an_odd_name_no_corrupt_file(tmp_path):
    os.mkfifo(tmp_path / "w.safetensors")  # opening it would wait for a writer
    with pytest.raises(ValueError, match=r"w.safetensors is not a regular file"):
        WeightsFile.open(tmp_path / "w.safetensors")
    os.mkfifo(tmp_path / "model.safetensors")  # a model folder's: named, not taken for a folder without weights
    with pytest.raises(ValueError, match=r"model.safetensors is not a regular file"):
        WeightsFile.open(tmp_path)
    odd = tmp_path / os.fsdecode(b"w\xff.safetensors")  # not UTF-8
    shutil.copy(TRAIN, odd)
    assert model_source(weights=odd).model.num_classes == 3
    assert _tool("convert_deploy", "--weights", odd, "--output", tmp_path / "d.safetensors", "--no-float64") == 0
    assert "w\\udcff.safetensors" in WeightsFile.open(tmp_path / "d.safetensors").metadata["source"]  # escaped


@SETTINGS
@given(data=st.binary(max_size=96))
def test_any_bytes_are_a_value_error_without_unpickling_advice(tmp_path, data):
    path = tmp_path / "w.pth"
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        WeightsFile.open(path)
    assert str(path) in str(err.value) and "weights_only=False" not in str(err.value)


def test_complex_tensors_are_named_as_such(tmp_path):
    state = dict(STATE, **{"stem.conv.weight": STATE["stem.conv.weight"].to(torch.complex64)})
    safetensors.torch.save_file(state, tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match=r"complex tensors for float parameters"):
        repmlp.load_checkpoint(timm.create_model("repmlp_cifar_mlp", num_classes=3, **ARGS), tmp_path / "c.safetensors")


def test_an_offline_tag_names_its_url_and_the_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"download https://download.openmmlab.com/\S+ and place it as \S+"):
        timm.create_model("repmlpnet_b224.mmpretrain_in1k", pretrained=True)


# ------------------------------------------------------------------------------ one read per load


@pytest.mark.parametrize("weights", ["tiny_train.safetensors", "tiny_trainer.pth", "shipped_folder"])
def test_one_load_reads_the_file_once(monkeypatch, weights):
    opened, loads = [], []
    real_open, real_load = builtins.open, torch.load

    def counting_open(file, *args, **kwargs):
        if Path(str(file)).suffix in (".safetensors", ".pth"):
            opened.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    monkeypatch.setattr(safetensors, "safe_open", None)  # the library's own readers are not used
    monkeypatch.setattr(safetensors.torch, "load_file", None)
    source = model_source(weights=V01 / weights, form="deploy")
    assert len(opened) == 1 and len(loads) == (weights.endswith(".pth"))
    assert repmlp.is_deploy_form(source.model) and source.model.num_classes == 3
    opened.clear()
    overlay = dict(file=str(V01 / weights))  # timm's builder, through the model's load_pretrained
    timm.create_model("repmlp_cifar_mlp", pretrained=True, pretrained_cfg_overlay=overlay, **ARGS, num_classes=3)
    assert len(opened) == 1


def test_json_a_run_or_dataset_keeps_beside_it_is_read_bounded(tmp_path):
    """A run's manifest and a WebDataset's ``_info.json`` are read as a config is: a FIFO or a huge file is refused,
    never a hang or a flood."""
    from repmlp.data_timm import wds_num_classes
    from repmlp.training.rundir import MANIFEST, run_files

    os.mkfifo(tmp_path / "_info.json")
    with pytest.raises(ValueError, match="_info.json is not a regular file"):
        wds_num_classes(str(tmp_path), "data", None)
    run = tmp_path / "run"
    run.mkdir()
    with open(run / MANIFEST, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros
    with pytest.raises(ValueError, match="is damaged .*more than a config's"):
        run_files(run)


# ------------------------------------------------------------------------------ ONNX and OpenVINO files


@pytest.fixture(scope="module")
def good_onnx(tmp_path_factory) -> Path:
    """An ONNX file tools/export_onnx.py wrote of the fixture's weights: it records dataset cifar10 and an 8x8
    transform."""
    pytest.importorskip("onnxruntime")
    path = tmp_path_factory.mktemp("onnx") / "good.onnx"
    assert _tool("export_onnx", "--weights", TRAIN, "--output", path) == 0
    return path


@contextlib.contextmanager
def _unblocked(fifo: Path, every: float = 2.0):
    """A reader that opens ``fifo`` (the bug this guards against) gets end-of-file within ``every`` seconds instead
    of waiting for a writer for ever: the test then fails instead of stopping the suite."""
    done = threading.Event()

    def unblock():
        while not done.wait(every):
            with contextlib.suppress(OSError):  # no reader waiting (ENXIO), or no FIFO
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _image(tmp_path: Path) -> Path:
    Image.new("RGB", (8, 8), (200, 40, 40)).save(tmp_path / "a.png")
    return tmp_path / "a.png"


@pytest.mark.parametrize(
    "make, says",
    [
        (os.mkfifo, "a FIFO"),
        (lambda p: p.symlink_to("/dev/null"), "a character device"),  # as /dev/zero, which would never end
        (os.mkdir, "a directory"),
    ],
    ids=["fifo", "device", "directory"],
)
def test_an_onnx_or_openvino_path_that_is_no_regular_file_is_refused_before_opening(tmp_path, capsys, make, says):
    pytest.importorskip("onnxruntime")
    from repmlp.int8 import onnx_batch_size
    from repmlp.onnx_io import onnx_metadata, ort_session

    image = _image(tmp_path)
    for name in ("m.onnx", "m.xml"):
        path = tmp_path / name
        make(path)
        with _unblocked(path):
            assert _tool("predict", "--weights", path, image) == 2
            if name == "m.onnx":
                assert _tool("eval", "--onnx", path, "--dataset", "synthetic") == 2
                for read in (onnx_metadata, onnx_batch_size, ort_session):
                    with pytest.raises(ValueError, match=rf"{name} is not a regular file but {says}"):
                        read(path)
        errors = capsys.readouterr().err.splitlines()
        assert errors and all(f"{name} is not a regular file but {says}" in e for e in errors), errors


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff" * 64, (2).to_bytes(8, "little") + b"{}", TRAIN.read_bytes()],
    ids=["empty", "bytes", "tiny_safetensors", "safetensors"],
)
def test_a_file_named_onnx_that_is_no_onnx_model_is_an_error_naming_it(tmp_path, capsys, content):
    pytest.importorskip("onnxruntime")
    from repmlp.int8 import onnx_batch_size
    from repmlp.onnx_io import ort_session
    from repmlp.predict import load_predictor

    path = tmp_path / "x.onnx"
    path.write_bytes(content)
    for read in (load_predictor, onnx_batch_size, ort_session):
        with pytest.raises(ValueError, match=r"x.onnx is not (a valid ONNX file|an ONNX file onnxruntime can run)"):
            read(path)
    assert _tool("eval", "--onnx", path, "--dataset", "synthetic") == 2
    assert _tool("predict", "--weights", path, _image(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: {path} is not a valid ONNX file") == 2 and "Traceback" not in err


@SETTINGS
@given(data=st.binary(max_size=64))
def test_any_bytes_named_onnx_are_a_value_error_naming_the_file(tmp_path, data):
    pytest.importorskip("onnxruntime")
    from repmlp.predict import load_predictor

    path = tmp_path / "x.onnx"
    path.write_bytes(data)
    with pytest.raises(ValueError) as err:
        load_predictor(path)
    assert str(path) in str(err.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("input_size", "5"),
        ("input_size", "[3, 8"),
        ("input_size", "[3, 200000, 200000]"),
        ("input_size", "[3, 8]"),
        ("input_size", "[2, 8, 8]"),
        ("input_size", "[3, 0, 8]"),
        ("input_size", "[3, 8.5, 8]"),
        ("input_size", "[true, 8, 8]"),
        ("input_size", '{"a": 1}'),
        ("mean", '["a", 0, 0]'),
        ("mean", "[NaN, 0, 0]"),
        ("mean", "0.5"),
        ("mean", "[0.5]"),
        ("std", "[0.5, 0, 0.5]"),
        ("std", "[0.5, -1, 0.5]"),
        ("std", "[Infinity, 1, 1]"),
        ("crop_pct", "0"),
        ("crop_pct", "nan"),
        ("crop_pct", "3"),
        ("crop_pct", "0.0001"),
        ("crop_pct", "x"),
        ("interpolation", "random"),
        ("crop_mode", "rrc"),
        ("label_names", '["a", 1]'),
        ("label_names", '"abc"'),
        ("label_names", "[" * 100_000),
    ],
)
def test_recorded_transform_values_are_checked_naming_file_field_and_value(field, value):
    from repmlp.preprocess import parse_input_metadata

    good = {"input_size": "[3, 8, 8]", "mean": "[0.5, 0.5, 0.5]", "std": "[0.5, 0.5, 0.5]", "crop_pct": "0.875"}
    assert parse_input_metadata(good, "m.onnx")["input_size"] == [3, 8, 8]
    with pytest.raises(ValueError) as err:
        parse_input_metadata({**good, field: value}, "m.onnx")
    assert f"m.onnx: field '{field}' is {value!r:.100}" in str(err.value)


@pytest.mark.parametrize(
    "value, says",
    [
        ("5", "field 'input_size' is '5'"),
        ("[3, 200000, 200000]", "field 'input_size' is '[3, 200000, 200000]'"),  # once an allocation for ever
        ("[3, 8", "field 'input_size' is '[3, 8'"),
        ("[3, 16, 16]", "field 'input_size' is [3, 16, 16], but its graph takes inputs of [3, 8, 8]"),
    ],
)
def test_an_onnx_files_transform_is_checked_before_use_by_predict_and_eval(
    good_onnx, tmp_path, capsys, monkeypatch, value, says
):
    from repmlp.onnx_io import set_onnx_metadata
    from repmlp.predict import Predictor

    def unchecked(*_):  # preparing an image at the file's size would allocate without limit
        raise AssertionError("an image was prepared for a transform nobody checked")

    monkeypatch.setattr(Predictor, "image", unchecked)
    path = tmp_path / "m.onnx"
    shutil.copy(good_onnx, path)
    set_onnx_metadata(path, {"input_size": value})
    assert _tool("predict", "--weights", path, _image(tmp_path)) == 2
    assert _tool("eval", "--onnx", path) == 2
    err = capsys.readouterr().err
    assert err.count(f"error: {path}: {says}") == 2 and "Traceback" not in err


def test_eval_of_an_onnx_file_names_it_where_an_argument_contradicts_it(good_onnx, tmp_path, capsys):
    assert _tool("predict", "--weights", good_onnx, _image(tmp_path)) == 0  # a file the tool wrote runs
    odd = tmp_path / os.fsdecode(b"m\xff.onnx")  # also under a name that is not UTF-8, which onnxruntime refuses
    shutil.copy(good_onnx, odd)
    assert _tool("predict", "--weights", odd, _image(tmp_path)) == 0
    assert _tool("eval", "--onnx", good_onnx, "--dataset", "synthetic") == 2
    err = capsys.readouterr().err
    assert f"dataset 'synthetic' contradicts {good_onnx}, which records dataset 'cifar10'" in err, err


def test_a_missing_or_unreadable_openvino_file_is_an_error_line(tmp_path, capsys):
    image, path = _image(tmp_path), tmp_path / "m.xml"
    assert _tool("predict", "--weights", path, image) == 2
    assert "m.xml does not exist" in capsys.readouterr().err
    path.write_text("<net>not an IR</net>")
    (tmp_path / "m.bin").symlink_to("/dev/null")
    assert _tool("predict", "--weights", path, image) == 2
    assert "m.bin is not a regular file but a character device" in capsys.readouterr().err
