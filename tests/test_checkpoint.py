"""Weights on disk: safetensors with metadata, atomic writes, strict loads, clear errors."""

import os

import pytest
import torch

import repmlp
from repmlp.checkpoint import read_metadata, read_state_dict
from repmlp.verify import randomize_bn_stats


def _block(deploy=False):
    torch.manual_seed(0)
    return randomize_bn_stats(repmlp.RepMLP(8, 8, 12, 10, 6, 5, (1, 3), 2, 4, deploy=deploy)).eval()


def test_round_trip_records_name_and_form(tmp_path):
    block = _block()
    path = tmp_path / "block.safetensors"
    repmlp.save_checkpoint(block, path, model_name="my_block")
    assert read_metadata(path) == {"model": "my_block", "form": "train", "format": "pt"}
    other = repmlp.RepMLP(8, 8, 12, 10, 6, 5, (1, 3), 2, 4)
    repmlp.load_checkpoint(other, path)
    assert all(torch.equal(a, b) for a, b in zip(block.state_dict().values(), other.state_dict().values()))
    deploy_path = tmp_path / "deploy.safetensors"
    repmlp.save_checkpoint(repmlp.convert_to_deploy(block), deploy_path)
    assert read_metadata(deploy_path)["form"] == "deploy"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_train_checkpoint_into_deploy_block_is_converted(tmp_path):
    block = _block()
    path = tmp_path / "block.safetensors"
    repmlp.save_checkpoint(block, path)
    deploy = repmlp.load_checkpoint(_block(deploy=True), path, train_model_factory=_block).eval()
    x = torch.randn(2, 8, 12, 10)
    assert ((block(x) - deploy(x)).abs().max() / block(x).abs().max()).item() <= 1e-5


def test_deploy_checkpoint_into_train_block_is_explained(tmp_path):
    path = tmp_path / "deploy.safetensors"
    repmlp.save_checkpoint(repmlp.convert_to_deploy(_block()), path)
    with pytest.raises(ValueError, match="deploy-form .* deploy=True"):
        repmlp.load_checkpoint(_block(), path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    state = _block().state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["partition_perceptron.fc3.weight"]
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(
        ValueError,
        match=r"missing keys \[partition_perceptron.fc3.weight\].*unexpected keys "
        r"\[extra.weight\]",
    ):
        repmlp.load_checkpoint(_block(), path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_file_names_the_file(tmp_path, suffix):
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(_block().state_dict(), path)
    else:
        repmlp.save_checkpoint(_block(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"cannot read weights file .*weights{suffix}"):
        read_state_dict(path)


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        read_state_dict("nope.safetensors")


def test_pth_is_read_with_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="cannot read weights file"):
        read_state_dict(path)


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    repmlp.save_checkpoint(_block(), path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        repmlp.save_checkpoint(_block(), path)
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_wrong_values_are_refused_before_loading(tmp_path, caplog):
    """Integer tensors for float parameters and NaN/Inf are errors naming the tensors; fp16 loads with a note."""
    state = _block().state_dict()
    cases = {
        "int64": (
            {**state, "partition_perceptron.fc3.weight": state["partition_perceptron.fc3.weight"].long()},
            "integer tensors .*partition_perceptron.fc3.weight",
        ),
        "nan": (
            {**state, "partition_perceptron.fc3.weight": state["partition_perceptron.fc3.weight"] * float("nan")},
            "NaN or Inf values in .*partition_perceptron.fc3.weight",
        ),
    }
    for label, (bad, match) in cases.items():
        path = tmp_path / f"{label}.pth"
        torch.save(bad, path)
        before = path.read_bytes()
        with pytest.raises(ValueError, match=match):
            repmlp.load_checkpoint(_block(), path)
        assert path.read_bytes() == before
    repmlp.load_checkpoint(_block(), tmp_path / "nan.pth", allow_nonfinite=True)  # the debugging opt-out
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "fp16.pth")
    with caplog.at_level("WARNING", logger="repmlp"):
        repmlp.load_checkpoint(_block(), tmp_path / "fp16.pth")
    assert "lower precision" in caplog.text
