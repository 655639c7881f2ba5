"""Where a tool's model comes from (repmlp.sources): one rule in every tool, a file's form judged by structure."""

import json

import pytest
import timm
import torch
from conftest import REFERENCE, TINY_CIFAR, load_tool, rel_err
from safetensors.torch import load_file
from test_checkpoint import timm_train_checkpoint
from test_repmlpnet import TINY

import repmlp
from repmlp.shipped import shipped_weights
from repmlp.sources import model_source

SHIPPED = "repmlp_fmnist_mlp.fmnist"


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_the_three_sources():
    shipped = model_source(SHIPPED, pretrained=True)
    assert shipped.weights == f"registered weights {SHIPPED}" and shipped.path == shipped_weights(SHIPPED)
    assert shipped.dataset.startswith("fashion_mnist")  # as the shipped file records it
    assert _same_weights(shipped.model, model_source("repmlp_fmnist_mlp", pretrained=True).model)  # default tag
    random = model_source(SHIPPED, seed=3)  # a tag without --pretrained: random weights, as timm's scripts do
    assert random.weights.startswith("RANDOM weights (seed 3)") and random.dataset is None
    assert not _same_weights(random.model, shipped.model)
    assert _same_weights(random.model, model_source(SHIPPED, seed=3).model)  # seeded
    deploy = model_source(SHIPPED, pretrained=True, form="deploy").model
    assert repmlp.is_deploy_form(deploy) and not repmlp.is_deploy_form(shipped.model)
    with pytest.raises(ValueError, match="--pretrained and --weights"):
        model_source(SHIPPED, weights=shipped.path, pretrained=True)


@pytest.mark.parametrize("form", ["train", "deploy"])
def test_a_files_form_is_judged_by_its_structure(form):
    """The authors' RepMLPNet files carry no metadata, and their inference form keeps BNs (the old heuristic read
    any running_var as train form): the form comes from the keys against the model's structure."""
    io = load_file(REFERENCE / "repmlpnet_tiny_io.safetensors")
    path = REFERENCE / f"repmlpnet_tiny_{form}.safetensors"
    source = model_source("repmlpnet_t224", weights=path, model_kwargs=TINY)
    assert repmlp.is_deploy_form(source.model) == (form == "deploy")
    assert rel_err(io[f"y_{form}"], source.model.eval()(io["x"])) <= 1e-5


def test_tools_take_the_registered_weights_by_the_one_rule(tmp_path, capsys):
    out = tmp_path / "d.safetensors"
    assert load_tool("convert_deploy").main(["--model", SHIPPED, "--pretrained", "--output", str(out)]) == 0
    assert f"(registered weights {SHIPPED})" in capsys.readouterr().out
    shipped = model_source(SHIPPED, pretrained=True, form="deploy").model
    assert _same_weights(repmlp.load_checkpoint(model_source(SHIPPED, form="deploy").model, out), shipped)
    onnx = tmp_path / "f.onnx"
    assert load_tool("export_onnx").main(["--model", SHIPPED, "--pretrained", "--output", str(onnx)]) == 0
    assert f"(registered weights {SHIPPED})" in capsys.readouterr().out
    assert load_tool("convert_deploy").main(["--model", SHIPPED, "--output", str(tmp_path / "r.safetensors")]) == 0
    assert "(RANDOM weights (seed 0)" in capsys.readouterr().out


def test_export_takes_the_authors_inference_file_with_model_and_kwargs_alone(tmp_path, capsys):
    path, onnx = REFERENCE / "repmlpnet_tiny_deploy.safetensors", tmp_path / "authors.onnx"
    argv = ["--model", "repmlpnet_t224", "--model-kwargs", json.dumps(TINY), "--weights", str(path)]
    assert load_tool("export_onnx").main([*argv, "--output", str(onnx)]) == 0
    assert f"(weights {path})" in capsys.readouterr().out and onnx.is_file()


def test_tools_take_a_timm_train_checkpoint_and_its_ema(tmp_path, capsys):
    """Model, classes and arguments from train.py's args (no --model), its EMA weights with --ema."""
    path, _, ema = timm_train_checkpoint(tmp_path)
    out = tmp_path / "deploy.safetensors"
    assert (
        load_tool("convert_deploy").main(["--weights", str(path), "--ema", "--output", str(out), "--no-float64"]) == 0
    )
    printed = capsys.readouterr().out
    assert (
        "a timm train.py checkpoint (arch repmlp_cifar_mlp, epoch 3, metric 0.25); loaded 'state_dict_ema'" in printed
    )
    deploy = repmlp.load_checkpoint(timm.create_model("repmlp_cifar_mlp", deploy=True, **TINY_CIFAR), out)
    x = torch.randn(2, 3, 32, 32)
    assert rel_err(ema.eval()(x), deploy.eval()(x)) <= 1e-5
