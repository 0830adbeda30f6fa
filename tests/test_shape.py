"""The package's shape, kept as it was left by the reshaping: short functions, imports in one direction,
a README on one screen with the rest in docs/."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "carlos"
LONGEST_FUNCTION = 60  # lines, decorators and docstring included
LONGEST_README = 250


@functools.cache
def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(encoding="utf-8")) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> set[str]:
    """The carlos modules a module imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("carlos"):
            parts = node.module.split(".")
            found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("carlos.")}
    return found


def test_every_function_is_short_enough_to_see_whole():
    long = [
        f"carlos/{name}.py:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for name, tree in _modules().items()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, long


def test_no_import_cycle_between_carlos_modules():
    graph = {name: _imports(tree) & set(_modules()) for name, tree in _modules().items()}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    assert not [name for name in graph if name in reaches(name)]
    assert graph["model"] <= {"config", "errors"}  # plain PyTorch, no Lightning, no files
    for light in ("plan", "checkpoint", "generate", "evaluate", "model"):
        # these do not import Lightning, so sample and eval start fast and a run is refused in a second
        source = (PACKAGE / f"{light}.py").read_text(encoding="utf-8")
        assert not re.search(r"^\s*(import|from) (lightning|pytorch_lightning)\b", source, re.M), light


def test_no_module_level_mutable_state_in_sweep_bookkeeping():
    tree = _modules()["sweep"]
    assigned = [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets]
    assert not assigned, assigned


def test_readme_is_one_screen_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= LONGEST_README
    links = re.findall(r"\]\(([^)#\s]+)", text)
    assert any(link.startswith("docs/") for link in links)
    missing = [link for link in links if "://" not in link and not (ROOT / link).exists()]
    assert not missing, missing
