"""Every registered model: the timm model API, the three routes to the deploy form and fine-tuning loads; every way
of loading weights (model form x file form x file origin) for one preset of each design."""

import itertools
import re

import pytest
import timm
import timm.optim
import torch
from conftest import official_state_dict, rel_err

import repmlp
from repmlp.models import model_input_size
from repmlp.verify import randomize_bn_stats

NAMES = timm.list_models("repmlp*")


def small(name: str) -> dict:
    """Constructor arguments that make ``name`` small and fast, keeping its block types and options."""
    if name.startswith("repmlp_res50"):
        return dict(img_size=32, partition=2)
    if name.startswith("repmlpnet"):
        return dict(img_size=64, channels=(32, 64, 128, 256))
    return {}


#: the smallest model of the suite: repmlp_cifar_mlp with other widths and FC3 groups than its preset's
TINY_CIFAR = dict(widths=(8, 16, 32), fc3_groups=4)

# every registered model at a small size, plus one built with non-default constructor arguments
CASES = [pytest.param(n, small(n), id=n) for n in NAMES] + [
    pytest.param("repmlp_cifar_mlp", TINY_CIFAR, id="repmlp_cifar_mlp-widths")
]


def design(name: str) -> str:
    """The model family and block design of ``name``: presets that differ only in groups, size or width share one
    (repmlp_res50_light_224 and repmlp_res50_light_g4_224; repmlpnet_b224 and repmlpnet_l256)."""
    return re.sub(r"_([a-z]?\d+|g\d+(g\d+)*)(_\d+)?$", "", name)


# one case per design, for what a preset's numbers cannot change (how files load)
DESIGN_CASES = [c for c in CASES[: len(NAMES)] if c.id == min(n for n in NAMES if design(n) == design(c.id))]
DESIGN_CASES += CASES[len(NAMES) :]


def build(name: str, kwargs: dict, seed: int = 0, **more) -> torch.nn.Module:
    torch.manual_seed(seed)
    return randomize_bn_stats(timm.create_model(name, **kwargs, **more), seed=seed).eval()


def inputs(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model_input_size(model), generator=torch.Generator().manual_seed(1))


def test_one_case_per_design():
    assert [c.id for c in DESIGN_CASES] == [
        "repmlp_cifar_mlp",
        "repmlp_cifar_wideconv",
        "repmlp_fmnist_mlp",
        "repmlp_res50_bottleneck_224",
        "repmlp_res50_light_224",
        "repmlpnet_b224",
        "repmlp_cifar_mlp-widths",
    ]


def test_every_family_is_covered():
    assert {n.split("_")[0] + "_" + n.split("_")[1] for n in NAMES} >= {"repmlp_res50", "repmlp_cifar"}
    assert any(n.startswith("repmlpnet") for n in NAMES) and "repmlp_fmnist_mlp" in NAMES


@pytest.mark.parametrize("name,kwargs", CASES)
def test_model_api(name, kwargs):
    model = build(name, kwargs)
    x = inputs(model)
    features = model.forward_features(x)
    assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
    assert torch.equal(model.forward_head(features), model(x))
    assert model(x).shape == (2, model.num_classes) and model.get_classifier().out_features == model.num_classes
    groups = timm.optim.create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5).param_groups
    assert len(groups) > 2 and sum(len(g["params"]) for g in groups) == len(list(model.parameters()))

    model.train()
    torch.manual_seed(0)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    assert all(rel_err(g, p.grad) <= 1e-5 for g, p in zip(grads, model.parameters()) if g.abs().max() > 0)

    model.eval().reset_classifier(5)
    assert model(x).shape == (2, 5) and model.init_args["num_classes"] == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_three_routes_to_the_deploy_form(name, kwargs):
    """convert_to_deploy, timm's reparameterize_model and create_model(deploy=True): same keys and shapes;
    the two conversions give the train form's outputs."""
    train = build(name, kwargs)
    converted = repmlp.convert_to_deploy(train)
    walked = timm.utils.reparameterize_model(train)
    built = timm.create_model(name, deploy=True, **kwargs)
    shapes = [{k: v.shape for k, v in m.state_dict().items()} for m in (converted, walked, built)]
    assert shapes[0] == shapes[1] == shapes[2]
    assert all(repmlp.is_deploy_form(m) and m.deploy for m in (converted, walked, built))
    assert not repmlp.is_deploy_form(train) and not train.deploy
    x = inputs(train)
    assert rel_err(converted(x), walked(x)) <= 1e-6
    report = repmlp.verify_equivalence(train, converted, inputs=x)
    assert report.passed and report.max_rel_err <= 1e-5, str(report)


@pytest.mark.parametrize("name,kwargs", CASES)
def test_float64_check_measures_the_conversion(name, kwargs):
    train = build(name, kwargs)
    report = repmlp.verify_conversion(train, batch_size=1)
    assert report.dtype == "float64" and report.max_rel_err <= 1e-10, str(report)
    assert next(train.parameters()).dtype == torch.float32  # never cast in place
    # a float32 pair run in float64 is judged at float32's tolerance (its weights are float32)
    assert repmlp.verify_equivalence(train, repmlp.convert_to_deploy(train), dtype=torch.float64).passed


def _write(model: torch.nn.Module, origin: str, path) -> str:
    if origin == "ours":
        path = path.with_suffix(".safetensors")
        repmlp.save_checkpoint(model, path)
    else:  # a plain torch.save of a state dict, as users and other trainers write
        path = path.with_suffix(".pth")
        torch.save(model.state_dict(), path)
    return str(path)


def _load(route: str, name: str, kwargs: dict, deploy: bool, path: str) -> torch.nn.Module:
    if route == "load_checkpoint":
        return repmlp.load_checkpoint(timm.create_model(name, deploy=deploy, **kwargs), path)
    return timm.create_model(name, deploy=deploy, pretrained=True, pretrained_cfg_overlay=dict(file=path), **kwargs)


@pytest.mark.parametrize("name,kwargs", DESIGN_CASES)
def test_load_routes(tmp_path, name, kwargs):
    """Every (model form) x (file form) x (file origin: ours, a plain torch.save of a state dict), through
    load_checkpoint and create_model(pretrained=True): a train-form file loads into either form (converted for
    a deploy-form model); a deploy-form file loads into a deploy-form model and is refused by a train-form one."""
    train = build(name, kwargs, seed=3)
    x = inputs(train)
    expected = train(x)
    forms = dict(train=train, deploy=repmlp.convert_to_deploy(train))
    for (file_form, saved), origin in itertools.product(forms.items(), ("ours", "torch_save")):
        path = _write(saved, origin, tmp_path / f"{file_form}_{origin}")
        for deploy, route in itertools.product((False, True), ("load_checkpoint", "create_model")):
            if file_form == "deploy" and not deploy:
                with pytest.raises(ValueError, match="deploy-form .* cannot be recovered"):
                    _load(route, name, kwargs, deploy, path)
                continue
            model = _load(route, name, kwargs, deploy, path).eval()
            assert repmlp.is_deploy_form(model) == deploy
            assert rel_err(expected, model(x)) <= 1e-5, (file_form, origin, deploy, route)


# the authors' checkpoints: their key layouts (tests/fixtures/official/keys_*.txt) with random values
AUTHORS = [
    ("repmlp_res50_light_g4_224", "RepMLP-Res50-light-224", "stage0.0.conv.weight"),
    ("repmlp_res50_bottleneck_224", "RepMLP-Res50-bottleneck-224", "stage0.0.conv.weight"),
    ("repmlpnet_t224", "RepMLPNet-T224", "conv_embedding.conv.weight"),
]


@pytest.mark.slow
@pytest.mark.parametrize("name,keys,stem", AUTHORS)
def test_the_authors_checkpoints(tmp_path, name, keys, stem):
    """Their train form loads into both of our forms (the deploy form converted from it); their inference form
    loads into our deploy form and is refused by our train form."""
    for form in ("train", "deploy"):
        state = official_state_dict(f"keys_{keys}_{form}.txt")
        path = tmp_path / f"{form}.pth"
        torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, path)  # as their DDP training saves
        overlay = dict(file=str(path))
        deploy = timm.create_model(name, pretrained=True, deploy=True, pretrained_cfg_overlay=overlay).eval()
        classifier = state[next(k for k in state if k.endswith(("linear.weight", "head.weight")))]
        assert torch.equal(deploy.get_classifier().weight, classifier)
        if form == "deploy":
            with pytest.raises(ValueError, match="deploy-form"):
                timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay)
            continue
        train = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        assert torch.equal(train.stem.conv.weight, state[stem])
        assert repmlp.verify_equivalence(train, deploy, batch_size=1).passed


FINE_TUNE = CASES + [
    pytest.param("repmlp_fmnist_mlp", dict(deploy=True), id="repmlp_fmnist_mlp-deploy"),
    pytest.param("repmlpnet_t224", dict(small("repmlpnet_t224"), deploy=True), id="repmlpnet-deploy"),
]


@pytest.mark.parametrize("name,kwargs", FINE_TUNE)
def test_fine_tuning_loads(tmp_path, caplog, name, kwargs):
    """Another num_classes (0 included) keeps the model's fresh classifier and says so; another in_chans adapts
    the first conv; everything else is loaded (a train-form file, so deploy-form models also convert)."""
    kwargs = dict(kwargs)
    deploy = kwargs.pop("deploy", False)
    train = build(name, kwargs, seed=4)
    path = _write(train, "ours", tmp_path / "weights")
    overlay = dict(file=path)
    reference = repmlp.convert_to_deploy(train) if deploy else train
    x = inputs(train)
    for num_classes in (train.num_classes + 3, 0):
        with caplog.at_level("WARNING", logger="repmlp"):
            model = timm.create_model(
                name, pretrained=True, deploy=deploy, pretrained_cfg_overlay=overlay, num_classes=num_classes, **kwargs
            ).eval()
        assert "classifier" in caplog.text and "skipped" in caplog.text
        assert model(x).shape == (2, num_classes or model.head_hidden_size)
        assert (
            rel_err(
                reference.forward_head(reference.forward_features(x), pre_logits=True),
                model.forward_head(model.forward_features(x), pre_logits=True),
            )
            <= 1e-5
        )
    chans = x.shape[1] + 2
    model = timm.create_model(
        name, pretrained=True, deploy=deploy, pretrained_cfg_overlay=overlay, in_chans=chans, **kwargs
    ).eval()
    assert model.stem.conv.weight.shape[1] == chans
    if x.shape[1] == 1:  # one channel spread evenly over the new ones: the same function on repeated input
        assert rel_err(reference(x), model(x.repeat(1, chans, 1, 1))) <= 1e-5


def test_wrong_files_are_clear_errors(tmp_path):
    train = build("repmlp_fmnist_mlp", {})
    other = timm.create_model("repmlp_cifar_mlp")
    path = _write(train, "ours", tmp_path / "fmnist")
    with pytest.raises(ValueError, match="does not match the model: missing keys"):
        repmlp.load_checkpoint(other, path)
    with pytest.raises(ValueError, match="pretrained_cfg_overlay"):
        timm.create_model("repmlp_res50_light_224", pretrained=True)
