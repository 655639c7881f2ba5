"""Command-line tools run end to end."""
import subprocess
import sys
from pathlib import Path

import pytest

import repmlp
from repmlp.checkpoint import read_metadata

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_convert_deploy_from_a_train_checkpoint(tmp_path):
    import timm
    from repmlp.verify import randomize_bn_stats

    model = randomize_bn_stats(timm.create_model("repmlp_res50_bottleneck_224"), seed=5)
    weights, out = tmp_path / "train.safetensors", tmp_path / "deploy.safetensors"
    repmlp.save_checkpoint(model, weights)
    res = _run("tools/convert_deploy.py", "--model", "repmlp_res50_bottleneck_224", "--weights", str(weights),
               "--output", str(out), "--no-float64", "--batch-size", "1")
    assert res.returncode == 0, res.stderr
    assert "PASS (float32)" in res.stdout and "params" in res.stdout and "MACs" in res.stdout
    assert read_metadata(out) == {"model": "repmlp_res50_bottleneck_224", "form": "deploy", "format": "pt",
                                  "source": f"weights {weights}"}
    deploy = timm.create_model("repmlp_res50_bottleneck_224", deploy=True, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(out)))
    assert repmlp.verify_equivalence(model.eval(), deploy.eval(), batch_size=1).passed


@pytest.mark.parametrize("args,message", [
    (["--model", "repmlp_res50_light_224", "--weights", "missing.pth"], "missing.pth"),
    (["--weights", "x.pth"], "--weights needs --model"),
])
def test_convert_deploy_bad_arguments(args, message):
    res = _run("tools/convert_deploy.py", *args)
    assert res.returncode != 0 and message in res.stderr
