"""Any input size: weights of one size in a model of another, set_input_size, padding, output_stride, frozen BNs,
and the paper's Cityscapes backbone (v1 Table 6)."""

import pytest
import timm
import torch
from conftest import TOL, rel_err
from timm.layers import freeze_batch_norm_2d
from torchvision.ops.misc import FrozenBatchNorm2d

import repmlp
from repmlp import convert_to_deploy, randomize_bn_stats, save_checkpoint

# a small model per family and the size it is trained at
FAMILIES = {
    "repmlp_res50_light_224": (64, dict(partition=4, widths=(32, 64, 128, 256))),
    "repmlpnet_t224": (
        32,
        dict(partitions=(8, 4, 2, 1), channels=(8, 16, 16, 32), sharesets=(1, 2, 4, 8), depths=(1, 1, 2, 1)),
    ),
    "repmlp_cifar_mlp": (16, dict(partition=4, widths=(8, 16, 16))),
}


def _build(name, size, seed=0, randomize=True, **kwargs):
    torch.manual_seed(seed)
    trained_at, small = FAMILIES[name]
    model = timm.create_model(name, img_size=size, num_classes=10, **small, **kwargs)
    return (randomize_bn_stats(model, seed) if randomize else model).eval()


def _input(size, seed=1):
    size = (size, size) if isinstance(size, int) else size
    return torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(FAMILIES))
@pytest.mark.parametrize("scale", [2, 1.5, "odd"])
def test_weights_of_one_size_load_into_another_and_convert_exactly(name, scale, tmp_path):
    trained_at, _ = FAMILIES[name]
    size = (int(trained_at * 1.5) + 3, trained_at + 5) if scale == "odd" else int(trained_at * scale)
    trained = _build(name, trained_at)
    path = tmp_path / "trained.safetensors"
    save_checkpoint(trained, path)
    file = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), randomize=False)
    model = _build(name, size, seed=1, **file)
    ours, theirs = model.state_dict(), trained.state_dict()
    kept = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k])]
    fresh = sorted(set(ours) - set(kept))  # only v1 global perceptrons may be new (their BN only where none was)
    assert all(".global_perceptron." in k for k in fresh), fresh
    assert not fresh if name.startswith("repmlpnet") else fresh
    randomize_bn_stats(model, seed=2)
    x = _input(size)
    for dtype in (torch.float32, torch.float64):
        train = model.to(dtype)
        with torch.no_grad():
            assert rel_err(train(x.to(dtype)), convert_to_deploy(train)(x.to(dtype))) <= TOL[dtype]
    deploy = _build(name, size, deploy=True, **file)
    assert {k: v.shape for k, v in deploy.state_dict().items()} == {
        k: v.shape for k, v in convert_to_deploy(model).state_dict().items()
    }


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_set_input_size_equals_a_model_built_at_that_size(name):
    trained_at, _ = FAMILIES[name]
    size = (2 * trained_at + 3, trained_at + 8)
    model = _build(name, trained_at)
    model.set_input_size(size)
    built = _build(name, size, seed=5)
    built.load_state_dict(model.state_dict())  # the same structure: strict
    x = _input(size)
    with torch.no_grad():
        assert torch.equal(model(x), built(x))
    assert model.init_args["img_size"] == size and timm.models.get_model_traits(model)["img_size"] == size
    assert model.train_form_twin().state_dict().keys() == model.state_dict().keys()
    if model.pretrained_cfg["fixed_input_size"]:
        assert timm.data.resolve_input_data_config(model)["input_size"] == (3, *size)


def test_a_refused_size_leaves_the_model_unchanged():
    model = _build("repmlp_res50_light_224", 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fc1_fc2_reduction=7 must divide"):
        model.set_input_size(128, fc1_fc2_reduction=7)
    assert model.img_size == (64, 64) and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_one_object_accepts_every_size_of_its_partition_grids():
    model = _build("repmlp_res50_light_224", 64)  # c3 8x8 in 4x4 partitions: inputs 57..64 give the same grid
    with torch.no_grad():
        assert model(_input((57, 60))).shape == (2, 10)
    with pytest.raises(ValueError, match="built for 64x64 inputs"):
        model(_input(65))


@pytest.mark.parametrize("output_stride,reductions", [(16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])])
def test_output_stride_as_the_paper_ran_cityscapes(output_stride, reductions):
    size = (70, 90)
    model = _build("repmlp_res50_light_224", size, output_stride=output_stride, fc1_fc2_reduction=(2, 4))
    c5 = model.stages[3]
    assert c5[1].conv2.conv.dilation == (32 // output_stride,) * 2 and model.stages[2][1].conv1.conv.dilation == (1, 1)
    features = model.forward_intermediates(_input(size), intermediates_only=True)
    assert [f.shape[-2:] for f in features] == [(-(-70 // r), -(-90 // r)) for r in reductions]
    assert [f["reduction"] for f in model.feature_info] == reductions
    with torch.no_grad():
        assert rel_err(model(_input(size)), convert_to_deploy(model)(_input(size))) <= TOL[torch.float32]


def _torchvision_frozen(model):
    for m in list(model.modules()):
        for child, bn in list(m.named_children()):
            if isinstance(bn, torch.nn.BatchNorm2d):
                frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(bn, key))
                setattr(m, child, frozen)
    return model


@pytest.mark.parametrize("freeze", [freeze_batch_norm_2d, _torchvision_frozen])
@pytest.mark.parametrize("name", ["repmlp_res50_light_224", "repmlpnet_t224"])
def test_frozen_batch_norms_convert_exactly(name, freeze):
    model = freeze(_build(name, FAMILIES[name][0]))
    assert any(isinstance(m, FrozenBatchNorm2d) for m in model.modules()) and not repmlp.is_deploy_form(model)
    deploy = convert_to_deploy(model)
    assert repmlp.is_deploy_form(deploy)
    assert repmlp.verify_equivalence(model, deploy).passed


def test_table6_parameter_count():
    """RepMLP-Res50-g4/8 from 320 at 713x713, c4 undilated (output stride 8: 90x90 maps, 81 partitions in c3 and
    c4), FC1/FC2 reduced 4x (c3) and 8x (c4), deploy form without classifier, plus a BN-fused PSP head (pyramid
    pooling 4 x (2048 -> 512), 3x3 4096 -> 512, 1x1 512 -> 19): 175.41M (RepMLP v1 Table 6)."""
    with torch.device("meta"):
        backbone = timm.create_model(
            "repmlp_res50_bottleneck_g4g8_320",
            img_size=713,
            output_stride=8,
            fc1_fc2_reduction=(4, 8),
            num_classes=0,
            deploy=True,
        )
        head = torch.nn.ModuleList(
            [torch.nn.Conv2d(2048, 512, 1) for _ in range(4)]
            + [torch.nn.Conv2d(4096, 512, 3, padding=1), torch.nn.Conv2d(512, 19, 1)]
        )
    gp = backbone.stages[1][1].repmlp.global_perceptron
    assert (gp.hp, gp.wp, gp.fc1.in_features, gp.fc1.out_features) == (9, 9, 5184, 1296)
    count = sum(p.numel() for p in [*backbone.parameters(), *head.parameters()])
    assert round(count / 1e6, 2) == 175.41
