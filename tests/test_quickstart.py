"""The README's command-line quickstart, as a new user runs it: an image folder of their own -> fine-tuned ->
converted -> checked -> exported -> predictions with class names. The commands are read from the README and run
in-process (``repmlp-X`` is ``repmlp.cli.<module>.main``), on a small RGB folder written here, for one epoch."""

import importlib
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from conftest import load_tool
from PIL import Image
from test_docs import readme_block

from repmlp import cli

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {  # the console scripts of pyproject.toml, by the module whose main they run
    "repmlp-train": "train",
    "repmlp-convert": "convert_deploy",
    "repmlp-eval": "eval",
    "repmlp-export": "export_onnx",
    "repmlp-predict": "predict",
    "repmlp-model-table": "model_table",
    "repmlp-ship": "ship_model",
}
SMALL = ["--set", "train.epochs=1", "--set", "train.batch_size=8", "--set", "data.num_workers=0"]
SMALL += ["--set", "train.progress=false"]
CLASSES = {"cat": (200, 40, 40), "dog": (40, 40, 200)}


def _write_images(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for name, colour in CLASSES.items():
            folder = root / "my_images" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.integers(-30, 30, (12, 10, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    (root / "new_images").mkdir()
    Image.fromarray(np.full((20, 16, 3), CLASSES["cat"], np.uint8)).save(root / "new_images" / "red.jpg")
    Image.fromarray(np.full((9, 9, 3), CLASSES["dog"], np.uint8)).save(root / "new_images" / "blue.png")


def _run(command: str, *extra: str) -> int:
    program, *args = shlex.split(command)
    return importlib.import_module(f"repmlp.cli.{COMMANDS[Path(program).name]}").main([*args, *extra])


def test_the_readme_quickstart_runs_on_an_image_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the clone's root, as the user sees it: configs/ and their image folders
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    _write_images(tmp_path)
    commands = readme_block("quickstart")
    assert len(commands) <= 6 and all(Path(shlex.split(c)[0]).name in COMMANDS for c in commands)
    for command in commands:
        extra = SMALL if "repmlp-train" in command else []
        assert _run(command, *extra) == 0, (command, capsys.readouterr())
    out = capsys.readouterr().out
    assert "epoch 1/1: train loss" in out and "PASS (float64)" in out  # readable epochs; the conversion checked
    predictions = [line for line in out.splitlines() if line.startswith("new_images/")]
    assert len(predictions) == 2 and all("cat " in line and "dog " in line for line in predictions)
    from repmlp.onnx_io import onnx_metadata

    meta = onnx_metadata("runs/mine/model.onnx")
    assert json.loads(meta["label_names"]) == ["cat", "dog"] and json.loads(meta["input_size"]) == [3, 28, 28]

    # the run directory names its files: eval takes it (--form deploy: its deploy file), predict its deploy file
    assert _run("repmlp-eval --checkpoint runs/mine --form deploy --no-progress") == 0
    assert '"form": "deploy"' in capsys.readouterr().out
    assert _run("repmlp-predict --weights runs/mine --json --top-k 1 new_images/red.jpg") == 0
    assert set(json.loads(capsys.readouterr().out)["top"][0]) == {"class", "prob"}

    # without in_chans: 3 the grey model refuses the RGB folder before training, naming the setting
    assert _run(commands[0].replace("runs/mine", "runs/grey"), *SMALL, "--set", "model.kwargs={}") == 2
    assert "model.kwargs={in_chans: 3}" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "grey" / "last_state.safetensors").exists()


def test_predict_refuses_what_it_cannot_run(tmp_path, capsys):
    import onnx
    import timm

    import repmlp
    from repmlp.export import export_onnx

    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    assert _run(f"repmlp-predict --weights {tmp_path / 'missing.onnx'} {image}") == 2
    assert "missing.onnx does not exist" in capsys.readouterr().err
    model = repmlp.convert_to_deploy(timm.create_model("repmlp_fmnist_mlp", widths=(4, 8), head_hidden_size=16))
    bare = tmp_path / "bare.onnx"  # exported without the tool: no metadata_props
    export_onnx(model, bare)
    assert not onnx.load(str(bare)).metadata_props
    assert _run(f"repmlp-predict --weights {bare} {image}") == 2
    assert "records no input_size, mean, std" in capsys.readouterr().err
    weights = tmp_path / "m.safetensors"
    repmlp.save_checkpoint(model, weights)
    (tmp_path / "empty").mkdir()
    assert _run(f"repmlp-predict --weights {weights} {tmp_path / 'empty'}") == 2
    assert "no image files" in capsys.readouterr().err
    (tmp_path / "not_an_image.png").write_text("text")
    assert _run(f"repmlp-predict --weights {weights} {tmp_path / 'not_an_image.png'}") == 2
    assert "cannot read image" in capsys.readouterr().err
    assert _run(f"repmlp-predict --weights {weights} {image} --top-k 3") == 0
    assert capsys.readouterr().out.count("T-shirt/top") <= 1  # the preset's class names, recorded at save


def test_console_scripts_are_the_tools(monkeypatch):
    """Each [project.scripts] entry exists and runs its tool's main; tools/<module>.py is the same tool from a clone;
    a console script whose environment lacks OMP_WAIT_POLICY or HF_HUB_OFFLINE starts again with them set (libgomp
    reads the variable only when torch loads)."""
    section = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    scripts = dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M))
    assert set(scripts) == set(COMMANDS)
    for name, target in scripts.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert (ROOT / "tools" / f"{COMMANDS[name]}.py").is_file()
        assert hasattr(importlib.import_module(f"repmlp.cli.{COMMANDS[name]}"), "main")

    started = []
    monkeypatch.setattr(cli.os, "execv", lambda exe, argv: started.append(argv) or pytest.fail.Exception)
    monkeypatch.setattr(cli.sys, "argv", ["/nowhere/repmlp-predict", "--help"])
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    with pytest.raises((SystemExit, BaseException)):
        cli.run_predict()
    assert started[0][1:] == ["-m", "repmlp.cli.predict", "--help"]
    assert cli.os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    assert load_tool("_launch").ENV_DEFAULTS == cli.ENV_DEFAULTS  # what tools/*.py set before torch loads
