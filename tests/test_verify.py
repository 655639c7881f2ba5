"""The verifier reports per-element errors and fails what is not equivalent."""

import copy

import torch

import repmlp
from repmlp.verify import randomize_bn_stats


def _pair():
    torch.manual_seed(0)
    block = randomize_bn_stats(repmlp.RepMLP(8, 16, 12, 12, 6, 6, (1, 3, 5), 1, 4)).eval()
    return block, repmlp.convert_to_deploy(block)


def test_equivalent_forms_pass_with_per_block_stats():
    train, deploy = _pair()
    model_t, model_d = torch.nn.Sequential(train, torch.nn.Flatten()), torch.nn.Sequential(deploy, torch.nn.Flatten())
    report = repmlp.verify_equivalence(model_t, model_d, input_size=(8, 12, 12), per_block=True)
    assert report.passed and report.dtype == "float32" and report.tolerance == 1e-5
    assert 0 < report.max_rel_err <= 1e-5 and report.max_abs_err >= report.mean_abs_err
    assert list(report.per_block) == ["0"]
    assert "PASS" in str(report)


def test_a_wrong_conversion_fails():
    train, deploy = _pair()
    broken = copy.deepcopy(deploy)
    with torch.no_grad():
        broken.partition_perceptron.fc3.bias[3] += 1e-3
    report = repmlp.verify_equivalence(train, broken, input_size=(8, 12, 12))
    assert not report.passed and report.max_rel_err > 1e-5 and "FAIL" in str(report)


def test_float64_run_and_inputs_given():
    train, _ = _pair()
    train64 = copy.deepcopy(train).double()
    x = torch.randn(3, 8, 12, 12)
    report = repmlp.verify_equivalence(train64, repmlp.convert_to_deploy(train64), inputs=x)
    assert report.dtype == "float64" and report.max_rel_err <= 1e-10 and report.passed


def test_models_are_left_in_their_modes():
    train, deploy = _pair()
    train.train()
    repmlp.verify_equivalence(train, deploy, input_size=(8, 12, 12))
    assert train.training and not deploy.training


def test_argmax_agreement_for_classifiers():
    torch.manual_seed(0)
    head = torch.nn.Linear(4, 3)
    report = repmlp.verify_equivalence(head, head, input_size=(4,), batch_size=16)
    assert report.argmax_agreement == 1.0 and report.max_abs_err == 0.0
