"""Nothing false: a NaN or an infinity never passes a tolerance. The verifier, the int8 / ONNX / training checks that
share its comparison, and the converter (which refuses weights that are not numbers or not a variance), each saying
where."""

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_verify import _pair  # a RepMLP block and its deploy form

import repmlp
from repmlp.verify import ErrorStats, compare_predictors, randomize_bn_stats

NONFINITE = (float("nan"), float("inf"), float("-inf"))


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    values=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=12),
    where=st.integers(0, 11),
    bad=st.sampled_from(NONFINITE),
    role=st.sampled_from(["reference", "candidate", "both"]),
)
def test_a_nonfinite_value_on_either_side_is_never_within_a_tolerance(values, where, bad, role):
    reference = torch.tensor(values, dtype=torch.float64)
    assert ErrorStats.of(reference, reference.clone()).within(0.0)  # equal and finite: passes even at 0
    where %= len(values)
    candidate = reference.clone()
    if role != "candidate":
        reference[where] = bad
    if role != "reference":
        candidate[where] = bad
    stats = ErrorStats.of(reference, candidate)
    assert not stats.within(math.inf) and not stats.finite and not stats.max_rel_err <= 1e300
    sides = ["reference", "candidate"] if role == "both" else [role]
    assert list(stats.nonfinite) == sides and all(stats.first_nonfinite[s] == (where,) for s in sides)
    assert f"the first at [{where}]" in stats.describe_nonfinite()


def test_compare_predictors_says_which_input_gave_the_first_nonfinite_output():
    """The case of the issue: max(0.0, nan) is 0.0, so a running max alone reported 'max abs err 0'."""
    reference = torch.nn.Identity()

    def candidate(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[y[:, 0] > 100, 1] = float("nan")
        return y

    batches = [torch.zeros(3, 4), torch.tensor([[0.0] * 4, [200.0] + [0.0] * 3])]
    check = compare_predictors(reference, candidate, batches)
    assert math.isnan(check.max_abs_err) and math.isnan(check.max_rel_err) and not check.finite
    assert check.nonfinite == {"candidate": 1} and check.first_nonfinite["candidate"] == (4, 1)  # 2nd batch, row 1


def test_verify_equivalence_fails_nonfinite_outputs_and_names_the_block():
    train, deploy = _pair()
    with torch.no_grad():
        deploy.partition_perceptron.fc3.bias[3] = float("nan")
    model_t, model_d = (torch.nn.Sequential(m, torch.nn.Flatten()) for m in (train, deploy))
    report = repmlp.verify_equivalence(model_t, model_d, input_size=(8, 12, 12), per_block=True)
    text = str(report)
    assert not report.passed and "FAIL" in text and "mean abs err nan" in text
    assert report.nonfinite == {"candidate": 2 * 4}  # one FC3 output in each of 4 partitions, 2 inputs
    assert report.first_nonfinite_block() == "0" and "first block with a non-finite output: 0 (candidate" in text
    assert not repmlp.verify_equivalence(model_d, model_d, input_size=(8, 12, 12)).passed  # equal NaNs fail too


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: m.global_perceptron.fc1.weight.view(-1).__setitem__(0, float("nan")), "global_perceptron.fc1.w"),
        (
            lambda m: m.partition_perceptron.bn.running_var.__setitem__(1, -0.5),
            "partition_perceptron.bn.running_var (BatchNorm1d) has 1 negative",
        ),
        (
            lambda m: m.local_perceptron.branches[1].bn.running_mean.__setitem__(0, float("inf")),
            "local_perceptron.branches.1.bn.running_mean (BatchNorm2d statistic)",
        ),
    ],
    ids=["nan weight", "negative variance", "inf mean"],
)
def test_the_converter_refuses_weights_that_are_not_numbers_or_not_a_variance(damage, message):
    train, _ = _pair()
    broken = copy.deepcopy(train)
    with torch.no_grad():
        damage(broken)
    before = {k: v.clone() for k, v in broken.state_dict().items()}
    for inplace in (False, True):
        with pytest.raises(ValueError, match="cannot convert: .*") as info:
            repmlp.convert_to_deploy(broken, inplace=inplace)
        assert message in str(info.value)
    after = broken.state_dict()
    assert all(torch.equal(before[k], after[k]) or before[k].isnan().any() for k in before)
    assert not repmlp.is_deploy_form(broken)


def test_convert_deploy_refuses_a_negative_variance_and_writes_nothing(tmp_path, capsys):
    import timm
    from conftest import load_tool

    model = randomize_bn_stats(timm.create_model("repmlp_fmnist_mlp", widths=[4, 8], head_hidden_size=16))
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.running_var[0] = -1.0
    repmlp.save_checkpoint(model, tmp_path / "w.safetensors", "repmlp_fmnist_mlp", "train")
    argv = ["--model", "repmlp_fmnist_mlp", "--model-kwargs", '{"widths": [4, 8], "head_hidden_size": 16}']
    argv += ["--weights", str(tmp_path / "w.safetensors"), "--output", str(tmp_path / "d.safetensors")]
    assert load_tool("convert_deploy").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot convert:") and "negative values" in err and "Traceback" not in err
    assert not (tmp_path / "d.safetensors").exists()


def test_training_final_check_never_passes_a_nan_model(tmp_path):
    from conftest import TINY_RUN

    from repmlp.data import build_dataset
    from repmlp.training import load_config
    from repmlp.training.builders import build_model
    from repmlp.training.loop import export

    cfg = load_config(None, TINY_RUN)
    from torchvision.transforms import ToTensor

    val = build_dataset("synthetic", "val", None, ToTensor(), num_samples=8, in_chans=1, img_size=28)
    model = build_model(cfg, 10, deploy=False)
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    summary = export(model, cfg, val, 10, tmp_path)
    assert summary["equivalence"]["passed"] is False and "NaN or infinite" in summary["equivalence"]["error"]
    assert summary["files"] == {} and list(tmp_path.iterdir()) == []

    model = build_model(cfg, 10, deploy=False)
    with torch.no_grad():  # finite weights, outputs that overflow float32
        for p in model.parameters():
            p.mul_(1e15)
    summary = export(model, cfg, val, 10, tmp_path)
    assert summary["equivalence"]["passed"] is False and "nonfinite" in summary["equivalence"]
    assert summary["files"] == {} and list(tmp_path.iterdir()) == []
    json.dumps(summary, allow_nan=False)  # final.json stays strict JSON: no NaN token


def test_a_training_state_with_nan_weights_is_refused_before_training(tmp_path, tiny_run):
    """The case of the issue: such a resume trained, exported 108 of 128 tensors NaN and reported passed."""
    from conftest import train_tiny

    from repmlp.training.state import STATE_FILE, read_state, write_state

    state = read_state(tiny_run / STATE_FILE)
    name = next(k for k, v in state["model"].items() if v.is_floating_point())
    state["model"][name] = torch.full_like(state["model"][name], float("nan"))
    write_state(tmp_path / "nan.safetensors", state)
    with pytest.raises(ValueError, match=f"{name} holds NaN or infinite values"):
        train_tiny(tmp_path / "run", "train.epochs=2", resume=str(tmp_path / "nan.safetensors"))
    assert not (tmp_path / "run").exists()


def test_the_onnx_check_fails_nonfinite_outputs(tmp_path):
    pytest.importorskip("onnxruntime")
    from repmlp.export import _export_float

    model = torch.nn.Linear(4, 3).eval()
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(RuntimeError, match=r"max rel err nan .*candidate: 2 non-finite values.*\(x.onnx not written\)"):
        _export_float(model, torch.randn(2, 4), str(tmp_path / "m.onnx"), 17, 1e-4, "x.onnx", eager_layout=True)
