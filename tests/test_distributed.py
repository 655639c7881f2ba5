"""Multi-node training as clusters launch it: two ``torchrun --nnodes 2`` launches on 127.0.0.1 with a c10d
rendezvous (gloo, a tiny synthetic run), with one node killed after an epoch (the other stops) and ``--resume``,
train bitwise the weights one node with two processes trains. Gradient accumulation over N processes x k
batches equals batches N*k times larger."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file
from test_train import TINY  # the same tiny Fashion-MNIST-shaped run

from repmlp.training import load_config, train
from repmlp.training.loop import accumulation_steps
from repmlp.training.state import STATE_FILE, read_state

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "tools" / "train.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(out: Path, *extra: str) -> list[str]:
    return [TRAIN, "--output", str(out), *[a for item in TINY + list(extra) for a in ("--set", item)]]


def _one_node(out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *_train_args(out)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)


def _start_nodes(out: Path, resume: bool = False) -> list[subprocess.Popen]:
    """Two one-process nodes joining one c10d rendezvous."""
    port = _free_port()
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{port}",
        "--rdzv-id",
        f"test{port}",
    ]
    return [
        subprocess.Popen(
            [*launch, *_train_args(out), *(["--resume"] if resume else [])],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]


def _kill_node(node: subprocess.Popen) -> None:
    """SIGKILL a node at once: its torchrun agent and the training processes it started (by their ids)."""
    children = [
        int(pid) for task in Path(f"/proc/{node.pid}/task").iterdir() for pid in (task / "children").read_text().split()
    ]
    for pid in [node.pid, *children]:
        os.kill(pid, signal.SIGKILL)


def _finish(nodes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    return [(node.wait(timeout), node.communicate()[0]) for node in nodes]


def _weights(out: Path) -> dict:
    return load_file(str(out / "model_train.safetensors"))


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_node")
    result = _one_node(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_one_node_two_processes_keep_identical_weights(one_node_run):
    final = json.loads((one_node_run / "final.json").read_text())
    assert "2 process(es)" in final["hardware"]
    assert final["divergence"] == 0.0  # max abs difference of every weight and buffer, rank 1 vs rank 0
    assert final["equivalence"]["passed"]
    records = [json.loads(line) for line in (one_node_run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["val_top1"] >= 0  # rank 0 alone logs each epoch once


def test_two_nodes_train_the_weights_of_one_node_through_a_kill_and_resume(one_node_run, tmp_path):
    """Two nodes train; one is killed after the first epoch and the other stops; two nodes resume, and the weights
    are bitwise those of one node with two processes (the two-node run is this run: it also trains them)."""
    nodes = _start_nodes(tmp_path)
    log = tmp_path / "metrics.jsonl"
    while not (log.is_file() and log.read_text().strip()):
        assert all(node.poll() is None for node in nodes), _finish(nodes)
        time.sleep(0.05)
    _kill_node(nodes[1])
    start = time.monotonic()
    code, output = _finish(nodes[:1], timeout=120)[0]
    stopped_after = time.monotonic() - start
    assert code != 0 and stopped_after < 60, (stopped_after, output[-3000:])  # the other node stops, no hang
    nodes[1].wait()
    state = read_state(tmp_path / STATE_FILE)  # the last epoch's state is intact
    assert state["epoch"] >= 1 and state["step_in_epoch"] == 0
    results = _finish(_start_nodes(tmp_path, resume=True))
    assert [c for c, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    final = json.loads((tmp_path / "final.json").read_text())
    assert final["divergence"] == 0.0 and final["equivalence"]["passed"]
    reference, weights = _weights(one_node_run), _weights(tmp_path)
    assert reference.keys() == weights.keys()
    assert all((reference[k] == weights[k]).all() for k in reference)  # bitwise
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # counted from 1


# A model without BatchNorm (timm's test_convnext: LayerNorm), and augmentation that draws but changes nothing, so
# that accumulated batches can equal one large batch: BatchNorm normalises each batch by its own statistics.
NO_BN = [
    "model.name=test_convnext",
    "data.dataset=synthetic",
    "data.num_workers=0",
    "data.input_size=[3, 32, 32]",
    "data.mean=[0.5, 0.5, 0.5]",
    "data.std=[0.25, 0.25, 0.25]",
    "data.train_transform={hflip: 0.0, scale: [1.0, 1.0], ratio: [1.0, 1.0], color_jitter: null}",
    "data.synthetic={num_samples: 96, num_classes: 4}",
    "optimizer.lr=0.05",
    "train.epochs=1",
    "train.eval_batch_size=32",
    "train.threads=1",
    "train.progress=false",
]


def _max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def test_accumulation_equals_larger_batches(tmp_path):
    """1 process x 4 accumulated batches of 4, and (torchrun) 2 processes x 2 batches of 4, against batches of 16:
    the same 6 optimizer steps on the same samples."""
    runs = {
        "batch16": ["train.batch_size=16"],
        "1x4x4": ["train.batch_size=4", "train.global_batch=16"],
    }
    for name, extra in runs.items():
        train(load_config(None, [*NO_BN, *extra, f"train.output_dir={tmp_path / name}"]))
    args = [TRAIN, "--output", str(tmp_path / "2x2x4")]
    args += [a for item in [*NO_BN, "train.batch_size=4", "train.global_batch=16"] for a in ("--set", item)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = {name: load_file(str(tmp_path / name / "model_deploy.safetensors")) for name in [*runs, "2x2x4"]}
    assert _max_abs_diff(weights["batch16"], weights["1x4x4"]) <= 1e-6  # float sums in another order
    assert _max_abs_diff(weights["batch16"], weights["2x2x4"]) <= 1e-6
    states = [read_state(tmp_path / name / STATE_FILE)["num_updates"] for name in [*runs, "2x2x4"]]
    assert states == [6, 6, 6]


def test_accumulation_resumes_exactly_from_a_step_boundary(tmp_path, monkeypatch):
    """A stop requested mid-step takes effect after the step: the state is saved between optimizer steps."""
    from repmlp.training import loop as training_loop

    extra = ["train.batch_size=4", "train.global_batch=16", "train.epochs=2"]
    train(load_config(None, [*NO_BN, *extra, f"train.output_dir={tmp_path / 'reference'}"]))
    calls = []
    monkeypatch.setattr(training_loop.StopFlag, "__call__", lambda self: calls.append(1) or len(calls) == 8)
    stopped = train(load_config(None, [*NO_BN, *extra, f"train.output_dir={tmp_path / 'stopped'}"]))
    assert stopped == {"interrupted": True, "epoch": 1, "step": 8}  # 2 of epoch 2's 6 steps, 4 batches each
    monkeypatch.undo()
    train(load_config(None, [*NO_BN, *extra, f"train.output_dir={tmp_path / 'stopped'}"]), resume=True)
    reference = load_file(str(tmp_path / "reference" / "model_deploy.safetensors"))
    assert _max_abs_diff(reference, load_file(str(tmp_path / "stopped" / "model_deploy.safetensors"))) == 0.0


@pytest.mark.parametrize(
    "global_batch,world,expected",
    [(None, 8, 1), (256, 8, 1), (256, 2, 4), (256, 1, 8), (96, 3, 1)],
)
def test_accumulation_steps_make_the_global_batch(global_batch, world, expected):
    assert accumulation_steps(global_batch, 32, world) == expected


def test_a_global_batch_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=r"train.global_batch=256 is not a multiple of .* 48 x 2 = 96; batch sizes"):
        accumulation_steps(256, 48, 2)
    with pytest.raises(ValueError, match="positive integer"):
        accumulation_steps(0, 4, 1)
