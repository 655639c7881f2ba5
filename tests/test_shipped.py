"""The shipped model folders: each matches the registry, loads as timm loads folders (``local-dir:``, both forms),
serves the tools as a weights file, fails clearly when corrupted, and travels in the wheel."""

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import repmlp
from repmlp.shipped import ENV_VAR, WEIGHTS_NAME, read_config, sha256, shipped_models, weights_dir

ROOT = Path(__file__).resolve().parents[1]


SHIPPED = sorted({e["folder"] for e in shipped_models()})
FMNIST = "repmlp_fmnist_mlp.fmnist"  # the shipped model's timm name


def test_every_shipped_model_is_a_folder():
    assert SHIPPED == ["repmlp_fmnist_mlp.fmnist"]


@pytest.mark.parametrize("folder", SHIPPED)
def test_shipped_folder_matches_the_registry(folder):
    path = weights_dir() / folder
    config = read_config(path)
    name = f"{config['architecture']}.{config['pretrained_cfg']['tag']}"
    registry = timm.models.get_pretrained_cfg(name).to_dict()
    assert registry["file"] == folder
    expected = {k: v for k, v in registry.items() if k not in ("file", "architecture", "source")}
    assert json.loads(json.dumps(expected)) == config["pretrained_cfg"]  # tuples as JSON lists
    assert config["num_classes"] == registry["num_classes"]
    assert set(config["files"]) == {WEIGHTS_NAME} and config["files"][WEIGHTS_NAME]["form"] == "train"
    assert sha256(path / WEIGHTS_NAME) == config["files"][WEIGHTS_NAME]["sha256"]
    card = (path / "README.md").read_text()
    assert all(word in card for word in ("Fashion-MNIST", "tools/train.py", "tools/eval.py", "deploy", "MIT"))


@pytest.mark.parametrize("folder", SHIPPED)
def test_local_dir_loads_the_shipped_folder_in_both_forms(folder):
    name = f"{read_config(weights_dir() / folder)['architecture']}.{folder.split('.', 1)[1]}"
    by_name = timm.create_model(name, pretrained=True).eval()
    train = timm.create_model(f"local-dir:{weights_dir() / folder}", pretrained=True).eval()
    deploy = timm.create_model(f"local-dir:{weights_dir() / folder}", pretrained=True, deploy=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(by_name.state_dict().values(), train.state_dict().values()))
    assert list(train.pretrained_cfg["label_names"]) == list(by_name.pretrained_cfg["label_names"])
    assert repmlp.is_deploy_form(deploy)
    report = repmlp.verify_equivalence(train, deploy, batch_size=4)
    assert report.passed and report.argmax_agreement == 1.0, str(report)


@pytest.mark.parametrize("folder", SHIPPED)
def test_tools_read_a_model_folder_as_its_weights_file(folder):
    from repmlp.sources import model_from_checkpoint, recorded_model_args

    name, kwargs, _ = recorded_model_args(weights_dir() / folder)
    assert (name, kwargs["num_classes"]) == (read_config(weights_dir() / folder)["architecture"], 10)
    assert not repmlp.is_deploy_form(model_from_checkpoint(weights_dir() / folder))  # a train-form file, by structure


def test_a_corrupted_shipped_file_is_a_clear_error(tmp_path, monkeypatch):
    folder = tmp_path / "repmlp_fmnist_mlp.fmnist"
    shutil.copytree(weights_dir() / "repmlp_fmnist_mlp.fmnist", folder)
    weights = folder / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in a tensor: still a readable safetensors file
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*sha256"):
        timm.create_model(f"local-dir:{folder}", pretrained=True)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))  # the registered name, from a corrupted weights directory
    with pytest.raises(ValueError, match=rf"{re.escape(str(weights))}.*sha256"):
        timm.create_model("repmlp_fmnist_mlp.fmnist", pretrained=True)


def _source_files() -> list[str]:
    """The repository's files as a clone has them (tracked or not ignored)."""
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


_WHEEL_CHECK = """
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import safetensors.torch, timm, torch
import repmlp
root = Path(sys.argv[2]).resolve()
assert Path(repmlp.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), repmlp.__file__
assert not any(Path(p).resolve() == root for p in sys.path if p), sys.path
model = timm.create_model("repmlp_fmnist_mlp.fmnist", pretrained=True)
safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, sys.argv[3])
print(json.dumps({"module": repmlp.__file__, "weights": str(repmlp.shipped.weights_dir())}))
"""


def test_wheel_carries_the_shipped_weights(tmp_path):
    src = tmp_path / "src"
    for name in _source_files():  # build from a copy: setuptools writes build/ into the tree it builds
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    offline = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []  # else as pip install did
    subprocess.run(
        pip + ["wheel", "--no-deps", *offline, "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True
    )
    wheel = next((tmp_path / "dist").glob("repmlp-*.whl"))
    site = tmp_path / "site"
    subprocess.run(
        pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True, capture_output=True
    )
    loaded = tmp_path / "loaded.safetensors"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", ENV_VAR)} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-I", "-c", _WHEEL_CHECK, str(site), str(ROOT), str(loaded)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    where = json.loads(run.stdout.splitlines()[-1])
    assert Path(where["weights"]).is_relative_to(site)
    # the tensors the installed copy loaded, compared with ours bit for bit (logits could differ in the last bit
    # between processes with other thread counts)
    ours = timm.create_model("repmlp_fmnist_mlp.fmnist", pretrained=True).state_dict()
    theirs = safetensors.torch.load_file(loaded)
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_shipped_fashion_mnist_cfg_takes_images_as_they_are():
    cfg = timm.models.get_pretrained_cfg(FMNIST).to_dict()
    assert cfg["input_size"] == (1, 28, 28) and cfg["crop_pct"] == 1.0 and len(cfg["mean"]) == 1
    assert not Path(cfg["file"]).is_absolute() and (weights_dir() / cfg["file"]).is_dir()
    assert not cfg.get("hf_hub_id")


def test_shipped_weights_load_offline_in_both_forms():
    entries = [e for e in shipped_models() if f"{e['model']}.{e['tag']}" == FMNIST]
    assert [e["form"] for e in entries] == ["train"]  # the deploy form is converted on load
    path = weights_dir() / entries[0]["file"]
    assert path.stat().st_size <= 25 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entries[0]["sha256"]
    train = timm.create_model(FMNIST, pretrained=True).eval()
    deploy = timm.create_model(FMNIST, pretrained=True, deploy=True).eval()
    assert repmlp.is_deploy_form(deploy)
    report = repmlp.verify_equivalence(train, deploy, batch_size=8)
    assert report.passed, str(report)
