"""RepMLP-ResNet-50 zoo: parameter counts, exact conversion, timm API, the authors' checkpoints."""

import copy

import pytest
import timm
import torch
from conftest import TOL, official_state_dict, rel_err

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
def test_conversion_is_exact_and_matches_the_paper(name):
    model = randomize_bn_stats(timm.create_model(name), seed=1).eval()
    deploy = repmlp.convert_to_deploy(model)
    assert abs(_params(deploy) - PAPER_DEPLOY_PARAMS[name]) < 0.005e6
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in deploy.modules())
    report = repmlp.verify_equivalence(model, deploy, batch_size=1, per_block=True)
    assert report.passed and report.max_rel_err <= TOL[torch.float32], str(report)
    assert report.per_block and all(s.max_rel_err <= 1e-5 for s in report.per_block.values())
    built = timm.create_model(name, deploy=True)
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in deploy.state_dict().items()}


@pytest.mark.parametrize("name", MODELS)
def test_timm_api_of_every_model(name):
    model = timm.create_model(name, deploy=True, num_classes=7).eval()
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(1, *size)
    feats = model.forward_features(x)
    assert feats.shape == (1, 2048, size[1] // 32, size[2] // 32)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)
    assert model.forward_head(feats).shape == (1, 7)
    features = timm.create_model(name, deploy=True, features_only=True).eval()
    assert [f.shape[1] for f in features(x)] == [256, 512, 1024, 2048]
    assert features.feature_info.reduction() == [4, 8, 16, 32]


def test_conversion_is_exact_in_float64():
    model = randomize_bn_stats(timm.create_model("repmlp_res50_light_224"), seed=2).double().eval()
    deploy = repmlp.convert_to_deploy(model)
    report = repmlp.verify_equivalence(model, deploy, batch_size=1)
    assert report.dtype == "float64" and report.max_rel_err <= TOL[torch.float64], str(report)


def test_timm_model_api():
    model = timm.create_model("repmlp_res50_light_224", num_classes=10).eval()
    x = torch.randn(1, 3, 224, 224)
    feats = model.forward_features(x)
    assert feats.shape == (1, 2048, 7, 7)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)
    assert model(x).shape == (1, 10)
    assert model.get_classifier().out_features == 10
    model.reset_classifier(5)
    assert model(x).shape == (1, 5)
    model.reset_classifier(0)
    assert model(x).shape == (1, 2048)
    assert model.group_matcher()["stem"] == r"^stem"
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["fixed_input_size"] and cfg["first_conv"] == "stem.conv"
    assert cfg["classifier"] == "fc" and {"mean", "std", "crop_pct", "interpolation"} <= set(cfg)


def test_grad_checkpointing_trains():
    model = timm.create_model("repmlp_res50_bottleneck_224", num_classes=4).train()
    model.set_grad_checkpointing()
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    assert model.stages[1][1].repmlp.partition_perceptron.fc3.weight.grad is not None


@pytest.mark.parametrize("deploy", [False, True])
def test_features_only(deploy):
    model = timm.create_model("repmlp_res50_light_224", features_only=True, deploy=deploy).eval()
    feats = model(torch.randn(1, 3, 224, 224))
    assert [f.shape[1:] for f in feats] == [(256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


@pytest.mark.parametrize("size", [(3, 223, 224), (3, 256, 256), (3, 320, 320)])
def test_wrong_input_size(size):
    model = timm.create_model("repmlp_res50_light_224")
    with pytest.raises(ValueError, match="built for 224x224 inputs"):
        model(torch.randn(1, *size))


def test_img_size_that_cannot_partition():
    with pytest.raises(ValueError, match="partition=7"):
        timm.create_model("repmlp_res50_light_224", img_size=256)


# --- the authors' checkpoints (layouts from reference/official/keys_*.txt) --------------------------


OFFICIAL = [
    ("repmlp_res50_light_g4_224", "RepMLP-Res50-light-224", "light"),
    ("repmlp_res50_bottleneck_224", "RepMLP-Res50-bottleneck-224", "btnk"),
]


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module"])
@pytest.mark.parametrize("name,keys,block", OFFICIAL)
def test_official_train_checkpoint_loads_through_timm(tmp_path, name, keys, block, wrap):
    state = official_state_dict(f"keys_{keys}_train.txt")
    saved = {
        "plain": state,
        "model": {"model": state},
        "state_dict": {"state_dict": state, "epoch": 3},
        "module": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    path = tmp_path / "official.pth"
    torch.save(saved, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    repmlp_block = model.stages[1][1].repmlp
    fc3 = state[f"stage2.1.{block}_repmlp.fc3.weight"]
    assert torch.equal(repmlp_block.partition_perceptron.fc3.weight, fc3.flatten(1))
    assert torch.equal(
        repmlp_block.local_perceptron.branches[2].conv.weight, state[f"stage2.1.{block}_repmlp.repconv5.conv.weight"]
    )
    assert torch.equal(
        repmlp_block.global_perceptron.bn.running_var, state[f"stage2.1.{block}_repmlp.avg.bn.running_var"]
    )
    assert torch.equal(model.fc.weight, state["linear.weight"])
    assert torch.equal(model.stem.conv.weight, state["stage0.0.conv.weight"])


@pytest.mark.parametrize("name,keys,block", OFFICIAL)
def test_official_deploy_checkpoint_loads_into_deploy_form(tmp_path, name, keys, block):
    state = official_state_dict(f"keys_{keys}_deploy.txt")
    path = tmp_path / "official_deploy.pth"
    torch.save(state, path)
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), deploy=True)
    assert torch.equal(
        model.stages[2][3].repmlp.partition_perceptron.fc3.bias, state[f"stage3.3.{block}_repmlp.fc3.bias"]
    )
    with pytest.raises(ValueError, match="deploy-form"):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_train_checkpoint_into_deploy_model_is_converted(tmp_path):
    train = randomize_bn_stats(timm.create_model("repmlp_res50_bottleneck_224"), seed=3).eval()
    path = tmp_path / "train.safetensors"
    repmlp.save_checkpoint(train, path)
    deploy = timm.create_model(
        "repmlp_res50_bottleneck_224", pretrained=True, deploy=True, pretrained_cfg_overlay=dict(file=str(path))
    ).eval()
    assert repmlp.verify_equivalence(train, deploy, batch_size=1).passed


def test_pretrained_without_a_file_is_an_error():
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        timm.create_model("repmlp_res50_light_224", pretrained=True)


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
