"""Nothing lost: an output never is, nor replaces, a file the command reads (a file inside an input folder included,
through links); two outputs of one command never share a path; an existing output is replaced only with
--overwrite (every tool's one policy) and keeps its mode; a killed write's temporary file is cleaned up by the next
write. Each refusal comes before any work, as an ``error:`` line and exit status 2."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_tool
from hypothesis import given, settings
from hypothesis import strategies as st

from repmlp import guards
from repmlp.guards import atomic_write, check_outputs, stale_temporaries
from repmlp.shipped import weights_dir

SHIPPED = weights_dir() / "repmlp_fmnist_mlp.fmnist"


def _snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mode) for p in sorted(root.rglob("*")) if p.is_file()
    }


def _main(tool: str, *argv) -> int:
    try:
        return load_tool(tool).main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's errors
        return exit_.code


@pytest.fixture
def folder(tmp_path) -> Path:
    """A copy of the shipped model folder (model.safetensors, config.json, README.md)."""
    shutil.copytree(SHIPPED, tmp_path / "m")
    return tmp_path / "m"


REFUSALS = [  # (tool and arguments ({m}: the model folder, {t}: the tmp dir), message fragments)
    (
        ("convert_deploy", "--weights", "{m}", "--output", "{m}/model.safetensors"),
        ("is a file of the input folder", "choose a new file name"),
    ),
    (("export_onnx", "--weights", "{m}", "--output", "{m}/model.safetensors"), ("is a file of the input folder",)),
    (("export_onnx", "--weights", "{m}", "--output", "{t}/link/config.json"), ("is a file of the input folder",)),
    (("convert_deploy", "--weights", "missing.pth", "--output", "{t}/x.pth"), ("written as .safetensors",)),
    (("convert_deploy", "--weights", "{m}", "--output", "{t}/old.safetensors"), ("exists; pass --overwrite",)),
    (("benchmark", "--json", "{t}/r.out", "--png", "{t}/r.out"), ("--png", "are one file")),
    (("benchmark", "--json", "{t}/r.out", "--png", "{t}/link/../r.out"), ("are one file",)),
    (("benchmark", "--conversion-only", "--png", "{t}/p.png"), ("--conversion-only does not measure",)),
    (("benchmark_pipeline", "--json", "{t}/old.safetensors"), ("exists; pass --overwrite",)),
    (("ship_model", "--model", "repmlp_fmnist_mlp.fmnist", "--checkpoint", "{m}", "--output", "{m}"), ("input",)),
]


@pytest.mark.parametrize("argv, message", REFUSALS, ids=lambda v: " ".join(v) if isinstance(v[0], str) else None)
def test_refused_before_any_work_and_nothing_changes(argv, message, folder, tmp_path, capsys):
    (tmp_path / "old.safetensors").write_bytes(b"a user's file")
    (tmp_path / "link").symlink_to(folder)
    before = _snapshot(tmp_path)
    argv = [a.format(m=folder, t=tmp_path) for a in argv]
    assert _main(*argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and all(m in err for m in message), err
    assert _snapshot(tmp_path) == before


def test_new_files_beside_the_inputs_are_fine(folder, tmp_path):
    assert check_outputs({"--output": folder / "model.onnx"}, [folder, folder / "model.safetensors"])
    assert check_outputs({"--json": tmp_path / "r.json", "--png": tmp_path / "r.png"})


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(spelling=st.lists(st.sampled_from([".", "sub/..", "link/..", "sub/../sub/.."]), max_size=3), hard=st.booleans())
def test_any_spelling_of_an_input_is_refused(tmp_path_factory, spelling, hard):
    tmp = tmp_path_factory.mktemp("spell")
    (tmp / "sub").mkdir()
    (tmp / "link").symlink_to(tmp / "sub")
    (tmp / "in.bin").write_bytes(b"input")
    if hard:
        os.link(tmp / "in.bin", tmp / "hard.bin")
    target = Path(tmp, *spelling, "hard.bin" if hard else "in.bin")
    for outputs, inputs in (({"--output": target}, [tmp / "in.bin"]), ({"--a": tmp / "in.bin", "--b": target}, [])):
        with pytest.raises(ValueError, match="input file|one file"):
            check_outputs(outputs, inputs, overwrite=True)


def test_atomic_write_keeps_the_mode_of_an_existing_file(tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    secret.chmod(0o600)
    atomic_write(secret, lambda tmp: Path(tmp).write_text('{"a": 1}'))
    assert secret.stat().st_mode & 0o777 == 0o600 and secret.read_text() == '{"a": 1}'
    umask = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new.json", lambda tmp: Path(tmp).write_text("{}"))
    finally:
        os.umask(umask)
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640


_KILLED_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("guards", sys.argv[1])
guards = importlib.util.module_from_spec(spec)
spec.loader.exec_module(guards)
def write(tmp):
    open(tmp, "w").write("partial")
    print("writing", flush=True)
    time.sleep(60)
guards.atomic_write(sys.argv[2], write)
"""


def test_a_killed_writes_temporary_file_is_removed_by_the_next_write(tmp_path):
    target = tmp_path / "last_state.safetensors"
    target.write_text("good")
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, guards.__file__, str(target)], stdout=subprocess.PIPE, text=True
    )
    assert writer.stdout.readline() == "writing\n"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    left = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and target.read_text() == "good" and stale_temporaries(target)[0]
    legacy = tmp_path / ".last_state.safetensors.ab12cd34.tmp"  # an earlier version's name: no process in it
    legacy.write_text("partial")
    (tmp_path / ".other.safetensors.ab12cd34.tmp").write_text("another target's: not ours to judge")
    with pytest.warns(UserWarning, match=r"interrupted write .*\.last_state\.safetensors\.ab12cd34\.tmp"):
        atomic_write(target, lambda tmp: Path(tmp).write_text("new"))
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, legacy.name, ".other.safetensors.ab12cd34.tmp"]
    )


def test_a_live_writers_temporary_file_is_kept(tmp_path):
    target = tmp_path / "f.json"
    live = tmp_path / f".f.json.{os.getppid()}@{guards._HOST}.x1y2z3ab.tmp"  # the parent process: alive
    live.write_text("being written")
    time.sleep(0)
    atomic_write(target, lambda tmp: Path(tmp).write_text("{}"))
    assert live.exists()
