"""The rooms of ``stego_core/`` import one way (docs/design.md, "Layout and data flow"), MLflow only at the top
edge, no import cycle (function-level imports included), and the library never imports ``experiments``."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "stego_core"
#: Each room may import from its own level and the levels below it.
LEVELS = {"_checks": 0, "_arrays": 0, "_markdown": 0, "config": 0, "runtime": 1, "data": 2, "engine": 3, "evaluation": 4,
          "report": 5, "features": 6, "methods": 7, "platform": 8, "steps": 9}


def _module(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``stego_core`` / ``mlflow`` / ``experiments`` module a file imports, at any depth of the code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in out if m.split(".")[0] in ("stego_core", "mlflow", "experiments")}


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    return {mod: {m for m in _imports(path) if m in files and m != mod} for mod, path in files.items()}


def _room(module: str) -> str:
    return module.split(".")[1] if module.count(".") >= 1 else "stego_core"


def test_every_room_has_a_level():
    rooms = {p.name.removesuffix(".py") for p in PACKAGE.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert rooms == set(LEVELS)


def test_rooms_import_only_from_below():
    upward = []
    for mod, deps in _graph().items():
        if mod == "stego_core":
            continue
        for dep in deps:
            if dep != "stego_core" and LEVELS[_room(dep)] > LEVELS[_room(mod)]:
                upward.append(f"{mod} -> {dep}")
    assert not upward, "imports that run back up: " + ", ".join(sorted(upward))


def test_mlflow_only_at_the_top_edge_and_no_experiments():
    for path in PACKAGE.rglob("*.py"):
        mod, imported = _module(path), _imports(path)
        assert not any(m.startswith("experiments") for m in imported), mod
        if _room(mod) not in ("platform", "steps"):
            assert not any(m.startswith("mlflow") or m.startswith("stego_core.platform") for m in imported), mod


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph.get(mod, ())):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state and mod != "stego_core.methods":  # the package's registrations import its rooms
            visit(mod)
