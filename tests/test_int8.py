"""Int8 deploy forms: onnxruntime's dynamic and static int8 and PyTorch's x86 int8 agree with float32, files are
written only once checked, calibration data specs, the weight range report, the int8 benchmark and tools."""

import json

import onnx
import pytest
import timm
import torch
from conftest import load_tool, rel_err
from test_benchmark import tiny_model

from benchmarks.speed_page import render_report
from repmlp import convert_to_deploy, randomize_bn_stats
from repmlp.export import export_onnx, tensor_ranks
from repmlp.int8 import (
    FixedBatch,
    compare_outputs,
    data_batches,
    format_ranges,
    quantize_pytorch,
    weight_ranges,
)


def _deploy(model=None):
    return convert_to_deploy(randomize_bn_stats(model or tiny_model(), seed=1).eval())


def _fmnist_small():
    return _deploy(timm.create_model("repmlp_fmnist_mlp", widths=(8, 16), head_hidden_size=32))


def _repmlpnet_small():  # stage sizes 16, 8, 4, 2: one shared FC3 per-set linear (S = 1), the others batched
    # the preset's channels and sharesets, one block per stage but two in the third (blocks of one kind repeat)
    kwargs = dict(img_size=64, partitions=(16, 8, 4, 2), depths=(1, 1, 2, 1), num_classes=10)
    return _deploy(timm.create_model("repmlpnet_t224", **kwargs))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("make", [_deploy, _fmnist_small, _repmlpnet_small], ids=["tiny", "fmnist", "repmlpnet"])
def test_onnx_int8_agrees_with_float32(tmp_path, mode, make):
    model = make()
    calibration = data_batches("random", model, 4, 32, seed=0)
    check = data_batches("random", model, 4, 128, seed=1)  # the fixed batch, unseen in calibration
    path = tmp_path / "int8.onnx"
    report = export_onnx(model, path, batch_size=4, quantize=mode, calibration=calibration, check_batches=check)
    assert report.int8.argmax_agreement >= 0.99 and report.int8.count == 128
    assert 0 < report.int8.max_rel_err < 0.1  # quantized, and close
    proto = onnx.load(str(path))
    ops = {node.op_type for node in proto.graph.node}
    assert ({"MatMulInteger", "DynamicQuantizeLinear"} if mode == "dynamic" else {"QuantizeLinear"}) <= ops
    assert max(r for r in tensor_ranks(proto).values()) <= 5 and report.max_rank <= 5
    assert [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]  # no temporary files left


def test_fc3_is_exported_as_per_group_matrix_products_that_int8_quantizes(tmp_path):
    model = _deploy()
    export_onnx(model, tmp_path / "f.onnx", batch_size=2)
    graph = onnx.load(str(tmp_path / "f.onnx")).graph
    weights = {init.name: list(init.dims) for init in graph.initializer}
    products = [weights.get(node.input[1]) for node in graph.node if node.op_type in ("MatMul", "Gemm")]
    # FC3 of the two blocks: 2 and 4 groups of 2-D weights (8*8*4 -> 8*8*4 in 2 groups, 8*16*16 -> 16*16*16 in 4)
    assert sorted(map(tuple, filter(None, products))).count((128, 128)) == 2  # block 1: 8*8*4/2 = 128 per group
    assert sorted(map(tuple, filter(None, products))).count((1024, 512)) == 4  # block 2: out 16*256/4, in 8*256/4
    assert all(len(w) == 2 for w in filter(None, products))  # no 3-D batched weights (int8 tools skip those)
    export_onnx(model, tmp_path / "q.onnx", batch_size=2, quantize="dynamic")
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    # FC3 groups (2 + 4), the first block's global perceptron (fc1, fc2) and the classifier
    assert sum(node.op_type == "MatMulInteger" for node in graph.node) == 2 + 4 + 2 + 1


def test_int8_file_below_the_agreement_is_not_written(tmp_path):
    path = tmp_path / "int8.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="not written"):
        export_onnx(_deploy(), path, batch_size=2, quantize="dynamic", min_agreement=1.01)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["int8.onnx"]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_pytorch_int8_agrees_with_float32(mode):
    model = _fmnist_small()
    batches = data_batches("random", model, 4, 32)
    int8 = quantize_pytorch(model, batches[0], mode, batches, compile=False)  # the graph inductor lowers to oneDNN
    check = compare_outputs(model, int8, data_batches("random", model, 4, 128, seed=1), "random")
    assert check.argmax_agreement >= 0.99 and 0 < check.max_rel_err < 0.1


def test_fixed_batch_runs_any_batch():
    model = _deploy()
    calls = []
    fixed = FixedBatch(lambda x: calls.append(x.shape[0]) or model(x), 4)
    x = torch.randn(10, 3, 16, 16)
    assert rel_err(model(x), fixed(x)) <= 1e-6 and calls == [4, 4, 4]


def test_calibration_data_specs(tmp_path):
    model = _deploy()
    batches = data_batches("random", model, 4, 10)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 16, 16)] * 2  # whole batches only
    assert torch.equal(batches[0], data_batches("random", model, 4, 10)[0])  # seeded
    with pytest.raises(ValueError, match="'nope'.*expected 'random' or DATASET"):
        data_batches("nope", model, 4, 8)
    with pytest.raises(ValueError, match="Fashion-MNIST file"):
        data_batches(f"fashion_mnist:{tmp_path}", model, 4, 8)
    from repmlp.sources import model_source

    assert model_source("repmlp_fmnist_mlp.fmnist", pretrained=True).dataset.startswith("fashion_mnist")  # recorded
    assert model_source("repmlp_fmnist_mlp").dataset is None


def test_weight_ranges_find_outlier_channels():
    model = _deploy()
    with torch.no_grad():
        model[-1].weight[3] *= 50  # one classifier row far out of range
    ranges = {r.name: r for r in weight_ranges(model)}
    fc3 = ranges["1.partition_perceptron.fc3"]
    assert fc3.shape == (256, 128) and fc3.max_abs >= fc3.p999_abs >= fc3.median_abs > 0
    head = ranges["6"]
    assert head.outliers == [3] and head.channel_ratio > 20
    assert head.sqnr_channel_db > head.sqnr_tensor_db + 20  # per-channel scales rescue the other rows
    table = format_ranges(list(ranges.values()))
    assert "1.partition_perceptron.fc3" in table and "SQNR" in table


def test_eval_tool_runs_an_onnx_file(tmp_path, capsys):
    path = tmp_path / "f.onnx"
    export_onnx(
        _deploy(timm.create_model("repmlp_fmnist_mlp", widths=(4, 8), head_hidden_size=16)),
        path,
        batch_size=8,
        quantize="dynamic",
    )
    evaluate = load_tool("eval")
    synthetic = ["--dataset", "synthetic", "--batch-size", "50"]
    assert evaluate.main(["--onnx", str(path), "--model", "repmlp_fmnist_mlp", *synthetic]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["form"] == "onnx" and result["checkpoint"] == str(path) and result["count"] == 256
    assert evaluate.main(["--onnx", str(path), *synthetic]) == 2  # no --model, and the file records no transform
    assert "records no input transform" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["--pretrained", "--onnx --model", "--onnx"])
def test_eval_tool_reads_a_shipped_models_dataset(tmp_path, capsys, source):
    """NAME.TAG needs no --dataset: the shipped weights record Fashion-MNIST (here a small set in its format), and so
    does the ONNX file tools/export_onnx.py writes of them, with its transform: it needs no --model either."""
    from test_data import _write_fmnist

    _write_fmnist(tmp_path, n_test=20)
    model = ["--model", "repmlp_fmnist_mlp.fmnist"]
    args = ["--data-root", str(tmp_path), "--batch-size", "10"] + (model if source != "--onnx" else [])
    if source.startswith("--onnx"):
        path = tmp_path / "f.onnx"
        assert load_tool("export_onnx").main([*model, "--pretrained", "--output", str(path), "--batch-size", "10"]) == 0
        args += ["--onnx", str(path)]
    else:
        args += ["--pretrained"]
    assert load_tool("eval").main(args) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["dataset"] == "fashion_mnist" and result["count"] == 20
    assert result["model"] == "repmlp_fmnist_mlp"


def test_int8_benchmark_tool(tmp_path, capsys):
    out = tmp_path / "int8.json"
    forms = ["pytorch fp32", "onnxruntime fp32 eager layout", "onnxruntime fp32"]
    forms += ["onnxruntime int8 dynamic", "onnxruntime int8 static"]
    options = "--int8 --profile --models test_benchmark:tiny_model --batch-sizes 2 --rounds 2 --warmup 1 --json".split()
    assert load_tool("benchmark").main([*options, str(out), "--int8-forms", *forms]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["form"] for r in rows] == forms
    assert all(r["ms"] > 0 and r["argmax_agreement"] >= 0.99 and r["batch_size"] == 2 for r in rows)
    assert rows[0]["max_rel_err"] == 0 and max(rows[1]["max_rel_err"], rows[2]["max_rel_err"]) < 1e-5
    assert rows[3]["max_rel_err"] > 1e-4 and rows[4]["max_rel_err"] > 1e-4  # int8
    assert "profile_ms" not in rows[0] and all(r["profile_ms"] for r in rows[1:])  # onnxruntime's operator times
    assert "Gemm" in rows[2]["profile_ms"] and any(
        "MatMul" in op for op in rows[1]["profile_ms"]
    )  # FC3 per group, batched
    printed = capsys.readouterr().out
    assert "vs ort fp32" in printed and "ms per run by operator" in printed
    section = render_report("int8", json.loads(out.read_text()))  # as the speed page shows it
    assert "| test_benchmark:tiny_model | 2 | onnxruntime int8 static |" in section and "lacks" in section
