"""timm 1.0.31's model contract, one case per design: factory ``device``/``dtype`` kwargs (the meta device
included), ``init_weights()`` after ``to_empty``, the model API its optimizer factory and ``create_model`` rely on,
the re-parameterization contract of ``timm.utils.reparameterize_model``, stochastic depth and DropBlock, and module
names that do not collide with timm's. timm's own ``tests/test_models.py`` checks the same on every registered model
(at full size, minutes); these check the properties directly, on small models."""

import copy

import pytest
import timm
import torch
from conftest import DESIGNS, TOL, create, inputs, rel_err, small_kwargs
from timm.layers import DropBlock2d, DropPath
from timm.models._features import FeatureGetterNet
from timm.models._manipulate import group_parameters
from timm.utils import reparameterize_model

import repmlp

RESIDUAL = [n for n in DESIGNS if not n.startswith(("repmlp_cifar", "repmlp_fmnist"))]  # families with residuals


def build(name: str, **kwargs) -> torch.nn.Module:
    """``timm.create_model`` of the small ``name``, no seeding or BN statistics."""
    return timm.create_model(name, **{**small_kwargs(name), **kwargs})


def tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*model.named_parameters(), *model.named_buffers()]


def has_bn(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ------------------------------------------------------------------------------------------ factory kwargs


@pytest.mark.parametrize("name", DESIGNS)
def test_factory_device_and_dtype_reach_every_tensor(name):
    model = build(name, device="meta", dtype=torch.float64)  # no device context: the kwargs alone
    assert {t.device.type for _, t in tensors(model)} == {"meta"}
    assert {t.dtype for _, t in tensors(model) if t.is_floating_point()} == {torch.float64}
    assert {t.dtype for _, t in tensors(model) if not t.is_floating_point()} == {torch.int64}  # BN step counts
    torch.manual_seed(0)
    model = build(name, dtype=torch.float64).eval()
    with torch.no_grad():
        assert model(inputs(model).double()).dtype == torch.float64
    assert "device" not in model.init_args and "dtype" not in model.init_args  # placement is not architecture


@pytest.mark.parametrize("name", DESIGNS)
def test_unknown_or_wrong_constructor_arguments_are_type_errors(name):
    with pytest.raises(TypeError, match="not_a_model_arg"):
        build(name, not_a_model_arg=1)
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype, got torch.int64"):
        build(name, dtype=torch.int64)


@pytest.mark.parametrize("name", DESIGNS)
def test_init_weights_after_to_empty_is_the_constructors_initialisation(name):
    torch.manual_seed(3)
    expected = build(name)
    model = build(name, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        for _, t in tensors(model):
            t.fill_(float("nan") if t.is_floating_point() else 7)  # missed resets cannot pass by chance
    torch.manual_seed(3)
    model.init_weights()
    for (key, a), b in zip(expected.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key
        assert a.is_contiguous(memory_format=torch.channels_last) == b.is_contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------ model API


@pytest.mark.parametrize("name", DESIGNS)
def test_model_api_contract(name):
    model = create(name)
    assert model.in_chans == model.pretrained_cfg["input_size"][0] == inputs(model).shape[1]
    for coarse in (False, True):
        groups = group_parameters(model, model.group_matcher(coarse=coarse), reverse=True)
        assert set(groups) == {n for n, _ in model.named_parameters()}
        assert len(set(groups.values())) > 1
    x = inputs(model)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        headless = create(name, num_classes=0)  # the same seed: the same weights but the classifier
        assert torch.equal(headless(x), pooled)
        unpooled = create(name, num_classes=0, global_pool="")(x)
        assert unpooled.dim() == 4 and unpooled.shape[:2] == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", DESIGNS)
def test_reset_classifier_keeps_the_pool_device_dtype_and_mode(name):
    model = create(name, global_pool="max")
    x = inputs(model, scale=2 if name.startswith("repmlpnet") else 1)  # RepMLPNet's small final map is 1x1 else
    with torch.no_grad():
        expected = model.forward_head(model.forward_features(x), pre_logits=True)
        model.reset_classifier(5)  # global_pool=None: keep 'max'
        assert torch.equal(model.forward_head(model.forward_features(x), pre_logits=True), expected)
        model.reset_classifier(5, "avg")
        assert not torch.allclose(model.forward_head(model.forward_features(x), pre_logits=True), expected)
    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(2)
    new = list(model.get_classifier().parameters())
    assert new and all(p.device.type == "meta" and p.dtype == torch.float64 for p in new)
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("name", DESIGNS)
def test_bfloat16_outputs_after_a_float32_forward(name):
    model = create(name)
    x = inputs(model)
    with torch.no_grad():
        reference = model(x)
        model.to(torch.bfloat16)
        out = model(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert rel_err(reference, out) < 0.05  # bfloat16 keeps 8 bits of mantissa


# ------------------------------------------------------------------------------------------ re-parameterization


@pytest.mark.parametrize("name", DESIGNS)
def test_timm_reparameterize_model_contract(name):
    model = create(name, num_classes=5)
    x = inputs(model)
    fused = reparameterize_model(model)  # timm's walk: each child's reparameterize(), outermost first
    assert has_bn(model) and not has_bn(fused) and repmlp.is_deploy_form(fused)
    with torch.no_grad():
        assert rel_err(model(x), fused(x)) <= TOL[torch.float32]
        assert torch.equal(reparameterize_model(fused)(x), fused(x))
    indices = [0, -1]  # the first and the last level (norm: no norm sits between the last stage and the head)
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=indices, intermediates_only=True)
        getter = FeatureGetterNet(copy.deepcopy(model), out_indices=indices).eval()
        assert all(torch.equal(a, b) for a, b in zip(getter(x), expected))
        fused_getter = reparameterize_model(getter)
        got = fused_getter(x)
        assert all(rel_err(a, b) <= TOL[torch.float32] for a, b in zip(expected, got))
        assert all(torch.equal(a, b) for a, b in zip(torch.jit.script(fused_getter)(x), got))
    getter.train()
    sum(t.square().mean() for t in getter(x)).backward()
    assert all(p.grad is not None for p in getter.parameters() if p.requires_grad)
    getter.model.reset_classifier(7, global_pool="avg")  # after pruning: the kept features' width
    assert getter.model(x).shape == (2, 7)


# ------------------------------------------------------------------------------------------ regularizers


@pytest.mark.parametrize("name", RESIDUAL)
def test_drop_path_rises_linearly_and_leaves_eval_and_conversion_exact(name):
    rate = 0.3
    plain, dropping = create(name), create(name, drop_path_rate=rate)
    rates = [m.drop_prob for m in dropping.modules() if isinstance(m, DropPath)]
    blocks = len(rates) + 1  # the first block's rate is 0: no module
    assert rates == pytest.approx([rate * i / (blocks - 1) for i in range(1, blocks)])
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    x = inputs(plain)
    with torch.no_grad():
        assert torch.equal(plain(x), dropping(x))
        dropping.train()
        assert not torch.equal(dropping(x), plain.train()(x))  # whole residual branches dropped per sample
    dropping.eval()
    for dtype in (torch.float32, torch.float64):
        report = repmlp.verify_conversion(dropping, dtype, inputs=x)
        assert report.passed and report.max_rel_err <= TOL[dtype], str(report)


def test_drop_block_in_the_resnet_bottlenecks_of_c4_and_c5():
    plain, dropping = create("repmlp_res50_light_224"), create("repmlp_res50_light_224", drop_block_rate=0.2)
    placed = [n for n, m in dropping.named_modules() if isinstance(m, DropBlock2d)]
    assert placed == [f"stages.{i}.{j}.drop_block" for i, j in [(2, 0), (3, 0), (3, 1), (3, 2)]]
    assert [dropping.get_submodule(n).block_size for n in placed] == [5, 3, 3, 3]  # timm's ResNet sizes
    x = inputs(plain)
    with torch.no_grad():
        assert torch.equal(plain(x), dropping(x))
    report = repmlp.verify_conversion(dropping, torch.float64, inputs=x)
    assert report.passed, str(report)


@pytest.mark.parametrize(
    "name,kwargs,family",
    [
        ("repmlpnet_t224", dict(drop_block_rate=0.1), "RepMLPNet takes no drop_block_rate"),
        ("repmlp_cifar_mlp", dict(drop_path_rate=0.1), "PureMLPNet takes no drop_path_rate"),
        ("repmlp_cifar_wideconv", dict(drop_block_rate=0.1), "PureMLPNet takes no drop_block_rate"),
        ("repmlp_res50_light_224", dict(drop_path_rate=1.0), r"drop_path_rate must be a number in \[0, 1\)"),
        ("repmlpnet_t224", dict(drop_path_rate=-0.1), r"drop_path_rate must be a number in \[0, 1\)"),
    ],
)
def test_regularizers_a_family_cannot_take_are_refused_by_name(name, kwargs, family):
    with pytest.raises(ValueError, match=family):
        build(name, **kwargs)
    build(name, **{k: 0.0 for k in kwargs})  # timm's default of 0 is accepted everywhere


# ------------------------------------------------------------------------------------------ module names


def test_our_model_modules_hold_only_our_models():
    ours = {m for m in timm.list_modules() if any(n.startswith("repmlp") for n in timm.list_models(module=m))}
    assert ours == {"repmlp_resnet", "repmlpnet", "mlp_cifar"}
    for module in ours:
        assert all(n.startswith("repmlp") for n in timm.list_models(module=module)), module
    assert not [n for n in timm.list_models(module="resnet") if n.startswith("repmlp")]
