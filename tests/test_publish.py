"""Saving and publishing as the ecosystem does: ``safetensors.torch.save_file(model.state_dict())``,
``timm.models.save_for_hf`` and reloading through ``local-dir:`` and (offline, from a Hugging Face cache written here)
``hf-hub:`` names, in train and deploy form, for one model of each design; every registered model's state dict
saves as it is."""

import io
import json
import shutil
import socket

import pytest
import safetensors.torch
import timm
import torch
from conftest import CASES, REGISTERED, create, inputs
from timm.models import save_for_hf

import repmlp
from repmlp.locations import WEIGHT_NAMES
from repmlp.verify import ErrorStats

FORMS = ("train", "deploy")
TOL = 1e-6  # max relative error per element; the same weights in the same process give the same outputs
REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash as the Hub's cache names snapshots


def model_in(form: str, name: str, kwargs: dict) -> torch.nn.Module:
    """A small model of ``name`` with a non-default classifier (5 classes), in ``form``, eval mode."""
    train = create(name, **kwargs, num_classes=5)
    return repmlp.convert_to_deploy(train) if form == "deploy" else train


def assert_same_outputs(reference: torch.nn.Module, candidate: torch.nn.Module, form: str) -> None:
    assert repmlp.is_deploy_form(candidate) == (form == "deploy")
    x = inputs(reference)
    with torch.no_grad():
        stats = ErrorStats.of(reference(x), candidate.eval()(x))
    assert stats.max_rel_err <= TOL, f"max abs err {stats.max_abs_err:.3e}, max rel err {stats.max_rel_err:.3e}"


def hub_cache(folder, cache, repo: str = "someone/repmlp-model") -> str:
    """``folder``'s files as the snapshot of Hub model ``repo`` in the Hugging Face cache ``cache`` (the layout
    ``huggingface_hub`` reads offline: ``models--ORG--NAME/refs/main`` naming ``snapshots/REVISION/``)."""
    entry = cache / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, entry / "snapshots" / REVISION)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(REVISION)
    return repo


@pytest.fixture
def offline(monkeypatch):
    """No network: huggingface_hub in offline mode, and any connection attempt fails the test."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize("name", REGISTERED)
def test_every_registered_state_dict_is_what_safetensors_saves(name):
    """Every tensor of both forms' state dicts is contiguous (``save_file`` refuses others), at the preset's size
    (built on the meta device: layout without data); the designs' files are written and reloaded below."""
    for deploy in (False, True):
        state = timm.create_model(name, deploy=deploy, device="meta").state_dict()
        assert [k for k, t in state.items() if not t.is_contiguous()] == [], f"deploy={deploy}"


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,kwargs", CASES)
def test_save_file_of_the_state_dict_reloads(tmp_path, name, kwargs, form):
    model = model_in(form, name, kwargs)
    state = model.state_dict()
    params = dict(model.named_parameters())
    assert all(state[k].data_ptr() == p.data_ptr() for k, p in params.items())  # the parameters, not copies
    safetensors.torch.save_file(state, tmp_path / "model.safetensors")
    fresh = timm.create_model(name, **kwargs, num_classes=5, deploy=form == "deploy")
    assert_same_outputs(model, repmlp.load_checkpoint(fresh, tmp_path / "model.safetensors"), form)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,kwargs", CASES)
def test_save_for_hf_reloads_from_local_dir_and_offline_hf_hub(tmp_path, offline, name, kwargs, form):
    """The folder records the architecture and the form (``deploy=True`` in ``model_args``), so the name alone
    rebuilds the model; the same files as a Hub cache snapshot load by ``hf-hub:`` name without the network."""
    model = model_in(form, name, kwargs)
    save_for_hf(model, tmp_path / "folder", safe_serialization=True)
    config = json.loads((tmp_path / "folder" / "config.json").read_text())
    assert config["architecture"] == name and config["model_args"]["num_classes"] == 5
    assert config["model_args"].get("deploy", False) == (form == "deploy")
    assert_same_outputs(model, timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True), form)
    repo = hub_cache(tmp_path / "folder", tmp_path / "hub")
    assert_same_outputs(model, timm.create_model(f"hf-hub:{repo}", pretrained=True, cache_dir=tmp_path / "hub"), form)


@pytest.mark.parametrize("file_name", [*WEIGHT_NAMES, "weights.pth", "checkpoint.pth.tar", "weights.bin"])
def test_a_folder_with_any_of_timms_weight_file_names_loads(tmp_path, file_name):
    """timm's names, then its fallback of any file of a known extension; torch files read with weights_only."""
    model = model_in("deploy", "repmlp_fmnist_mlp", {})
    save_for_hf(model, tmp_path, safe_serialization="both")
    source = "model.safetensors" if file_name.endswith(".safetensors") else "pytorch_model.bin"
    for saved in ("model.safetensors", "pytorch_model.bin"):
        if saved != source:
            (tmp_path / saved).unlink()
    (tmp_path / source).rename(tmp_path / file_name)
    assert_same_outputs(model, timm.create_model(f"local-dir:{tmp_path}", pretrained=True), "deploy")


def test_hf_hub_reads_the_default_cache_offline(tmp_path, offline, monkeypatch):
    """With no ``cache_dir``: the cache ``$HF_HOME/hub`` (huggingface_hub reads it once, at import; patched)."""
    import huggingface_hub.constants

    model = model_in("train", "repmlp_fmnist_mlp", {})
    save_for_hf(model, tmp_path / "folder")  # timm's default: pytorch_model.bin
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    repo = hub_cache(tmp_path / "folder", tmp_path / "hf" / "hub")
    assert_same_outputs(model, timm.create_model(f"hf-hub:{repo}@{REVISION}", pretrained=True), "train")


def test_missing_weights_are_clear_errors(tmp_path, offline):
    model = model_in("train", "repmlp_fmnist_mlp", {})
    save_for_hf(model, tmp_path / "folder")
    (tmp_path / "folder" / "pytorch_model.bin").unlink()
    with pytest.raises(IsADirectoryError, match=r"folder holding one of timm's weight files \(model\.safetensors"):
        timm.create_model(f"local-dir:{tmp_path / 'folder'}", pretrained=True)
    repo = hub_cache(tmp_path / "folder", tmp_path / "hub")
    with pytest.raises(FileNotFoundError, match=rf"hf-hub:{repo}: no weights file \(model\.safetensors, .*cache"):
        timm.create_model(f"hf-hub:{repo}", pretrained=True, cache_dir=tmp_path / "hub")


def test_a_pickled_object_in_a_bin_file_is_not_unpickled(tmp_path):
    model = model_in("train", "repmlp_fmnist_mlp", {})
    save_for_hf(model, tmp_path)
    buffer = io.BytesIO()
    torch.save({"state_dict": model.state_dict(), "args": io.StringIO("not a tensor")}, buffer)
    (tmp_path / "pytorch_model.bin").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="is not unpickled"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)
