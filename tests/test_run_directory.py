"""A run directory keeps what is not the run's: the run records its files (run_files.json), --overwrite deletes
those alone, a folder whose files no run wrote (a model folder, a project) is refused, a run that stopped before its
first checkpoint does not block its retry, and a lock keeps a second run out while one holds the directory."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import load_tool, train_tiny

from repmlp.shipped import weights_dir
from repmlp.training.rundir import LOCK, MANIFEST, RunLock, check_output_dir, run_files, start_afresh


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(done.stdout)


def _train_tool(*argv) -> int:
    from conftest import TINY_RUN

    args = [a for item in TINY_RUN for a in ("--set", item)]
    return load_tool("train").main([*args, *map(str, argv)])


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_model_folder_or_a_projects_config_is_never_an_earlier_run(overwrite, tmp_path, capsys):
    shutil.copytree(weights_dir() / "repmlp_fmnist_mlp.fmnist", tmp_path / "m")
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "config.json").write_text('{"editor": {"tabs": 4}}')
    before = _snapshot(tmp_path)
    for out in (tmp_path / "m", tmp_path / "project"):
        assert _train_tool("--output", out, *(["--overwrite"] if overwrite else [])) == 2
        err = capsys.readouterr().err
        assert "config.json, which no training run wrote there" in err and "earlier run" not in err
    assert _snapshot(tmp_path) == before


def test_overwrite_deletes_only_the_runs_own_files(tmp_path, tiny_run):
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / "notes.txt").write_text("mine")
    (out / "model_train.onnx").write_bytes(b"an export beside the run")
    files = check_output_dir(out, resume=False, overwrite=True)
    assert MANIFEST in files.own and "config.json" in files.own and files.trained and not files.foreign
    deleted = start_afresh(out, files)
    assert sorted(p.name for p in out.iterdir()) == sorted(["notes.txt", "model_train.onnx", MANIFEST])
    assert "last_state.safetensors" in deleted and (out / "notes.txt").read_text() == "mine"


def test_a_run_of_an_earlier_version_is_still_one(tmp_path, tiny_run):
    """No manifest: a directory whose config.json is a training config is a run, as before."""
    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    (out / MANIFEST).unlink()
    files = run_files(out)
    assert files.trained and "config.json" in files.own and not files.foreign
    with pytest.raises(FileExistsError, match="holds an earlier run"):
        check_output_dir(out, resume=False, overwrite=False)


def test_a_run_that_stopped_before_its_first_checkpoint_does_not_block_its_retry(tmp_path, tiny_run):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("config.json", MANIFEST):
        shutil.copy(tiny_run / name, out / name)
    files = check_output_dir(out, resume=False, overwrite=False)  # not refused
    assert not files.trained and sorted(files.own) == sorted(["config.json", MANIFEST])


def test_the_lock_refuses_a_second_run_and_is_taken_over_when_stale(tmp_path):
    first = RunLock.acquire(tmp_path)
    with pytest.raises(FileExistsError, match=f"in use by another training run \\(process {os.getpid()} on"):
        RunLock.acquire(tmp_path)
    first.release()
    assert not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "started": 0}))
    RunLock.acquire(tmp_path).release()  # its process is gone: stale, taken over
    (tmp_path / LOCK).write_text(json.dumps({"host": "node7", "pid": 1, "started": 0}))
    with pytest.raises(FileExistsError, match=f"process 1 on node7.*delete {tmp_path / LOCK}"):
        RunLock.acquire(tmp_path)  # another host's: cannot tell, refused with the way out


def test_train_refuses_a_locked_directory_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid(), "started": 0}))
    before = _snapshot(tmp_path)
    assert _train_tool("--output", out) == 2
    assert f"error: train.output_dir {out} is in use by another training run" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_a_finished_run_releases_its_lock_and_a_refused_one_leaves_no_directory(tmp_path, tiny_run):
    assert not (tiny_run / LOCK).exists() and (tiny_run / MANIFEST).exists()
    with pytest.raises(ValueError, match="train.global_batch"):
        train_tiny(tmp_path / "new", "train.global_batch=7")
    assert not (tmp_path / "new").exists()
