"""One preset of each design (conftest.DESIGNS), small: the timm model API, the three routes to the deploy form,
fine-tuning loads, and every way of loading weights (model form x file form x file origin)."""

import pytest
import timm
import timm.optim
import torch
from conftest import CASES, DESIGNS, REGISTERED, create, design, inputs, rel_err

import repmlp


def test_one_case_per_design():
    """Presets that differ only in numbers share a design; every other difference is a design of its own."""
    assert {design(n) for n in REGISTERED} == {design(n) for n in DESIGNS} and len(DESIGNS) == 6
    assert [c.id for c in CASES] == [
        "repmlp_cifar_mlp",
        "repmlp_cifar_wideconv",
        "repmlp_fmnist_mlp",
        "repmlp_res50_bottleneck_224",
        "repmlp_res50_light_224",
        "repmlpnet_b224",
        "repmlp_cifar_mlp-widths",
    ]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_model_api(name, kwargs):
    model = create(name, **kwargs)
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
    the two conversions give the train form's outputs; converting a copy writes nothing into the train form (the
    copy shares its tensors while it converts)."""
    train = create(name, **kwargs)
    before = {k: v.clone() for k, v in train.state_dict().items()}
    converted = repmlp.convert_to_deploy(train)
    assert all(torch.equal(before[k], v) for k, v in train.state_dict().items())
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
    train = create(name, **kwargs)
    report = repmlp.verify_conversion(train, batch_size=1)
    assert report.dtype == "float64" and report.max_rel_err <= 1e-10, str(report)
    assert next(train.parameters()).dtype == torch.float32  # never cast in place
    # a float32 pair run in float64 is judged at float32's tolerance (its weights are float32)
    assert repmlp.verify_equivalence(train, repmlp.convert_to_deploy(train), dtype=torch.float64).passed
