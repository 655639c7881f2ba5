"""Command-line tools run end to end."""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import load_tool

import repmlp
from repmlp.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_convert_deploy_from_a_train_checkpoint(tmp_path):
    import timm

    from repmlp.verify import randomize_bn_stats

    model = randomize_bn_stats(timm.create_model("repmlp_fmnist_mlp"), seed=5)
    weights, out = tmp_path / "train.safetensors", tmp_path / "deploy.safetensors"
    repmlp.save_checkpoint(model, weights)
    res = _run(
        "tools/convert_deploy.py",
        "--model",
        "repmlp_fmnist_mlp",
        "--weights",
        str(weights),
        "--output",
        str(out),
        "--batch-size",
        "3",
    )
    assert res.returncode == 0, res.stderr
    assert "PASS (float32)" in res.stdout and "PASS (float64)" in res.stdout
    assert "params" in res.stdout and "MACs" in res.stdout
    assert read_metadata(out) == {
        "model": "repmlp_fmnist_mlp",
        "form": "deploy",
        "format": "pt",
        "source": f"weights {weights}",
    }
    deploy = timm.create_model(
        "repmlp_fmnist_mlp", deploy=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(out))
    )
    assert repmlp.verify_equivalence(model.eval(), deploy.eval(), batch_size=4).passed


def test_convert_deploy_default_is_the_shipped_model(tmp_path):
    res = _run("tools/convert_deploy.py", "--output", str(tmp_path / "d.safetensors"), "--no-float64", "--ranges")
    assert res.returncode == 0, res.stderr
    assert "shipped weights repmlp_fmnist_mlp.fmnist" in res.stdout and "PASS (float32)" in res.stdout
    # the range report: one row per deploy-form weight matrix, the FC3s among them
    rows = [line for line in res.stdout.splitlines() if line.startswith(("stem.", "stages.", "head."))]
    assert len(rows) == 15 and sum("partition_perceptron.fc3" in row for row in rows) == 4 and "SQNR" in res.stdout


def test_convert_deploy_bad_arguments(tmp_path, capsys):
    tool = load_tool("convert_deploy")
    assert tool.main(["--model", "repmlp_fmnist_mlp", "--weights", "missing.pth"]) == 2
    assert "missing.pth" in capsys.readouterr().err
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    assert tool.main(["--model", "repmlp_fmnist_mlp", "--weights", str(truncated)]) == 2
    assert f"cannot read weights file {truncated}" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--weights needs --model"):
        tool.main(["--weights", "x.pth"])
