"""The package layout: floors in pipeline order, imports only downward, no circle, one line on what each module owns.

Every import counts, function-local ones included: an import moved into a function to dodge a circle is still
the same dependency. The floors are listed here (and in ../shared/DESIGN.md); a new module must take its place.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sdsurgeon"

# First name of a module path -> its floor; a module may import its own floor or lower ones. A full dotted name
# places one module apart from its package (only names kept for old pickles need that).
FLOORS = {
    "errors": 0, "_version": 0, "models": 0,  # nothing of sdsurgeon below them
    "choices": 0,  # the fixed choices --help names (gate modes, scalings), without torch
    "_torch": 0,  # every private torch name, looked up at use (the cond patch keeps its own fence, in gate/)
    "attrs": 0,  # the one resolver of dotted attribute paths (fx targets) that capture, analysis and surgery share
    "progress": 0,  # the progress reporter interface long work reports stages to (the CLI draws it on stderr)
    "options": 1,  # the typed options of plan, inject and export: their names, defaults, ranges and help, once
    "io": 1,  # bytes in and out, and who is trusted
    "distributed": 1,  # what ranks agree on (shared seeds, the DDP anchor, FSDP2 units): below the gate that uses it
    "gate": 2,  # the gate module the passes place: depends on errors, choices, _torch and distributed only
    "layers": 2,  # a name kept for models pickled before gate/ (it re-exports gate)
    "capture": 3, "analysis": 4, "surgery": 5, "deploy": 6,
    "capture.in_place": 5,  # a name kept for models pickled before surgery/install (it re-exports it)
    "schedules": 6,  # steps the gates of an injected model over training: above surgery
    "sdfile": 7,  # rebuilds a recorded surgery: above surgery
    "callbacks": 7,  # training loops' callbacks (transformers' Trainer) that step the schedules
    "report": 8, "plot": 8,  # records -> text and pictures
    "pipeline": 9,  # plan / inject / convert: what the CLI and batch call
    "batch": 10, "cli": 11, "__main__": 11,
    "__init__": 12,  # the package root: the public API re-exports; nothing inside imports it
}


def _modules() -> dict[str, Path]:
    """Dotted names below the package ('io.files', 'io' for io/__init__.py, '__init__' for the root)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module ``name`` imports, anywhere in its code."""
    is_package = path.name == "__init__.py" and name != "__init__"
    here = name.split(".") if is_package else name.split(".")[:-1]
    if name == "__init__":
        here = []
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else list(here)
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "sdsurgeon":
                target = node.module.split(".")[1:]
            else:
                continue
            for alias in node.names:  # `from .io import hf` imports the module io.hf
                sub = ".".join(target + [alias.name])
                out.add(sub if sub in known else (".".join(target) or "__init__"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "sdsurgeon":
                    out.add(".".join(alias.name.split(".")[1:]) or "__init__")
    out.discard(name)
    return {m for m in out if m in known or m == "__init__"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _floor(module: str) -> int:
    return FLOORS[module] if module in FLOORS else FLOORS[module.split(".")[0]]


def test_every_module_has_a_floor():
    unplaced = sorted(m for m in _modules() if m.split(".")[0] not in FLOORS)
    assert not unplaced, f"place these modules on a floor in FLOORS (and in DESIGN.md): {unplaced}"


def test_imports_run_only_downward():
    upward = [f"{m} (floor {_floor(m)}) imports {d} (floor {_floor(d)})"
              for m, deps in _graph().items() for d in sorted(deps) if _floor(d) > _floor(m)]
    assert not upward, "imports must run downward:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            circle = visit(m)
            assert circle is None, "import circle: " + " -> ".join(circle)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_opens_with_one_line_on_what_it_owns(name):
    doc = ast.get_docstring(ast.parse(_modules()[name].read_text()))
    assert doc and doc.splitlines()[0].strip(), f"{name}: open the module with a one-line docstring"


def test_the_checks_see_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks themselves: a made-up package with a function-local upward import that closes a circle."""
    (tmp_path / "io").mkdir()
    (tmp_path / "io" / "__init__.py").write_text('"""io."""\n')
    (tmp_path / "io" / "files.py").write_text('"""files."""\n\ndef f():\n    from ..surgery import fold\n')
    (tmp_path / "surgery").mkdir()
    (tmp_path / "surgery" / "__init__.py").write_text('"""surgery."""\n')
    (tmp_path / "surgery" / "fold.py").write_text('"""fold."""\nfrom ..io.files import f\n')
    monkeypatch.setitem(globals(), "PACKAGE", tmp_path)
    assert _graph()["io.files"] == {"surgery.fold"}
    with pytest.raises(AssertionError, match="io.files .floor 1. imports surgery.fold"):
        test_imports_run_only_downward()
    with pytest.raises(AssertionError, match="import circle"):
        test_no_import_circle()
