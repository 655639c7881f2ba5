"""The commands users read are the ones CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- setup:begin -->\s*```bash\n(.*?)```\s*<!-- setup:end -->", text, re.S)
    assert block, "README.md lost its setup block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_readme_has_exactly_two_setup_commands_and_ci_runs_them():
    commands = _readme_commands()
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(command in ci for command in commands)
    assert "pytest" in commands[1] and "tools/convert_deploy.py" in commands[0] and ".venv" in commands[0]


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch):
    """Every ```python block of the README, in order and in one namespace, as a user pastes them (the
    placeholder folder path becomes the shipped folder); files they write land in a scratch directory."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert len(blocks) >= 3
    shipped = str(ROOT / "pretrained" / "repmlp_fmnist_mlp.fmnist")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(
            compile(block.replace("/path/to/repmlp_fmnist_mlp.fmnist", shipped), f"README block {i}", "exec"), namespace
        )
    assert (tmp_path / "light_deploy.safetensors").is_file()
