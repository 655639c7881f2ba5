"""Pure-MLP CIFAR model, Wide ConvNet and the Fashion-MNIST variant: exact conversion and the timm API."""

import hashlib
import json
from pathlib import Path

import pytest
import timm
import torch
from conftest import TOL

import repmlp
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


@pytest.mark.parametrize(
    "name,input_size,features",
    [
        ("repmlp_cifar_mlp", (3, 32, 32), 64),
        ("repmlp_cifar_wideconv", (3, 32, 32), 128),
        ("repmlp_fmnist_mlp", (1, 28, 28), 48),
    ],
)
def test_timm_model_api(name, input_size, features):
    model = timm.create_model(name, num_classes=7).eval()
    x = torch.randn(2, *input_size)
    feats = model.forward_features(x)
    assert feats.shape == (2, features, *model.pretrained_cfg["pool_size"])
    assert model.forward_head(feats, pre_logits=True).shape == (2, 512)
    assert model(x).shape == (2, 7) and model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)
    assert model.group_matcher()["stem"] == r"^stem"
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == input_size and cfg["fixed_input_size"] and cfg["first_conv"] == "stem.conv"
    assert cfg["classifier"] == "fc" and {"mean", "std", "crop_pct", "interpolation"} <= set(cfg)


def test_grad_checkpointing_and_features_only():
    model = timm.create_model("repmlp_fmnist_mlp", num_classes=4).train()
    model.set_grad_checkpointing()
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    assert model.stages[0][1][0].partition_perceptron.fc3.weight.grad is not None
    features = timm.create_model("repmlp_fmnist_mlp", features_only=True).eval()
    assert [f.shape[1:] for f in features(torch.randn(1, 1, 28, 28))] == [(48, 14, 14), (48, 7, 7)]
    assert features.feature_info.reduction() == [2, 4]


def test_wrong_input_size_names_the_expected_one():
    model = timm.create_model("repmlp_fmnist_mlp").eval()
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        model(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize(
    "kwargs,match", [(dict(img_size=30), "divisible by partition"), (dict(mixer="attention"), "mixer must be")]
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        timm.create_model("repmlp_fmnist_mlp", **kwargs)


def test_shipped_fashion_mnist_cfg_takes_images_as_they_are():
    cfg = timm.models.get_pretrained_cfg(SHIPPED).to_dict()
    assert cfg["input_size"] == (1, 28, 28) and cfg["crop_pct"] == 1.0 and len(cfg["mean"]) == 1
    assert Path(cfg["file"]).parent == pretrained_dir() and not cfg.get("hf_hub_id")


@pytest.mark.skipif(not (pretrained_dir() / "manifest.json").is_file(), reason="no shipped weights yet")
def test_shipped_weights_load_offline_in_both_forms():
    manifest = json.loads((pretrained_dir() / "manifest.json").read_text())
    entries = [e for e in manifest if f"{e['model']}.{e['tag']}" == SHIPPED]
    assert {e["form"] for e in entries} == {"train", "deploy"}
    for entry in entries:
        path = pretrained_dir() / entry["file"]
        assert path.stat().st_size <= 25 * 2**20 and entry["top1"] >= 92.0
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    train = timm.create_model(SHIPPED, pretrained=True).eval()
    deploy = timm.create_model(SHIPPED, pretrained=True, deploy=True).eval()
    assert repmlp.is_deploy_form(deploy)
    report = repmlp.verify_equivalence(train, deploy, batch_size=8)
    assert report.passed, str(report)
