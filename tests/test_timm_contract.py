"""timm's model contract, one small model per design (pretrained_cfgs for every registered name): feature extraction
(forward_intermediates, features_only with every feature_cls, FX), TorchScript, head semantics; a
segmentation-models-pytorch client. The shipped folders are in test_shipped.py."""

from pathlib import Path

import pytest
import timm
import torch
from conftest import DESIGNS, REGISTERED, SMALL, create, inputs, rel_err
from torchvision.models.feature_extraction import create_feature_extractor

import repmlp
from repmlp.models import model_input_size
from repmlp.shipped import weights_dir

ROOT = Path(__file__).resolve().parents[1]
FEATURE_CLASSES = ["list", "dict", "hook", "fx", "getter"]


def assert_equal_lists(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> None:
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        assert e.shape == a.shape and torch.equal(e, a)


# ------------------------------------------------------------------------------------------ feature extraction


@pytest.mark.parametrize("name", DESIGNS)
def test_forward_intermediates_follow_timm_semantics(name):
    model = create(name)
    x = inputs(model)
    levels = len(model.feature_info)
    assert levels >= 3
    with torch.no_grad():
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
        assert torch.equal(final, features) and torch.equal(intermediates[-1], features)
        assert [t.shape[1] for t in intermediates] == [f["num_chs"] for f in model.feature_info]
        assert [x.shape[-1] // t.shape[-1] for t in intermediates] == [f["reduction"] for f in model.feature_info]
        assert_equal_lists(intermediates[-2:], model.forward_intermediates(x, indices=2, intermediates_only=True))
        picked = model.forward_intermediates(x, indices=[0, -1], stop_early=True, intermediates_only=True)
        assert_equal_lists([intermediates[0], intermediates[-1]], picked)
        early, first = model.forward_intermediates(x, indices=[0], stop_early=True)
        assert_equal_lists(intermediates[:1], first) and torch.equal(early, intermediates[0])
    with pytest.raises(ValueError, match="NCHW"):
        model.forward_intermediates(x, output_fmt="NHWC")


@pytest.mark.parametrize("name", DESIGNS)
def test_prune_intermediate_layers_keeps_the_requested_levels(name):
    model = create(name)
    x = inputs(model)
    with torch.no_grad():
        intermediates = model.forward_intermediates(x, intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and model.num_classes == 0
        assert model.num_features == model.feature_info[1]["num_chs"]
        assert_equal_lists(intermediates[:2], model.forward_intermediates(x, indices=[0, 1], intermediates_only=True))
        assert torch.equal(model(x), intermediates[1])  # the head passes the features through


@pytest.mark.parametrize("name", DESIGNS)
def test_features_only_with_every_feature_cls(name):
    reference = create(name, randomize_bn=False)  # seeded init: the same weights whatever the module order
    x = inputs(reference)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
    for feature_cls in FEATURE_CLASSES:
        extractor = create(name, randomize_bn=False, features_only=True, feature_cls=feature_cls)
        assert extractor.feature_info.channels() == [f["num_chs"] for f in reference.feature_info], feature_cls
        with torch.no_grad():
            out = extractor(x)
        assert_equal_lists(expected, list(out.values()) if isinstance(out, dict) else out)


@pytest.mark.parametrize("name", DESIGNS)
def test_fx_feature_extraction_keeps_the_input_checks(name):
    model = create(name)
    x = inputs(model)
    nodes = [f["module"] for f in model.feature_info] + ["head"]
    extractor = create_feature_extractor(model, nodes)  # torchvision's, no timm tracer settings
    with torch.no_grad():
        out = extractor(x)
        expected = model.forward_intermediates(x, intermediates_only=True) + [model(x)]
        assert_equal_lists(expected, list(out.values()))
    c, h, w = model_input_size(model)
    if not model.pretrained_cfg["fixed_input_size"]:  # any size runs; the channel check stays in the graph
        with pytest.raises(ValueError, match=rf"\(N, {c}, "):
            extractor(torch.randn(1, c + 1, h, w))
        return
    with pytest.raises(ValueError, match=rf"{h}.*{h + 4}|{h + 4}.*{h}"):  # eager, in the graph: both sizes
        extractor(torch.randn(1, c, h + 4, w + 4))


@pytest.mark.parametrize("name", ["repmlp_fmnist_mlp", "repmlpnet_t224", "repmlp_res50_bottleneck_224"])  # families
def test_fx_graphs_script(name):
    model = create(name)
    x = inputs(model)
    extractor = create_feature_extractor(model, [f["module"] for f in model.feature_info])
    with torch.no_grad():
        expected = model.forward_intermediates(x, intermediates_only=True)
        assert_equal_lists(expected, list(torch.jit.script(extractor)(x).values()))


# ------------------------------------------------------------------------------------------ TorchScript


@pytest.mark.parametrize("name", DESIGNS)
def test_torchscript_train_and_deploy_forms(name):
    train = create(name)
    deploy = repmlp.convert_to_deploy(train)
    scale = 2 if name.startswith("repmlpnet") else 1  # RepMLPNet also at 2x2 partitions per block
    x = inputs(train, scale=scale)
    with torch.no_grad():
        scripted_deploy = torch.jit.script(deploy)
        y_train, y_deploy = torch.jit.script(train)(x), scripted_deploy(x)
        assert torch.equal(y_train, train(x)) and torch.equal(y_deploy, deploy(x))
        assert rel_err(y_train, y_deploy) <= 1e-5
    c, h, w = model_input_size(train)
    if train.pretrained_cfg["fixed_input_size"]:  # the others take any size
        with pytest.raises(torch.jit.Error, match="ValueError"):
            scripted_deploy(torch.randn(1, c, h + 4, w + 4))


@pytest.mark.parametrize("name", DESIGNS)
def test_wrong_input_size_is_a_value_error_naming_both_sizes(name):
    """Models with RepMLP v1 blocks accept the sizes of their partition grids; RepMLPNet and the Wide ConvNet any."""
    model = create(name)
    c, h, w = model_input_size(model)
    x = torch.randn(1, c, h + 4, w + 4)
    if not model.pretrained_cfg["fixed_input_size"]:
        assert model(x).shape == (1, model.num_classes)
        return
    with pytest.raises(ValueError, match=rf"{h}.*{h + 4}|{h + 4}.*{h}"):
        model(x)


# ------------------------------------------------------------------------------------------ head


@pytest.mark.parametrize("name", DESIGNS)
def test_head_semantics(name):
    model = create(name)
    x = inputs(model)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        assert pooled.shape == (2, model.head_hidden_size) and model(x).shape == (2, model.num_classes)
        assert model.get_classifier() is model.head.fc
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.num_classes == 5
        model.reset_classifier(0)
        assert torch.equal(model(x), pooled)
        model.reset_classifier(3, global_pool="max")
        assert model(x).shape == (2, 3)
        model.reset_classifier(0, global_pool="")  # no pooling: timm's unpooled map of the head's features
        unpooled = model.forward_head(features, pre_logits=True)
        assert unpooled.shape == (2, model.head_hidden_size, *features.shape[-2:])


def test_mlp_head_without_pooling_classifies_every_position():
    model = create("repmlp_fmnist_mlp", global_pool="")
    with torch.no_grad():
        features = model.forward_features(inputs(model))
        maps, logits = model.forward_head(features, pre_logits=True), model.forward_head(features)
    assert maps.shape == (2, 512, 7, 7) and logits.shape == (2, 10, 7, 7)
    per_position = model.head.fc(maps.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.equal(logits, per_position)
    with pytest.raises(ValueError, match="catavgmax"):
        create("repmlp_fmnist_mlp", global_pool="catavgmax")


# ------------------------------------------------------------------------------------------ pretrained cfgs


@pytest.mark.parametrize("name", REGISTERED)
def test_pretrained_cfgs_are_complete(name):
    for cfg in timm.models.get_arch_pretrained_cfgs(name).values():
        cfg = cfg.to_dict()
        assert {"paper_name", "paper_ids", "origin_url", "description", "license"} <= set(cfg)
        if cfg.get("file"):
            assert not Path(cfg["file"]).is_absolute() and (weights_dir() / cfg["file"]).is_dir()
            assert len(cfg["label_names"]) == cfg["num_classes"] and cfg.get("notes")


def test_fashion_mnist_labels():
    cfg = timm.models.get_pretrained_cfg("repmlp_fmnist_mlp.fmnist").to_dict()
    assert cfg["label_names"][0] == "T-shirt/top" and cfg["label_names"][9] == "Ankle boot"


# ------------------------------------------------------------------------------------------ shipped folders


# ------------------------------------------------------------------------------------------ dense prediction


@pytest.mark.parametrize(
    "encoder,kwargs,size",
    [
        ("tu-repmlpnet_t224", SMALL["repmlpnet"], 64),  # built for 32x32, run at 64x64 (as T224 at 448x448)
        ("tu-repmlp_res50_light_224", SMALL["repmlp_res50"], 64),
    ],
)
def test_segmentation_models_pytorch_unet_trains_and_converts_exactly(encoder, kwargs, size):
    import segmentation_models_pytorch as smp  # the dev extra installs it

    torch.manual_seed(0)
    unet = smp.Unet(encoder, encoder_weights=None, classes=3, decoder_channels=(32, 16, 16, 8, 8), **kwargs)
    repmlp.randomize_bn_stats(unet)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    unet.train()
    out = unet(x)
    assert out.shape == (2, 3, size, size)
    out.square().mean().backward()
    grads = [p.grad for n, p in unet.encoder.named_parameters() if "fc3" in n]
    assert grads and all(g is not None and g.abs().max() > 0 for g in grads)
    deploy = repmlp.convert_to_deploy(unet)
    assert repmlp.is_deploy_form(deploy.encoder)
    for report in (
        repmlp.verify_equivalence(unet, deploy, inputs=x),
        repmlp.verify_conversion(unet, torch.float64, inputs=x),
    ):
        assert report.passed, str(report)
