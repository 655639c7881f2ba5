"""RepMLP-ResNet-50 zoo: parameter counts, exact conversion, timm API, the authors' checkpoints."""

import copy

import pytest
import timm
import torch
from conftest import TOL, rel_err

import repmlp
from repmlp.verify import randomize_bn_stats

# deploy-form parameter counts of the paper (Tables 4 and 7; Light g4 = the authors' released preset)
PAPER_DEPLOY_PARAMS = {
    "repmlp_res50_light_224": 57.87e6,
    "repmlp_res50_light_g4_224": 86.14e6,
    "repmlp_res50_bottleneck_224": 40.87e6,
    "repmlp_res50_bottleneck_g8g16_320": 59.22e6,
    "repmlp_res50_bottleneck_g8g8_320": 72.02e6,
    "repmlp_res50_bottleneck_g4g8_320": 87.38e6,
}
MODELS = sorted(PAPER_DEPLOY_PARAMS)


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_every_model_is_registered():
    assert sorted(timm.list_models("repmlp_res50*")) == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_deploy_param_counts_match_the_paper(name):
    """Each preset on the meta device: the paper's deploy-form count, for the conversion's output and for a deploy
    form built directly (same keys and shapes; the conversion itself is tested per design and at full size below)."""
    converted = repmlp.convert_to_deploy(timm.create_model(name, device="meta"))
    built = timm.create_model(name, deploy=True, device="meta")
    assert abs(_params(built) - PAPER_DEPLOY_PARAMS[name]) < 0.005e6
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in converted.state_dict().items()
    }
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in built.modules())


@pytest.mark.parametrize("name", ["repmlp_res50_light_224", "repmlp_res50_bottleneck_224"])  # the two designs
def test_conversion_is_exact_at_full_size_per_block(name):
    model = randomize_bn_stats(timm.create_model(name), seed=1).eval()
    deploy = repmlp.convert_to_deploy(model)
    report = repmlp.verify_equivalence(model, deploy, batch_size=1, per_block=True)
    assert report.passed and report.max_rel_err <= TOL[torch.float32], str(report)
    assert report.per_block and all(s.max_rel_err <= 1e-5 for s in report.per_block.values())


def test_conversion_is_exact_in_float64():
    model = randomize_bn_stats(timm.create_model("repmlp_res50_light_224"), seed=2).double().eval()
    deploy = repmlp.convert_to_deploy(model)
    report = repmlp.verify_equivalence(model, deploy, batch_size=1)
    assert report.dtype == "float64" and report.max_rel_err <= TOL[torch.float64], str(report)


@pytest.mark.parametrize("deploy", [False, True])
def test_features_only(deploy):
    model = timm.create_model("repmlp_res50_light_224", features_only=True, deploy=deploy).eval()
    feats = model(torch.randn(1, 3, 224, 224))
    assert [f.shape[1:] for f in feats] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("size", [(3, 256, 256), (3, 320, 320)])  # other c3/c4 partition grids
def test_wrong_input_size(size):
    model = timm.create_model("repmlp_res50_light_224")
    with pytest.raises(ValueError, match="built for 224x224 inputs"):
        model(torch.randn(1, *size))


def test_bad_output_stride():
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        timm.create_model("repmlp_res50_light_224", output_stride=4)


# --- the authors' checkpoints (layouts from reference/official/keys_*.txt) --------------------------


def test_convert_any_module_tree():
    """A user's model holding our blocks (a detector neck, say) converts too."""

    class Neck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            body = timm.create_model("repmlp_res50_light_224", features_only=True, out_indices=(1, 2))
            self.body, self.head = body, torch.nn.Conv2d(512, 3, 1)

        def forward(self, x):
            return self.head(self.body(x)[0])

    neck = randomize_bn_stats(Neck(), seed=4).eval()
    deploy = repmlp.convert_to_deploy(copy.deepcopy(neck))
    x = torch.randn(1, 3, 224, 224)
    assert rel_err(neck(x), deploy(x)) <= 1e-5
