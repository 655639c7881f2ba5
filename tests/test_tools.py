"""Command-line tools run end to end (their ``main(argv)`` in this process; tools/train.py as a process:
tests/test_train.py, tests/test_distributed.py)."""

import json

import pytest
import torch
from conftest import load_tool

import repmlp
from repmlp.checkpoint import read_metadata


def _convert_deploy(capsys, *args) -> tuple[int, str, str]:
    """tools/convert_deploy.py's exit code, standard output and standard error."""
    capsys.readouterr()
    code = load_tool("convert_deploy").main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_convert_deploy_from_a_train_checkpoint(tmp_path, capsys):
    import timm

    from repmlp.verify import randomize_bn_stats

    model = randomize_bn_stats(timm.create_model("repmlp_fmnist_mlp"), seed=5)
    weights, out = tmp_path / "train.safetensors", tmp_path / "deploy.safetensors"
    repmlp.save_checkpoint(model, weights)
    code, stdout, stderr = _convert_deploy(capsys, "--weights", str(weights), "--output", str(out), "--batch-size", "3")
    assert code == 0, stderr
    assert "PASS (float32)" in stdout and "PASS (float64)" in stdout
    assert "params" in stdout and "MACs" in stdout
    meta = read_metadata(out)
    assert json.loads(meta.pop("model_kwargs"))["widths"] == [24, 48]  # the constructor arguments, recorded
    inputs = {key: meta.pop(key) for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")}
    assert json.loads(inputs["input_size"]) == [1, 28, 28] and len(json.loads(meta.pop("label_names"))) == 10
    assert meta == {
        "model": "repmlp_fmnist_mlp",
        "form": "deploy",
        "format": "pt",
        "num_classes": "10",
        "source": f"weights {weights}",
        "dtype": "fp32",
    }
    deploy = timm.create_model(
        "repmlp_fmnist_mlp", deploy=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(out))
    )
    assert repmlp.verify_equivalence(model.eval(), deploy.eval(), batch_size=4).passed


def test_convert_deploy_default_is_the_shipped_model(tmp_path, capsys):
    code, stdout, stderr = _convert_deploy(
        capsys, "--output", str(tmp_path / "d.safetensors"), "--no-float64", "--ranges"
    )
    assert code == 0, stderr
    assert "registered weights repmlp_fmnist_mlp.fmnist" in stdout and "PASS (float32)" in stdout
    # the range report: one row per deploy-form weight matrix, the FC3s among them
    rows = [line for line in stdout.splitlines() if line.startswith(("stem.", "stages.", "head."))]
    assert len(rows) == 15 and sum("partition_perceptron.fc3" in row for row in rows) == 4 and "SQNR" in stdout


def test_convert_deploy_bad_arguments(tmp_path, capsys):
    tool = load_tool("convert_deploy")
    assert tool.main(["--model", "repmlp_fmnist_mlp", "--weights", "missing.pth"]) == 2
    assert "missing.pth" in capsys.readouterr().err
    truncated = tmp_path / "t.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    assert tool.main(["--model", "repmlp_fmnist_mlp", "--weights", str(truncated)]) == 2
    assert f"cannot read weights file {truncated}" in capsys.readouterr().err
    authors = tmp_path / "authors.pth"
    torch.save({"w": torch.zeros(1)}, authors)
    assert tool.main(["--weights", str(authors)]) == 2
    assert "does not record its model" in capsys.readouterr().err


def test_tools_rebuild_the_model_from_a_runs_files_alone(tiny_run, tmp_path, capsys):
    """--weights FILE alone, train or deploy form: model, classes, arguments, form and dataset come from the file."""
    import json

    pytest.importorskip("onnxruntime")
    evaluate, convert, export = load_tool("eval"), load_tool("convert_deploy"), load_tool("export_onnx")
    expected = json.loads((tiny_run / "final.json").read_text())["equivalence"]
    converted = tmp_path / "converted.safetensors"
    assert convert.main(["--weights", str(tiny_run / "model_train.safetensors"), "--output", str(converted)]) == 0
    files = [
        ("train", tiny_run / "model_train.safetensors"),
        ("deploy", tiny_run / "model_deploy.safetensors"),
        ("deploy", converted),
    ]
    for form, path in files:
        capsys.readouterr()
        assert evaluate.main(["--checkpoint", str(path), "--no-progress"]) == 0
        metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert (metrics["form"], metrics["dataset"], metrics["count"]) == (form, "synthetic", 32)
        assert metrics["top1"] == pytest.approx(expected[f"{form}_top1"])
        onnx_file = tmp_path / f"{path.stem}.onnx"
        assert export.main(["--weights", str(path), "--output", str(onnx_file)]) == 0
        assert onnx_file.stat().st_size > 0
    # a bf16 deploy form (converted in float64, cast once), evaluated in the dtype its file records
    bf16 = tmp_path / "bf16.safetensors"
    args = ["--weights", str(tiny_run / "model_train.safetensors"), "--dtype", "bf16", "--output", str(bf16)]
    assert convert.main(args) == 0 and "PASS (bfloat16 against float32)" in capsys.readouterr().out
    assert evaluate.main(["--checkpoint", str(bf16), "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert (metrics["form"], metrics["count"]) == ("deploy, bf16", 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(  # no temporary file left behind
        ["converted.safetensors", "converted.onnx", "model_train.onnx", "model_deploy.onnx", "bf16.safetensors"]
    )
