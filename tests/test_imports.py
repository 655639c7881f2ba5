"""The library's layers: no module imports, at module level or inside a function, one that imports it back."""

import ast
import importlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "repmlp"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body (``from x import y`` names ``x.y`` when
    ``y`` is a module)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in node.names:
                    edges.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a path that ends where it starts, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 20 and "repmlp.checkpoint" in graph["repmlp.models._base"]  # the graph sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_key_layouts_are_a_leaf():
    assert import_graph()["repmlp.authors"] == set()


def test_every_public_module_declares_what_it_exports():
    """``__all__`` in every public module, naming only what the module has."""
    for name in sorted(import_graph()):
        if any(part.startswith("_") for part in name.split(".")):
            continue
        module = importlib.import_module(name)
        assert isinstance(getattr(module, "__all__", None), list), f"{name} declares no __all__"
        assert not [n for n in module.__all__ if not hasattr(module, n)], name


def test_former_names_still_import():
    """What moved or was renamed keeps its old name (CHANGELOG.md): the int8 module, the small-image model class."""
    import repmlp
    import repmlp.int8
    import repmlp.quantize

    assert repmlp.MLPCifarNet is repmlp.PureMLPNet is repmlp.models.MLPCifarNet
    assert all(getattr(repmlp.int8, n) is getattr(repmlp.quantize, n) for n in repmlp.int8.__all__)
