"""Pure-MLP CIFAR model, Wide ConvNet and the Fashion-MNIST variant: exact conversion and the timm API."""

import hashlib
from pathlib import Path

import pytest
import timm
import torch
from conftest import TOL

import repmlp
from repmlp.shipped import shipped_models
from repmlp.shipped import weights_dir as pretrained_dir
from repmlp.verify import randomize_bn_stats

MODELS = ["repmlp_cifar_mlp", "repmlp_cifar_wideconv", "repmlp_fmnist_mlp"]
SHIPPED = "repmlp_fmnist_mlp.fmnist"


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_models_are_registered():
    assert set(MODELS) <= set(timm.list_models("repmlp_*"))
    assert SHIPPED in timm.list_models(pretrained=True)


@pytest.mark.parametrize("name", MODELS)
def test_conversion_is_exact(name):
    model = randomize_bn_stats(timm.create_model(name), seed=3).eval()
    deploy = repmlp.convert_to_deploy(model)
    assert repmlp.is_deploy_form(deploy)
    report = repmlp.verify_equivalence(model, deploy, batch_size=4)
    assert report.passed and report.max_rel_err <= TOL[torch.float32], str(report)
    built = timm.create_model(name, deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in deploy.state_dict().items()}


def test_pure_mlp_matches_the_paper_parameter_count():
    # paper v1 Table 1: 22.41M parameters (deploy form: three FCs per RepMLP)
    deploy = timm.create_model("repmlp_cifar_mlp", deploy=True)
    assert abs(_params(deploy) - 22.41e6) < 0.01e6


def test_wrong_input_size_names_the_expected_one():
    model = timm.create_model("repmlp_fmnist_mlp").eval()
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("kwargs,match", [(dict(img_size=0), "positive"), (dict(mixer="attention"), "mixer must be")])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("repmlp_fmnist_mlp", **kwargs)


def test_shipped_fashion_mnist_cfg_takes_images_as_they_are():
    cfg = timm.models.get_pretrained_cfg(SHIPPED).to_dict()
    assert cfg["input_size"] == (1, 28, 28) and cfg["crop_pct"] == 1.0 and len(cfg["mean"]) == 1
    assert not Path(cfg["file"]).is_absolute() and (pretrained_dir() / cfg["file"]).is_dir()
    assert not cfg.get("hf_hub_id")


def test_shipped_weights_load_offline_in_both_forms():
    entries = [e for e in shipped_models() if f"{e['model']}.{e['tag']}" == SHIPPED]
    assert [e["form"] for e in entries] == ["train"]  # the deploy form is converted on load
    path = pretrained_dir() / entries[0]["file"]
    assert path.stat().st_size <= 25 * 2**20
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entries[0]["sha256"]
    train = timm.create_model(SHIPPED, pretrained=True).eval()
    deploy = timm.create_model(SHIPPED, pretrained=True, deploy=True).eval()
    assert repmlp.is_deploy_form(deploy)
    report = repmlp.verify_equivalence(train, deploy, batch_size=8)
    assert report.passed, str(report)
