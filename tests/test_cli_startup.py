"""Start-up: --help, COMMAND --help and --version answer without importing torch; the public API is imported lazily."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import sdsurgeon
from sdsurgeon.cli import app

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).with_name("sdsurgeon")  # the console script of this venv
VERSION = re.search(r'__version__ = "([^"]+)"', (ROOT / "sdsurgeon" / "_version.py").read_text()).group(1)

# In a fresh interpreter: run the typer app on argv through typer's CliRunner, then say what it printed and
# whether torch (or any module of it) was imported on the way.
PROBE = """
import json, sys
from typer.testing import CliRunner
from sdsurgeon.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(json.dumps({"exit_code": result.exit_code, "stdout": result.stdout,
                  "torch": sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))[:5]}))
"""



def _commands(app, *above: str) -> list[list[str]]:
    """Every command and command group of the typer app, as the words that name it."""
    found = [[*above, info.name] for info in app.registered_commands]
    for group in app.registered_groups:
        found += [[*above, group.name], *_commands(group.typer_instance, *above, group.name)]
    return found


ANSWERS_WITHOUT_TORCH = [["--version"], ["--help"], *([*words, "--help"] for words in _commands(app))]


def _probe(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.multiprocess
@pytest.mark.parametrize("args", ANSWERS_WITHOUT_TORCH, ids=" ".join)
def test_help_and_version_answer_without_importing_torch(args):
    found = _probe(*args)
    assert found["exit_code"] == 0, found["stdout"]
    assert found["torch"] == [], f"sdsurgeon {' '.join(args)} imported {found['torch']}"
    if args == ["--help"]:
        for option in ("--version", "--install-completion", "--show-completion"):
            assert option in found["stdout"], option


@pytest.mark.multiprocess
def test_version_prints_the_version_of_version_py_and_exits_0():
    found = _probe("--version")
    assert found["stdout"] == f"sdsurgeon {VERSION}\n"
    assert sdsurgeon.__version__ == VERSION


@pytest.mark.multiprocess
@pytest.mark.skipif(not SCRIPT.exists(), reason="no sdsurgeon console script beside this interpreter")
@pytest.mark.parametrize("args", [["--version"], ["--help"], ["plan", "--help"], ["batch", "--help"]], ids=" ".join)
def test_the_console_script_answers_without_importing_torch(args, tmp_path):
    # PYTHONPROFILEIMPORTTIME: the interpreter lists every module it imports on stderr, one per line.
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    assert "sdsurgeon.cli" in imported  # the listing is there
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")], f"sdsurgeon {' '.join(args)} imported torch"
    if args == ["--version"]:
        assert proc.stdout == f"sdsurgeon {VERSION}\n"


def test_the_version_of_the_package_is_the_version_of_pyproject():
    assert re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1) == VERSION


def _type_checking_names() -> set[str]:
    """The names sdsurgeon/__init__.py imports under `if TYPE_CHECKING:` (what type checkers read)."""
    tree = ast.parse((ROOT / "sdsurgeon" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    return {alias.asname or alias.name for node in block.body for alias in node.names}


def test_every_public_name_is_imported_on_first_use_from_the_module_that_defines_it():
    assert set(sdsurgeon._PUBLIC) == set(sdsurgeon.__all__) == _type_checking_names()
    namespace: dict = {}
    exec("from sdsurgeon import *", namespace)
    assert set(sdsurgeon.__all__) <= set(namespace)
    for name, where in sdsurgeon._PUBLIC.items():
        module = __import__("sdsurgeon" + where, fromlist=["_"])
        expected = module if where == "." + name else getattr(module, name)
        public = getattr(sdsurgeon, name)
        assert public is namespace[name], name
        # a function comes wrapped, so that its errors name its keywords (options.in_python): the wrapped is it
        assert getattr(public, "__wrapped__", public) is expected, name
    assert set(sdsurgeon.__all__) <= set(dir(sdsurgeon))
    with pytest.raises(AttributeError, match="no_such_name"):
        sdsurgeon.no_such_name  # noqa: B018
