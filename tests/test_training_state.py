"""A training state is checked before anything is loaded from it: its JSON (depth, tensor references, arrays), its
fields' types and ranges (one schema), and its agreement with the run that resumes it. Each refusal names the field
and both values; what resuming allows (more epochs, another seed, another process count at an epoch boundary) is
stated and recorded in the run's config.json."""

import json
import shutil

import pytest
import safetensors.torch
import timm
import torch
from conftest import TINY_RUN, train_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from timm.optim import create_optimizer_v2

from repmlp.training import load_config
from repmlp.training.schema import check_model_state, check_optimizer_state, check_resumable, check_schema
from repmlp.training.state import _FORMAT, STATE_FILE, read_state, write_state

CFG = load_config(None, TINY_RUN)
RUN = dict(num_classes=4, num_epochs=1, epoch_steps=4, world_size=1)  # the tiny run's


@pytest.fixture(scope="module")
def state(tiny_run):
    """The tiny run's training state, read once (copy before changing: ``_changed``)."""
    return read_state(tiny_run / STATE_FILE)


def _changed(state, **fields):
    return {**state, **fields}


def _raw(path, tree: str, tensors=None):
    safetensors.torch.save_file(tensors or {}, str(path), metadata={"format": _FORMAT, "state": tree})
    return path


MALFORMED = {
    "not JSON": ("{'epoch': 1", "a malformed training state"),
    "100k-deep JSON": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "70-deep JSON": ("[" * 70 + "]" * 70, "nested deeper than 64"),
    "reference to no tensor": ('{"model": {"w": {"__tensor__": "7"}}}', "state.model.w: refers to tensor '7'"),
    "array of 10^12": ('{"rng": {"__ndarray__": ["uint32", [1000000, 1000000], [1, 2]]}}', "does not hold its 2"),
    "4 GB void dtype": ('{"rng": {"__ndarray__": ["V4000000000", [1], [1]]}}', "array dtype 'V4000000000'"),
    "void dtype": ('{"rng": {"__ndarray__": ["V8", [1], [1]]}}', "not a plain number type"),
    "unknown dtype": ('{"rng": {"__ndarray__": ["float512", [1], [1]]}}', "unknown array dtype"),
    "bad items": ('{"x": {"__items__": [[1]]}}', "malformed __items__"),
}


@pytest.mark.parametrize("case", MALFORMED, ids=str)
def test_a_malformed_state_is_refused_naming_the_file(case, tmp_path):
    tree, message = MALFORMED[case]
    path = _raw(tmp_path / "s.safetensors", tree)
    with pytest.raises(ValueError, match="cannot resume from .*s.safetensors") as info:
        read_state(path)
    assert message in str(info.value)


SCHEMA = {  # field -> (bad value, expected fragment)
    "epoch": (-3, "its epoch must be an integer >= 0, got -3"),
    "step_in_epoch": (1.5, "its step_in_epoch must be an integer >= 0, got 1.5"),
    "num_updates": (True, "num_updates must be an integer >= 0, got True"),
    "model": (None, "its model must be a mapping of parameter names to tensors, got None"),
    "optimizer": ({"state": {}}, "its optimizer must be an optimizer state"),
    "rng": ([], "its rng must be the RNG states"),
    "scheduler": ([1], "its scheduler must be null or a mapping"),
    "elapsed": (-1.0, "elapsed must be a number of seconds >= 0"),
    "num_classes": (0, "num_classes must be an integer >= 1"),
}


@pytest.mark.parametrize("field", SCHEMA, ids=str)
def test_a_state_outside_the_schema_is_refused_naming_the_field(field, state):
    value, message = SCHEMA[field]
    with pytest.raises(ValueError, match="cannot resume from s.safetensors") as info:
        check_schema(_changed(state, **{field: value}), "s.safetensors")
    assert message in str(info.value)
    check_schema(state, "s.safetensors")  # the real one passes


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(epoch=st.integers(-5, 5), step=st.integers(-2, 10**6))
def test_epoch_and_step_are_taken_only_within_the_runs_schedule(state, epoch, step):
    changed = _changed(state, epoch=epoch, step_in_epoch=step)
    valid = 0 <= epoch <= RUN["num_epochs"] and (step == 0 or (0 < step < RUN["epoch_steps"] and epoch < 1))
    try:
        check_schema(changed, "s")
        check_resumable(changed, "s", CFG, **RUN)
    except ValueError as err:
        assert not valid, err
        assert str(epoch) in str(err) or str(step) in str(err)
    else:
        assert valid


REFUSED = {  # a change of the resuming run -> the expected fragments (the setting and both values)
    "model.name": ("model.name=repmlp_cifar_mlp", ("model.name is 'repmlp_fmnist_mlp'", "'repmlp_cifar_mlp'")),
    "model.kwargs": ("model.kwargs={widths: [4, 16]}", ("model.kwargs is {", "'widths': [4, 16]")),
    "optimizer.opt": ("optimizer.opt=adamw", ("optimizer.opt is 'sgd'", "'adamw' in this run")),
}


@pytest.mark.parametrize("setting", REFUSED, ids=str)
def test_another_model_or_optimizer_is_refused_naming_both_values(setting, state):
    override, fragments = REFUSED[setting]
    with pytest.raises(ValueError, match=f"cannot resume from s: {setting}") as info:
        check_resumable(state, "s", load_config(None, [*TINY_RUN, override]), **RUN)
    assert all(f in str(info.value) for f in fragments), info.value


def test_another_class_count_or_process_count_mid_epoch_is_refused(state):
    with pytest.raises(ValueError, match="has 4 classes but this run's data has 12"):
        check_resumable(state, "s", CFG, **{**RUN, "num_classes": 12})
    mid_epoch = _changed(state, epoch=0, step_in_epoch=2, rng=[state["rng"]] * 2, world_size=2)
    with pytest.raises(ValueError, match="step 2 of epoch 0 of a 2-process run"):
        check_resumable(mid_epoch, "s", CFG, **RUN)
    at_boundary = _changed(mid_epoch, step_in_epoch=0)
    assert check_resumable(at_boundary, "s", CFG, **RUN) == {"processes": [2, 1]}  # allowed, stated


def test_states_of_earlier_versions_are_checked_by_their_tensors(state):
    """States without a config record (today's) are matched by parameter shapes and optimizer settings."""
    other = timm.create_model("repmlp_fmnist_mlp", widths=[4, 8], head_hidden_size=16, num_classes=12)
    with pytest.raises(ValueError, match=r"head.fc.weight has shape \(4, 16\) in the training state but \(12, 16\)"):
        check_model_state(state["model"], other, "s")
    with pytest.raises(ValueError, match="another model"):
        check_model_state({"x": torch.zeros(1)}, other, "s")
    same = timm.create_model("repmlp_fmnist_mlp", widths=[4, 8], head_hidden_size=16, num_classes=4)
    check_model_state(state["model"], same, "s")
    o = CFG["optimizer"]
    sgd, adamw = (
        create_optimizer_v2(same, opt, weight_decay=o["weight_decay"], filter_bias_and_bn=o["filter_bias_and_bn"])
        for opt in ("sgd", "adamw")
    )
    check_optimizer_state(state["optimizer"], sgd, "s")
    with pytest.raises(
        ValueError, match=r"has no \['amsgrad', 'betas'.* this run's AdamW has .*another optimizer.opt"
    ):  # was KeyError: 'step'
        check_optimizer_state(state["optimizer"], adamw, "s")


def test_resume_into_a_fresh_directory_with_another_seed_states_and_records_it(tmp_path, tiny_run, capsys):
    """Another run's finished state resumed elsewhere (no epochs left: only the export runs): the new directory gets
    its config.json and manifest, the changed seed is stated and recorded, the unchanged ones are not."""
    train_tiny(tmp_path / "fresh", "train.seed=7", resume=str(tiny_run / STATE_FILE))
    out = capsys.readouterr().out
    assert "note: resumed with changed settings (train.seed 0 -> 7)" in out
    cfg = json.loads((tmp_path / "fresh" / "config.json").read_text())
    assert cfg["train"]["seed"] == 7 and cfg["resumed"][0]["changes"] == {"train.seed": [0, 7]}
    assert cfg["resumed"][0]["from"] == str(tiny_run / STATE_FILE)
    assert load_config(tmp_path / "fresh" / "config.json")["train"]["seed"] == 7  # still a config to read
    assert (tmp_path / "fresh" / "run_files.json").is_file()


def test_a_state_file_from_write_state_round_trips_its_arrays(tmp_path):
    import numpy as np

    write_state(tmp_path / "s.safetensors", {"a": np.arange(6, dtype=np.int64).reshape(2, 3)})
    assert read_state(tmp_path / "s.safetensors")["a"].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.kwargs={widths: [4, 16], head_hidden_size: 16}", "model.kwargs is {"),  # was torch's size mismatch
        ("optimizer.opt=adamw", "optimizer.opt is 'sgd' in the training state but 'adamw'"),  # was KeyError: 'step'
    ],
    ids=["other model kwargs", "sgd -> adamw"],
)
def test_train_py_refuses_a_resume_that_does_not_fit_and_changes_nothing(override, message, tmp_path, tiny_run, capsys):
    from conftest import load_tool

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    argv = [a for item in TINY_RUN for a in ("--set", item)] + ["--set", override, "--output", str(out), "--resume"]
    assert load_tool("train").main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot resume from") and message in err and "Traceback" not in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
