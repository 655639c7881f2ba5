"""RepMLPNet zoo: parameter counts, exact conversion, partition layouts, resolution contract, timm API,
the authors' fixtures and checkpoint layouts."""

import copy
import json

import pytest
import timm
import torch
from conftest import REFERENCE, TOL, rel_err
from safetensors.torch import load_file

import repmlp
from benchmarks.emulation import authors_inference_form
from repmlp.layers import partition, unpartition
from repmlp.models.repmlpnet import RepMLPBlock
from repmlp.verify import randomize_bn_stats

# train-form parameter counts of the authors' README (reference §1.4)
TRAIN_PARAMS = {
    "repmlpnet_t224": 38.29e6,
    "repmlpnet_b224": 68.24e6,
    "repmlpnet_t256": 58.69e6,
    "repmlpnet_b256": 96.45e6,
    "repmlpnet_d256": 86.89e6,
    "repmlpnet_l256": 117.64e6,
}
MODELS = sorted(TRAIN_PARAMS)


def _tiny_kwargs() -> dict:
    """The fixtures' small RepMLPNet (``repmlpnet_tiny_config.json``) as our model's arguments."""
    cfg = json.loads((REFERENCE / "repmlpnet_tiny_config.json").read_text())
    return dict(
        img_size=64,
        partitions=(16, 8, 4, 2),  # one partition per stage at 64x64
        channels=cfg["channels"],
        depths=cfg["num_blocks"],
        sharesets=cfg["sharesets_nums"],
        reparam_conv_k=cfg["reparam_conv_k"],
        gp_reduction=cfg["globalperceptron_reduce"],
        patch_size=cfg["patch_size"][0],
        num_classes=cfg["num_class"],
        in_chans=cfg["in_channels"],
    )


TINY = _tiny_kwargs()


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _bn_count(model):
    return sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _tiny(seed=0, **kwargs):
    return randomize_bn_stats(timm.create_model("repmlpnet_t224", **{**TINY, **kwargs}), seed=seed).eval()


def test_every_model_is_registered():
    assert sorted(timm.list_models("repmlpnet_*")) == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_the_authors_param_counts(name):
    """Each preset on the meta device: the authors' train-form count, and a deploy form built directly with the
    keys and shapes its conversion gives (the conversion itself is tested per design and at full size below)."""
    train = timm.create_model(name, device="meta")
    assert abs(_params(train) - TRAIN_PARAMS[name]) < 0.005e6
    converted = repmlp.convert_to_deploy(train)
    built = timm.create_model(name, deploy=True, device="meta")
    assert {k: v.shape for k, v in built.state_dict().items()} == {
        k: v.shape for k, v in converted.state_dict().items()
    }
    assert _bn_count(built) == 0 and repmlp.is_deploy_form(built)


def test_conversion_is_exact_at_full_size():
    model = randomize_bn_stats(timm.create_model("repmlpnet_t224"), seed=1).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        y_train = model(x)
        deploy = repmlp.convert_to_deploy(model, inplace=True)  # in place: these models are large
        y_deploy = deploy(x)
    assert _bn_count(deploy) == 0 and repmlp.is_deploy_form(deploy)
    assert rel_err(y_train, y_deploy) <= TOL[torch.float32]


# partitions per stage (h = w or (h, w)) and input size
LAYOUTS = [
    ((16, 8, 4, 2), (64, 64)),
    ((16, 8, 4, 2), (128, 64)),
    ((8, 4, 2, 1), (64, 64)),
    (((8, 4), (4, 2), (2, 1), (1, 1)), (64, 96)),
    ((16, 8, 4, 2), (50, 75)),  # padded to the partitions' multiples
]


@pytest.mark.parametrize("partitions,size", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conversion_is_exact_for_partitioned_layouts(partitions, size, dtype):
    model = _tiny(seed=2, partitions=partitions).to(dtype)
    deploy = repmlp.convert_to_deploy(model)  # converted in the dtype it is compared in
    report = repmlp.verify_equivalence(model, deploy, input_size=(3, *size))
    assert report.max_rel_err <= TOL[dtype], str(report)


def test_partitioned_block_applies_fc3_and_local_perceptron_per_partition():
    """hp, wp > 1: each partition is mixed alone (zero padding at its borders), channel c with set c mod S,
    and scaled by the global perceptron of the whole map."""
    torch.manual_seed(3)
    block = randomize_bn_stats(RepMLPBlock(8, 3, 4, sharesets=2, reparam_conv_k=(1, 3)), seed=3).double().eval()
    x = torch.randn(2, 8, 6, 12, dtype=torch.float64)
    one = copy.deepcopy(block)  # a block whose partition is the whole 3x4 patch
    parts = partition(x, 3, 4)
    expected = unpartition(torch.cat([one(p[None]) / one.global_perceptron(p[None]) for p in parts]), 2, 2, 3)
    expected = expected * block.global_perceptron(x)
    assert rel_err(expected, block(x)) <= TOL[torch.float64]
    residual = torch.randn_like(x)
    assert rel_err(expected + residual, block(x, residual=residual)) <= TOL[torch.float64]


@pytest.mark.parametrize("size", [(3, 64, 60), (3, 48, 64), (3, 96, 96), (3, 66, 64)])
def test_input_sizes_that_do_not_partition_are_padded_and_convert_exactly(size):
    """Any size runs in one model object (maps padded to the next multiple of patch and partition, outputs
    cropped back), the features keep the stages' reductions (rounded up), and both forms agree."""
    model = _tiny()
    deploy = repmlp.convert_to_deploy(model)
    assert repmlp.verify_equivalence(model, deploy, input_size=size).passed
    features = timm.create_model("repmlpnet_t224", features_only=True, **TINY).eval()
    maps = features(torch.randn(1, *size))
    assert [m.shape[-2:] for m in maps] == [(-(-size[1] // r), -(-size[2] // r)) for r in (4, 8, 16, 32)]


def test_the_error_names_the_expected_input():
    model = timm.create_model("repmlpnet_t224", deploy=True)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\) inputs of any size, got \(1, 1, 256, 256\)"):
        model(torch.randn(1, 1, 256, 256))


@pytest.mark.parametrize("deploy", [False, True])
def test_features_only(deploy):
    model = timm.create_model("repmlpnet_t224", features_only=True, deploy=deploy, **TINY).eval()
    feats = model(torch.randn(1, 3, 64, 128))
    assert [f.shape[1:] for f in feats] == [(16, 16, 32), (32, 8, 16), (64, 4, 8), (128, 2, 4)]
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]


def test_features_and_pre_logits_are_exact_in_the_deploy_form():
    model = _tiny(seed=4)
    deploy = repmlp.convert_to_deploy(model)
    x = torch.randn(2, 3, 64, 64)
    f, g = model.forward_features(x), deploy.forward_features(x)
    assert rel_err(f, g) <= 1e-5
    assert rel_err(model.forward_head(f, pre_logits=True), deploy.forward_head(g, pre_logits=True)) <= 1e-5
    train_feats = randomize_bn_stats(timm.create_model("repmlpnet_t224", features_only=True, **TINY)).eval()
    deploy_feats = repmlp.convert_to_deploy(train_feats)
    for a, b in zip(train_feats(x), deploy_feats(x)):
        assert rel_err(a, b) <= 1e-5


def test_authors_inference_form_is_the_same_function():
    model = _tiny(seed=6)
    x = torch.randn(2, 3, 64, 64)
    assert rel_err(model(x), authors_inference_form(model)(x)) <= 1e-5


# --- the authors' fixtures and checkpoints ---------------------------------------------------------------


def _save(state, path, wrap):
    saved = {
        "plain": state,
        "model": {"model": state},
        "state_dict": {"state_dict": state, "epoch": 3},
        "module": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(saved, path)
    return str(path)


@pytest.mark.parametrize("form", ["train", "deploy"])
@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module"])
def test_fixture_parity_through_timm(tmp_path, form, wrap):
    """The authors' train and locality-injected state dicts reproduce their outputs in our deploy form; the
    train one also in our train form."""
    io = load_file(REFERENCE / "repmlpnet_tiny_io.safetensors")
    state = load_file(REFERENCE / f"repmlpnet_tiny_{form}.safetensors")
    path = _save(state, tmp_path / "official.pth", wrap)
    for deploy in (True, False) if form == "train" else (True,):
        model = timm.create_model(
            "repmlpnet_t224", pretrained=True, pretrained_cfg_overlay=dict(file=path), deploy=deploy, **TINY
        ).eval()
        assert repmlp.is_deploy_form(model) == deploy and (_bn_count(model) == 0) == deploy
        y = model(io["x"])
        assert rel_err(io["y_train"], y) <= 1e-5
        assert rel_err(io[f"y_{form}"], y) <= 1e-5


def test_fixture_parity_from_safetensors_and_in_float64():
    io = load_file(REFERENCE / "repmlpnet_tiny_io.safetensors")
    file = str(REFERENCE / "repmlpnet_tiny_train.safetensors")
    model = timm.create_model("repmlpnet_t224", pretrained=True, pretrained_cfg_overlay=dict(file=file), **TINY)
    model = model.double().eval()
    deploy = repmlp.convert_to_deploy(model)
    x = io["x"].double()
    assert rel_err(model(x), deploy(x)) <= TOL[torch.float64]
    assert rel_err(io["y_train"], deploy(x)) <= 1e-5


def test_locality_injected_checkpoint_is_refused_by_the_train_form():
    file = str(REFERENCE / "repmlpnet_tiny_deploy.safetensors")
    with pytest.raises(ValueError, match="deploy-form"):
        timm.create_model("repmlpnet_t224", pretrained=True, pretrained_cfg_overlay=dict(file=file), **TINY)


def test_stage_arguments_must_agree():
    with pytest.raises(ValueError, match="one entry per stage"):
        timm.create_model("repmlpnet_t224", depths=(2, 2, 6))


def test_data_config_follows_the_size():
    """timm's data config follows ``img_size`` and ``set_input_size``, as for the families with a fixed input size."""
    model = timm.create_model("repmlpnet_t224", img_size=448, device="meta")
    assert timm.data.resolve_input_data_config(model)["input_size"] == (3, 448, 448)
    model.set_input_size(320)
    assert timm.data.resolve_input_data_config(model)["input_size"] == (3, 320, 320)
