"""torch's private names live behind one door (sdsurgeon/_torch.py; the cond patch keeps its own fence): each is
there on the torch this tier runs, none is read when sdsurgeon is imported, and a missing one fails in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdsurgeon import _torch
from sdsurgeon.errors import MissingDependencyError

PACKAGE = Path(__file__).resolve().parent.parent / "sdsurgeon"
FENCED = {"_torch.py", "cond_backward.py"}
# `torch._x`, `from torch._x`, `from torch.a import _x`, torch.utils._pytree, `._schema`, aten's private ops
PRIVATE = re.compile(r"torch\._[a-zA-Z]|from torch[\w.]* import .*\b_[a-zA-Z]|_pytree|\._schema\b|_aten\._[a-z]"
                     r"|nn\.modules\.\w+\._[A-Z]")


def test_the_running_torch_has_every_private_name_sdsurgeon_uses():
    assert _torch.missing() == [], f"torch {torch.__version__}: update sdsurgeon/_torch.py"


def test_no_module_outside_the_fenced_two_names_a_private_torch_name():
    found = [f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if path.name not in FENCED
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if PRIVATE.search(line.split("#")[0])]
    assert found == []


def test_the_pattern_sees_each_kind_of_private_name():
    for line in ("x = torch._C._current_graph_task_id()", "from torch.fx.graph_module import _forward_from_src",
                 "from torch.utils import _pytree", "op._schema.is_mutable", "_aten._unsafe_view.default",
                 "isinstance(m, nn.modules.batchnorm._BatchNorm)", "import torch._dynamo"):
        assert PRIVATE.search(line), line
    assert not PRIVATE.search("from torch.fx import GraphModule")


def test_a_missing_name_fails_at_use_in_one_line_naming_it_and_the_versions_tested(monkeypatch):
    import torch.fx.graph_module as graph_module

    monkeypatch.delattr(graph_module, "_forward_from_src")
    assert "torch.fx.graph_module._forward_from_src" in _torch.missing()
    with pytest.raises(MissingDependencyError) as raised:
        _torch.forward_from_src("def forward(self):\n    return 1\n", {})
    message = str(raised.value)
    assert "\n" not in message and "_forward_from_src" in message and _torch.TESTED in message


def test_missing_base_classes_fall_back_to_the_public_ones(monkeypatch):
    import torch.nn.modules.batchnorm as batchnorm

    monkeypatch.delattr(batchnorm, "_BatchNorm")
    classes = _torch.batch_norm_classes()
    assert torch.nn.BatchNorm2d in classes and torch.nn.SyncBatchNorm in classes


@pytest.mark.multiprocess
def test_sdsurgeon_imports_and_plans_where_every_private_name_is_missing():
    # _torch's lookup answers "absent" for every name before any other module of sdsurgeon is imported (the grep
    # above keeps the others from reading a private name themselves): each module imports, and a plan of a small
    # ResNet (public fallback classes) still finds its blocks.
    code = f"""
import importlib, pkgutil, sys
from sdsurgeon import _torch
_torch._lookup = lambda module, name: _torch._ABSENT
import sdsurgeon
for info in pkgutil.walk_packages(sdsurgeon.__path__, "sdsurgeon."):
    if not info.name.endswith("__main__"):
        importlib.import_module(info.name)
sys.path.insert(0, {str(Path(__file__).parent)!r})
import archs
plan = sdsurgeon.plan(archs.tiny_resnet(), 0.5)
assert plan.num_sites > 0, plan
print("ok", len(_torch.missing()))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["ok", str(len(_torch.PRIVATE))]
