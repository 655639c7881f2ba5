"""Pure-MLP CIFAR model, Wide ConvNet and the Fashion-MNIST variant: the presets' numbers and what is particular
to them (conversion and the timm API are tested per design in test_zoo.py)."""

import pytest
import timm
import torch

MODELS = ["repmlp_cifar_mlp", "repmlp_cifar_wideconv", "repmlp_fmnist_mlp"]
SHIPPED = "repmlp_fmnist_mlp.fmnist"


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_models_are_registered():
    assert set(MODELS) <= set(timm.list_models("repmlp_*"))
    assert SHIPPED in timm.list_models(pretrained=True)


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
