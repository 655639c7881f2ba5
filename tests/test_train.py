"""tools/train.py and tools/eval.py end to end on synthetic data: configs, a full run with the deploy check,
and kill / resume reproducing an uninterrupted run (torchrun: tests/test_distributed.py)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import load_tool
from safetensors.torch import load_file

from repmlp.training import load_config, train
from repmlp.training.state import STATE_FILE, read_state

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# a tiny Fashion-MNIST-shaped model on synthetic 28x28 images: 3 epochs of 12 steps
TINY = [
    "model.name=repmlp_fmnist_mlp",
    "model.kwargs={widths: [4, 8], head_hidden_size: 16}",
    "data.dataset=synthetic",
    "data.num_workers=0",
    "data.crop_padding=2",
    "data.train_transform={color_jitter: null}",
    "data.synthetic={num_samples: 96, num_classes: 4}",
    "optimizer.lr=0.05",
    "scheduler.warmup_epochs=1",
    "train.epochs=3",
    "train.batch_size=8",
    "train.eval_batch_size=32",
    "train.threads=1",
    "train.progress=false",
]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _args(out: Path, *extra: str) -> list[str]:
    overrides = [arg for item in TINY + list(extra) for arg in ("--set", item)]
    return [str(ROOT / "tools" / "train.py"), "--output", str(out), *overrides]


def _train_in_process(out: Path, *extra: str, resume: bool = False) -> dict:
    threads = torch.get_num_threads()  # train() sets its own
    try:
        return train(load_config(None, TINY + [*extra, f"train.output_dir={out}"]), resume=resume)
    finally:
        torch.set_num_threads(threads)


def _resume_in_process(out: Path, *extra: str) -> dict:
    return _train_in_process(out, *extra, resume=True)


def _start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [PYTHON, *_args(out, *extra)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_epochs(out: Path, proc: subprocess.Popen, epochs: int) -> None:
    log = out / "metrics.jsonl"
    while not (log.is_file() and len(log.read_text().splitlines()) >= epochs):
        assert proc.poll() is None, f"run ended before it could be interrupted:\n{proc.stdout.read()}"
        time.sleep(0.01)


def _max_abs_diff(a: Path, b: Path) -> float:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """One uninterrupted run that the interrupted ones must reproduce."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _train_in_process(out)  # in this process: the interrupted runs start tools/train.py as users do
    return out


def test_config_overrides_and_errors(tmp_path):
    cfg = load_config(
        ROOT / "configs" / "fmnist_repmlp.yaml", ["train.epochs=2", "optimizer.lr=0.5", "model.kwargs={drop_rate: 0.1}"]
    )
    assert cfg["train"]["epochs"] == 2 and cfg["optimizer"]["lr"] == 0.5 and cfg["model"]["kwargs"]["drop_rate"] == 0.1
    assert cfg["data"]["dataset"] == "fashion_mnist" and cfg["train"]["threads"] == 1
    with pytest.raises(ValueError, match="unknown config key 'train.epoch'"):
        load_config(None, ["train.epoch=2"])
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(None, ["train.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: {epochs: 1}\n")
    with pytest.raises(ValueError, match="unknown section 'trainer'"):
        load_config(bad)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(config):
    import timm

    cfg = load_config(ROOT / "configs" / config)
    assert cfg["model"]["name"] in timm.list_models() + timm.list_models(pretrained=True)  # NAME or NAME.TAG


def test_full_run_writes_metrics_plot_and_equivalent_forms(reference_run, capsys):
    records = [json.loads(line) for line in (reference_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # counted from 1
    assert {"train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr", "img_per_s"} <= set(records[0])
    assert (reference_run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    final = json.loads((reference_run / "final.json").read_text())
    check = final["equivalence"]
    assert check["passed"] and check["argmax_agreement"] >= 0.9995 and check["max_rel_err"] <= 1e-5
    assert check["train_top1"] == check["deploy_top1"]
    evaluate = load_tool("eval")
    for form in ("train", "deploy"):
        capsys.readouterr()
        assert (
            evaluate.main(
                [
                    "--checkpoint",
                    str(reference_run / f"model_{form}.safetensors"),
                    "--config",
                    str(reference_run / "config.json"),
                ]
            )
            == 0
        )
        metrics = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert metrics["form"] == form and metrics["count"] == 96
        assert metrics["top1"] == pytest.approx(check[f"{form}_top1"])


def test_training_options_run_on_cpu(tmp_path):
    """bf16 autocast, channels_last, gradient checkpointing, EMA, mixup/cutmix and gradient clipping together."""
    options = [
        "train.epochs=1",
        "train.precision=bf16",
        "train.channels_last=true",
        "train.grad_checkpointing=true",
        "ema.enabled=true",
        "ema.decay=0.9",
        "augmentation.mixup=0.2",
        "augmentation.cutmix=1.0",
        "augmentation.label_smoothing=0.1",
        "optimizer.opt=adamw",
        "optimizer.lr=1e-3",
        "optimizer.clip_grad=5.0",
    ]
    summary = _train_in_process(tmp_path, *options)
    assert summary["equivalence"]["passed"]
    assert "ema_val_top1" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])


def test_killed_run_resumes_to_the_same_weights(reference_run, tmp_path):
    proc = _start(tmp_path)
    _wait_for_epochs(tmp_path, proc, 1)
    proc.kill()  # SIGKILL: no chance to save anything beyond the last epoch's checkpoint
    proc.wait()
    assert _resume_in_process(tmp_path)["equivalence"]["passed"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # counted from 1
    assert _max_abs_diff(reference_run / "model_train.safetensors", tmp_path / "model_train.safetensors") <= 1e-6


@pytest.mark.parametrize("mode", ["equivalent_fc3", "fc3_bn"])
def test_qat_run_resumes_after_a_kill_and_exports_int8(tmp_path, mode, capsys):
    """QAT's own modules (fake-quantized equivalent FC3s of the train form, or the authors' BNs put back after a
    deploy FC3) resume like the rest; the plain float form is saved and exported as static int8."""
    import onnx

    qat = [f"qat.mode={mode}", "qat.calibration_batches=2"]
    reference, out = tmp_path / "uninterrupted", tmp_path / "killed"
    proc = _start(out, *qat)
    _wait_for_epochs(out, proc, 1)
    proc.kill()
    proc.wait()
    assert _resume_in_process(out, *qat)["equivalence"]["passed"]
    assert _train_in_process(reference, *qat)["equivalence"]["passed"]
    forms = ["train", "deploy"] if mode == "equivalent_fc3" else ["deploy"]  # fc3_bn fine-tunes a deploy form
    assert {p.name for p in reference.glob("model_*.safetensors")} == {f"model_{f}.safetensors" for f in forms}
    form = forms[0]
    assert _max_abs_diff(reference / f"model_{form}.safetensors", out / f"model_{form}.safetensors") <= 1e-6
    weights, onnx_file = reference / f"model_{form}.safetensors", tmp_path / "int8.onnx"
    # A few steps on random data leave logits close together, so int8 flips some argmaxes of random inputs (2 of 64
    # with the 7-bit weights of a CPU without VNNI); 90% still fails a broken quantization (about 1 in 4 agree).
    options = "--quantize static --batch-size 4 --calibration random --calibration-samples 16 --check-samples 64"
    options += " --min-agreement 0.9"
    capsys.readouterr()
    code = load_tool("export_onnx").main(["--weights", str(weights), "--output", str(onnx_file), *options.split()])
    assert code == 0 and "static int8" in capsys.readouterr().out
    assert any(node.op_type == "QuantizeLinear" for node in onnx.load(str(onnx_file)).graph.node)


def test_sigterm_mid_epoch_saves_and_resumes_exactly(reference_run, tmp_path):
    proc = _start(tmp_path)
    _wait_for_epochs(tmp_path, proc, 1)
    proc.send_signal(signal.SIGTERM)  # lands during the second epoch's steps
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted by signal" in output, output[-2000:]
    state = read_state(tmp_path / STATE_FILE)
    assert state["epoch"] >= 1 and state["step_in_epoch"] > 0
    assert _resume_in_process(tmp_path)["equivalence"]["passed"]
    assert _max_abs_diff(reference_run / "model_train.safetensors", tmp_path / "model_train.safetensors") <= 1e-6
