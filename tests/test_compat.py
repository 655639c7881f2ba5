"""Files, folders and training states written by repmlp 0.1 (tests/fixtures/v0.1, made by its make.py) still load,
and give the outputs they gave."""

from pathlib import Path

import pytest
import timm
import torch

import repmlp
from repmlp.sources import model_source
from repmlp.training.state import load_training_state

V01 = Path(__file__).resolve().parent / "fixtures" / "v0.1"
NAME, ARGS = "repmlp_cifar_mlp", dict(img_size=8, partition=4, widths=(4, 8), num_classes=3)
IO = torch.load(V01 / "tiny_io.pth", weights_only=True)


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IO["x"])


@pytest.mark.parametrize(
    "weights, form",
    [
        ("tiny_train.safetensors", "train"),
        ("tiny_deploy.safetensors", "deploy"),
        ("tiny_trainer.pth", "train"),
        ("shipped_folder", "train"),
        ("hf_folder", "train"),
        ("tiny_train.safetensors", "deploy"),
    ],
)
def test_files_of_v01_load_through_the_tools_rule(weights, form):
    hf = weights == "hf_folder"  # timm's save_for_hf: repmlp 0.1 needed the model named
    source = model_source(NAME if hf else None, V01 / weights, form=form, model_kwargs=ARGS if hf else {})
    assert source.model.num_classes == 3 and repmlp.is_deploy_form(source.model) == (form == "deploy")
    torch.testing.assert_close(_out(source.model), IO[form], rtol=1e-5, atol=1e-5)


def test_a_trainers_ema_of_v01_loads():
    source = model_source(weights=V01 / "tiny_trainer.pth", use_ema=True)
    plain = repmlp.read_state_dict(V01 / "tiny_trainer.pth")
    assert torch.equal(source.model.state_dict()["stem.conv.weight"], plain["stem.conv.weight"] + 1)


@pytest.mark.parametrize("folder", ["hf_folder", "shipped_folder"])
def test_folders_of_v01_load_through_timm(folder):
    model = timm.create_model(f"local-dir:{V01 / folder}", pretrained=True, **ARGS)  # write_folder records no args
    torch.testing.assert_close(_out(model), IO["train"], rtol=1e-5, atol=1e-5)


def test_files_of_v01_load_through_pretrained_cfg_overlay():
    file = str(V01 / "tiny_train.safetensors")
    model = timm.create_model(NAME, pretrained=True, pretrained_cfg_overlay=dict(file=file), **ARGS)
    torch.testing.assert_close(_out(model), IO["train"], rtol=1e-5, atol=1e-5)


def test_a_training_state_of_v01_resumes():
    model = timm.create_model(NAME, **ARGS)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rest = load_training_state(V01 / "tiny_state.safetensors", model, optimizer, None, None, None)
    assert (rest["epoch"], rest["step_in_epoch"], rest["num_updates"]) == (1, 0, 1)
    assert all("momentum_buffer" in s for s in optimizer.state.values()) and len(optimizer.state) > 0
