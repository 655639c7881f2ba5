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


def test_one_comparison_of_two_predictors_serves_verifier_int8_checks_and_training():
    """compare_predictors is ErrorStats of the concatenated outputs; the int8 check and training's final check
    report its numbers, not a second definition (the dataset-wide max relative error, not a max of per-batch ones)."""
    from repmlp.int8 import compare_outputs
    from repmlp.training import compare_forms
    from repmlp.verify import compare_predictors

    gen = torch.Generator().manual_seed(0)
    reference = torch.nn.Linear(6, 4).double()
    candidate = copy.deepcopy(reference)
    with torch.no_grad():
        candidate.bias.add_(1e-3)  # the same absolute error on every input: relatively largest on small inputs
    batches = [torch.randn(n, 6, generator=gen, dtype=torch.float64) * s for n, s in ((3, 1.0), (5, 10.0), (2, 0.1))]
    labels = [torch.randint(0, 4, (x.shape[0],), generator=gen) for x in batches]
    with torch.no_grad():
        ref, cand = torch.cat([reference(x) for x in batches]), torch.cat([candidate(x) for x in batches])
    whole = repmlp.verify.ErrorStats.of(ref, cand)
    per_batch = max(repmlp.verify.ErrorStats.of(reference(x), candidate(x)).max_rel_err for x in batches)
    assert whole.max_rel_err != per_batch  # the two definitions differ on these batches

    check = compare_predictors(reference, candidate, zip(batches, labels))
    assert (check.max_abs_err, check.max_rel_err, check.count) == (whole.max_abs_err, whole.max_rel_err, 10)
    assert abs(check.mean_abs_err - whole.mean_abs_err) <= 1e-15
    assert check.argmax_agreement == (ref.argmax(1) == cand.argmax(1)).double().mean().item()
    assert check.reference_top1 == 100 * (ref.argmax(1) == torch.cat(labels)).double().mean().item()

    int8 = compare_outputs(reference, candidate, batches, "random")
    assert (int8.max_rel_err, int8.argmax_agreement, int8.count) == (check.max_rel_err, check.argmax_agreement, 10)
    final = compare_forms(reference, candidate, list(zip(batches, labels)), torch.device("cpu"))
    assert (final["max_rel_err"], final["max_abs_err"], final["train_top1"], final["deploy_top1"]) == (
        check.max_rel_err,
        check.max_abs_err,
        check.reference_top1,
        check.candidate_top1,
    )
    single = repmlp.verify_equivalence(reference, candidate, inputs=batches[1])
    assert single.max_rel_err == repmlp.verify.ErrorStats.of(reference(batches[1]), candidate(batches[1])).max_rel_err
