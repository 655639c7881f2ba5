"""The README and the documentation site: what users read is what runs.

Every fenced code block of README.md and docs/*.md runs here, page by page in one namespace and a scratch
directory, except blocks marked just above their fence with ``<!-- docs-test: skip REASON ... -->``, where REASON is
one of :data:`SKIP_REASONS`; the marked blocks are counted and listed (``pytest -rA`` shows the list). ``python``
blocks are executed, ``yaml`` blocks parsed; a ``bash`` block runs only as the README's set-up and quickstart blocks
(tests below and ``.ci/run``), so any other must be marked. The site builds with ``mkdocs build --strict``.
"""

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SKIP_REASONS = ("gpu", "processes", "network")  # what the suite's machine lacks: a GPU, spare cores, the network
README_BLOCKS = ("setup", "quickstart")  # the README's bash blocks, run by test_quickstart.py and .ci/run
_FENCE = re.compile(
    r"(?:<!-- docs-test: skip (?P<reason>\w+)[^>]*-->\n|<!-- (?P<named>\w+):begin -->\n)?"
    r"```(?P<lang>\w*)\n(?P<code>.*?)```",
    re.S,
)


def blocks(page: Path) -> list[dict]:
    """The fenced code blocks of a page: language, code, skip reason and README block name (or None)."""
    return [m.groupdict() for m in _FENCE.finditer(page.read_text())]


def readme_block(name: str) -> list[str]:
    """The command lines of the README's ``<!-- NAME:begin -->`` bash block."""
    found = [b for b in blocks(ROOT / "README.md") if b["named"] == name]
    assert len(found) == 1 and found[0]["lang"] == "bash", f"README.md lost its {name} block"
    return [line for line in found[0]["code"].splitlines() if line.strip() and not line.startswith("#")]


def test_readme_is_short_and_has_exactly_two_setup_commands_that_ci_runs():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    commands = readme_block("setup")
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert all(command in ci for command in commands)
    assert "pytest" in commands[1] and "tools/convert_deploy.py" in commands[0] and ".venv" in commands[0]


def test_every_code_block_is_run_or_marked_with_a_known_reason():
    run, skipped = {}, []
    for page in PAGES:
        for block in blocks(page):
            if block["reason"]:
                assert block["reason"] in SKIP_REASONS, f"{page.name}: unknown skip reason {block['reason']!r}"
                skipped.append(f"{page.relative_to(ROOT)}: {block['lang']} block ({block['reason']})")
                continue
            if block["lang"] == "bash":
                assert block["named"] in README_BLOCKS, f"{page.name}: a bash block the tests do not run: mark it"
                kind = f"README {block['named']} (bash)"
            else:
                assert block["lang"] in ("python", "yaml"), f"{page.name}: a {block['lang']!r} block: which runs it?"
                kind = block["lang"]
            run[kind] = run.get(kind, 0) + 1
    print(f"docs code blocks run: {run}; skipped: {len(skipped)}", *skipped, sep="\n  ")
    assert run["python"] >= 15 and len(skipped) <= 8


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_blocks_run_as_written(page, tmp_path, monkeypatch):
    """A page's python blocks in order and in one namespace, as a user pastes them; its yaml blocks parse. Files
    they write land in a scratch directory."""
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for i, block in enumerate(blocks(page)):
        if block["reason"]:
            continue
        if block["lang"] == "python":
            exec(compile(block["code"], f"{page.name} block {i}", "exec"), namespace)
        elif block["lang"] == "yaml":
            assert isinstance(yaml.safe_load(block["code"]), dict)


def test_the_site_builds_strictly(tmp_path):
    """``mkdocs build --strict``: every page in the nav, links and snippets resolved, the API reference rendered."""
    pytest.importorskip("mkdocs")
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(ROOT / "mkdocs.yml"), site_dir=str(tmp_path / "site"))
    config.plugins.on_startup(command="build", dirty=False)
    try:
        build(config)
    finally:
        config.plugins.on_shutdown()
    assert (tmp_path / "site" / "api" / "index.html").is_file()
    nav = (ROOT / "mkdocs.yml").read_text()
    assert all(page.name in nav for page in PAGES[1:])  # every page is in the nav
