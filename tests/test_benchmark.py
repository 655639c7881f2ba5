"""The benchmark end to end on a small model, the authors' deploy form it compares against."""

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool, rel_err
from torch import nn

from benchmarks.emulation import AuthorsRepMLP, authors_deploy_form
from benchmarks.forms import fc3_weight_bytes, sizes_note
from benchmarks.speed_page import render_report
from repmlp import RepMLP, convert_to_deploy
from repmlp.cpu import available_cores, instruction_sets
from repmlp.layers import ConvBN
from repmlp.models import model_input_size
from repmlp.verify import randomize_bn_stats

ROOT = Path(__file__).resolve().parents[1]


def tiny_model() -> nn.Module:
    """Conv stem, two RepMLP blocks (4 and 1 partitions, h != w, C != O) and a classifier, for 3x16x16 inputs."""
    model = nn.Sequential(
        ConvBN(3, 8, 3, act=True),
        RepMLP(8, 8, 16, 16, 8, 4, reparam_conv_k=(1, 3), fc3_groups=2),
        nn.ReLU(),
        RepMLP(8, 16, 16, 16, 16, 16, reparam_conv_k=(3,), fc3_groups=4),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    model.pretrained_cfg = {"input_size": (3, 16, 16)}
    return model


def tiny_baseline() -> nn.Module:
    """A small conv net to compare against."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


def test_benchmark_tool_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = load_tool("benchmark").main(
        [
            "--models",
            "test_benchmark:tiny_model",
            "--baselines",
            "test_benchmark:tiny_baseline",
            "--batch-sizes",
            "1",
            "3",
            "--rounds",
            "2",
            "--max-rounds",
            "4",
            "--warmup",
            "1",
            "--convert-rounds",
            "1",
            "--runtime",
            "eager",
            "onnxruntime",
            "--channels-last",
            "deploy",
            "--json",
            str(out),
            "--png",
            str(tmp_path / "bench.png"),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    rows = {(r["model"].split(":")[-1], r["form"], r["runtime"], r["batch_size"]): r for r in report["results"]}
    assert set(rows) == {
        (m, f, rt, b)
        for m, f in [
            ("tiny_model", "train"),
            ("tiny_model", "deploy"),
            ("tiny_model", "authors"),
            ("tiny_baseline", "baseline"),
        ]
        for rt in ("eager", "onnxruntime")
        for b in (1, 3)
    }
    for (model, form, runtime, bs), r in rows.items():
        assert r["ms"] > 0 and r["images_per_s"] == pytest.approx(1e3 * bs / r["ms"]) and r["ms_p90"] >= r["ms_min"]
        assert r["macs"] > 0 and 0 < r["matmul_fraction"] and r["cpu_ms"] >= 0
        assert (r["peak_bytes"] or 0) > 0 if runtime == "eager" else r["peak_bytes"] is None
        assert r["channels_last"] == (form == "deploy") and r["runtime_max_rel_err"] <= 1e-5
        if model == "tiny_model":
            assert r["max_rel_err"] <= 1e-5 and len(r["fc3_bytes_per_block"]) == 2
    assert rows[("tiny_model", "train", "eager", 1)]["macs"] > rows[("tiny_model", "deploy", "eager", 1)]["macs"]
    assert rows[("tiny_model", "authors", "eager", 1)]["macs"] == rows[("tiny_model", "deploy", "eager", 1)]["macs"]
    versus = {(r["versus"].split(":")[-1], r["runtime"], r["batch_size"]) for r in report["ratios"]}
    assert versus == {
        (v, rt, b) for v in ("train", "authors", "tiny_baseline") for rt in ("eager", "onnxruntime") for b in (1, 3)
    } | {("deploy eager", "onnxruntime", b) for b in (1, 3)}
    for r in report["ratios"]:
        s = r["per_round"]
        assert 2 <= s["rounds"] <= 4 and s["min"] <= s["p25"] <= s["median"] <= s["p75"] <= s["max"]
    machine = report["machine"]
    assert all(g > 0 for g in machine["matmul_gflops"].values()) and machine["start"]["threads"] == available_cores()
    assert machine["instruction_sets"] == instruction_sets() and machine["cpu"] and machine["torch_cpu_capability"]
    assert report["command"].startswith("OMP_WAIT_POLICY=") and "--models test_benchmark:tiny_" in report["command"]
    assert len(machine["start"]["loadavg"]) == 3 and "omp_wait_policy" in machine["start"]
    conversion = report["conversion"]["test_benchmark:tiny_model"]
    assert conversion["with_copy_s"] > 0 and "speedup_vs_authors" not in conversion  # C != O: not theirs to convert
    assert (tmp_path / "bench.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "deploy vs train [onnxruntime]" in printed and "OMP_WAIT_POLICY=" in printed and "AVX-512" in printed
    section = render_report("bench", report)  # as the speed page shows it: machine, command, tables
    assert "; has AVX" in section and "; lacks " in section and report["command"] in section
    assert "| test_benchmark:tiny_model | deploy | onnxruntime | NHWC | 3x16x16 | 3 |" in section


def test_benchmark_in_bf16_profiles_quietly(tmp_path, capfd):
    """bf16 (the path GPUs take too), the baseline channels_last by default, where each eager candidate spends its
    time, and none of the profiler's C++ noise (``gpuGetDeviceCount failed``) on a machine without a GPU."""
    out = tmp_path / "bf16.json"
    args = "--models test_benchmark:tiny_model --baselines test_benchmark:tiny_baseline --forms deploy --dtype bf16"
    args += " --batch-sizes 2 --rounds 1 --warmup 0 --convert-rounds 0 --matmul-size 64 --profile --json"
    assert load_tool("benchmark").main([*args.split(), str(out)]) == 0
    report = json.loads(out.read_text())
    assert {(r["form"], r["channels_last"], r["dtype"]) for r in report["results"]} == {
        ("deploy", False, "bf16"),
        ("baseline", True, "bf16"),
    }
    deploy = next(r for r in report["results"] if r["form"] == "deploy")
    assert deploy["profile_ms"]["matmul"] > 0 and 1e-5 < deploy["dtype_max_rel_err"] <= 5e-2
    captured = capfd.readouterr()
    assert "gpuGetDeviceCount" not in captured.err + captured.out and "by operator kind: " in captured.out


def test_speedups_name_different_input_sizes():
    same = dict(input_size=[3, 224, 224], versus_input_size=[3, 224, 224])
    assert sizes_note(same) == ""
    assert sizes_note({**same, "input_size": [1, 28, 28]}) == ", inputs 1x28x28 vs 3x224x224"


# (C, O, H, W, h, w, groups): several partitions with a global perceptron, h != w, C != O, one partition
AUTHORS_CASES = [(8, 8, 12, 10, 6, 5, 4), (8, 16, 12, 12, 6, 6, 4), (6, 6, 7, 7, 7, 7, 1)]


@pytest.mark.parametrize("c,o,H,W,h,w,g", AUTHORS_CASES)
def test_authors_form_computes_the_same_function_with_shared_weights(c, o, H, W, h, w, g):
    block = randomize_bn_stats(RepMLP(c, o, H, W, h, w, reparam_conv_k=(1, 3), fc3_groups=g)).eval()
    deploy = convert_to_deploy(nn.Sequential(block, nn.ReLU()))
    authors = authors_deploy_form(deploy)
    assert isinstance(authors[0], AuthorsRepMLP)
    fc3 = deploy[0].partition_perceptron.fc3.weight
    assert authors[0].block.partition_perceptron.fc3.weight.data_ptr() == fc3.data_ptr()
    x = torch.randn(3, c, H, W)
    with torch.no_grad():
        assert rel_err(deploy(x), authors(x)) <= 1e-6
        assert rel_err(block(x).relu(), authors(x)) <= 1e-5
    assert fc3_weight_bytes(authors) == {"0.block.partition_perceptron.fc3": fc3.numel() * 4}


def test_authors_form_needs_the_deploy_form():
    with pytest.raises(ValueError, match="deploy-form"):
        authors_deploy_form(tiny_model())


def test_input_size_follows_the_model():
    import timm

    assert model_input_size(tiny_model()) == (3, 16, 16)
    assert model_input_size(timm.create_model("repmlp_res50_light_224", img_size=64, partition=4)) == (3, 64, 64)


def test_authors_form_runs_nchw_as_their_code_does():
    """Their code keeps NCHW: the emulation gets contiguous conv weights (FC3 still shared) and no NHWC input."""
    import timm

    train = randomize_bn_stats(timm.create_model("repmlp_res50_light_224", img_size=64, partition=4)).eval()
    deploy = convert_to_deploy(train)
    authors = authors_deploy_form(deploy)
    convs = [m.weight for m in authors.modules() if isinstance(m, nn.Conv2d)]
    assert not authors.channels_last and deploy.channels_last and all(w.is_contiguous() for w in convs)
    block, ours = authors.stages[1][1].repmlp.block, deploy.stages[1][1].repmlp
    assert block.partition_perceptron.fc3.weight is ours.partition_perceptron.fc3.weight
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(deploy(x), authors(x)) <= 1e-5


def test_pipeline_benchmark_times_each_loader(tmp_path, capsys):
    """tools/benchmark_pipeline.py end to end on a few JPEGs (its figures are the README's, not a test's)."""
    out = tmp_path / "pipeline.json"
    args = ["--images", "16", "--batch-size", "8", "--workers", "0", "--rounds", "1", "--json", str(out)]
    assert load_tool("benchmark_pipeline").main(args) == 0
    report = json.loads(out.read_text())
    (row,) = report["rows"]
    assert report["images"] == 16 and row["workers"] == 0
    assert all(row[f"{kind}_img_s"] > 0 for kind in ("ours", "timm", "ours_uint8"))
    assert "| 0 worker(s) |" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_before_any_work(capsys):
    args = ["--device", "cuda", "--models", "test_benchmark:tiny_model", "--baselines", "--dtype", "fp16"]
    assert load_tool("benchmark").main(args) == 2
    assert "no CUDA device here" in capsys.readouterr().err
