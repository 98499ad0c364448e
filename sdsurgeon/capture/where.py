"""Graph nodes and capture failures in the user's terms: their source file:line, module path and the op in words."""

from __future__ import annotations

import functools
import importlib.util
import linecache
import operator
import os
import re
import sys
import sysconfig
import traceback
from dataclasses import dataclass

import torch
import torch.fx as fx

from .._torch import is_aten_op
from ..errors import first_line

# Code that is not the user's model: torch, sdsurgeon itself, Python's standard library, generated code.
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
_SDSURGEON = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_GATE = os.path.join(_SDSURGEON, "gate") + os.sep
_STDLIB = os.path.abspath(sysconfig.get_paths()["stdlib"]) + os.sep


def _package_dir(name: str) -> str | None:
    """Where an installed package lives, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return os.path.dirname(os.path.abspath(spec.origin)) + os.sep if spec and spec.origin else None


# Packages that wrap a model's forward (transformers' hub kernels, accelerate's hooks): their frames only pass calls on.
_WRAPPERS = tuple(d for d in map(_package_dir, ("kernels", "accelerate")) if d)
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>[^\n]+)(?:\n(?P<code>[^\n]*))?')
_CODE_LIMIT = 60  # characters of a source line quoted in a message


@dataclass(frozen=True)
class Frame:
    """One line of the user's code: file, line number, function and the line's text."""

    file: str
    line: int
    function: str
    code: str = ""

    def __str__(self) -> str:
        """``mymodel.py:42 in forward (`h = self.norm(x)`)``."""
        code = re.sub(r"\s+#.*$", "", self.code.strip())  # the code, not its comment
        if len(code) > _CODE_LIMIT:
            code = code[: _CODE_LIMIT - 1].rstrip() + "…"
        return f"{os.path.basename(self.file)}:{self.line} in {self.function}" + (f" (`{code}`)" if code else "")

    def as_stack_trace(self) -> str:
        """The frame as a node's ``meta["stack_trace"]`` holds it (torch's format, which ``node_frame`` reads)."""
        return f'File "{self.file}", line {self.line}, in {self.function}\n    {self.code.strip()}'


@functools.lru_cache(maxsize=4096)
def _library(path: str) -> bool:
    path = os.path.abspath(path) if not path.startswith("<") else path
    return path.startswith(("<", _TORCH, _SDSURGEON, _STDLIB, *_WRAPPERS))


def _innermost(frames: list[Frame]) -> Frame | None:
    """The innermost frame of user code (not torch, sdsurgeon, the standard library or generated code)."""
    return next((f for f in reversed(frames) if not _library(f.file)), None)


def calling_frame() -> Frame | None:
    """The innermost frame of user code on the current stack: what a tracer records for the node it makes.

    Cheaper than torch.fx's own ``record_stack_traces`` (a whole symbolised stack per node), which doubled the
    time to trace a ResNet-110."""
    f = sys._getframe(1)
    while f is not None:
        path = f.f_code.co_filename
        if not _library(path):
            return Frame(path, f.f_lineno, f.f_code.co_name, linecache.getline(path, f.f_lineno))
        f = f.f_back
    return None


def node_frame(node: fx.Node) -> Frame | None:
    """The line of user code that made ``node``, from the stack trace the capture recorded (None without one)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    frames = [Frame(m["file"], int(m["line"]), m["name"].strip(), m["code"] or "") for m in _FRAME.finditer(trace)]
    return _innermost(frames)


def _join(part: str, path: str) -> str:
    return ".".join(p for p in (part, path) if p)


def node_scope(node: fx.Node) -> str:
    """Path of the innermost module whose code made ``node`` ("" for the captured module itself)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module" and stack and stack[-1][0] == node.target:
        stack = stack[:-1]
    return str(stack[-1][0]) if stack else ""


def _qualname(cls) -> str:
    """A class, or its name as torch.export records it ('torch.nn.modules.linear.Linear'), as one dotted name."""
    return f"{cls.__module__}.{cls.__qualname__}" if isinstance(cls, type) else str(cls)


def _class_name(node: fx.Node) -> str:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op != "call_module" or not stack or stack[-1][0] != node.target:
        return ""
    return _qualname(stack[-1][1]).rsplit(".", 1)[-1]


def _torch_layer(node: fx.Node) -> tuple[str, str] | None:
    """(path, class name) of the torch.nn layer whose own forward made an ATen-level ``node``, if it is one:
    the user wrote ``self.norm(x)``, not ``layer_norm()``."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if not stack or not _qualname(stack[-1][1]).startswith("torch.nn.modules."):
        return None
    return str(stack[-1][0]), _qualname(stack[-1][1]).rsplit(".", 1)[-1]


_OPERATORS = {operator.add: "+", operator.iadd: "+=", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
              operator.matmul: "@", operator.getitem: "indexing", operator.neg: "unary -"}


def op_words(node: fx.Node) -> str:
    """The op of ``node`` as its code spells it: ``+``, ``relu()``, ``.view()``, ``linear()`` (ATen ops by their name)."""
    target = node.target
    if node.op == "call_method":
        return f".{target}()"
    if target in _OPERATORS:
        return _OPERATORS[target]
    if is_aten_op(target):
        return f"{target.__name__.split('.')[0]}()"
    return f"{getattr(target, '__name__', str(target))}()"


def describe(node: fx.Node, part: str = "") -> str:
    """``node`` in the user's terms: what it is (a module's output, an op, an input) and where their code makes it.

    ``part``: the module path of the captured module the graph is of ("" for the whole model). Without a
    recorded stack trace the module path stands in for the source line.
    """
    if node.op == "placeholder":
        return f"the input `{node.target}`" + (f" of `{part}`" if part else "")
    if node.op == "output":
        return f"the output of `{part}`" if part else "the model's output"
    if node.op == "get_attr":
        return f"the tensor `{_join(part, str(node.target))}`"
    layer = _torch_layer(node) if node.op != "call_module" else None
    if node.op == "call_module":
        cls = _class_name(node)
        what = f"the output of `{_join(part, str(node.target))}`" + (f" ({cls})" if cls else "")
    elif layer is not None:
        what = f"the output of `{_join(part, layer[0])}` ({layer[1]})"
    else:
        what = f"the result of {op_words(node)}"
        scope = _join(part, node_scope(node))
        if scope:
            what += f" in `{scope}`"
    frame = node_frame(node)
    return f"{what} at {frame}" if frame else what


def used_by(user: fx.Node, part: str = "") -> str:
    """Where a value is also used, for "X is also used ...": at a source line, as an output, or by an op."""
    if user.op == "output":
        return f"as an output of `{part}`" if part else "as an output of the model"
    frame = node_frame(user)
    return f"at {frame}" if frame else f"by {describe(user, part)}"


# --- capture failures ------------------------------------------------------------------------------------------

DATA_DEPENDENT = "data-dependent"  # control flow or a Python number from a tensor's values
TRACED_VALUE = "control flow"  # torch.fx: Python control flow on a traced value (its values or its shape)
GATE = "gate"  # an sdsurgeon gate's own decision: folding removes it
OTHER = "other"


@dataclass(frozen=True)
class Failure:
    """Why a capture failed, in one line of the user's terms, and what kind of failure it was."""

    reason: str
    kind: str = OTHER


def _frames(exc: BaseException) -> list[Frame]:
    return [Frame(f.filename, f.lineno or 0, f.name, f.line or "") for f in traceback.extract_tb(exc.__traceback__)]


def user_frame(exc: BaseException) -> Frame | None:
    """The innermost line of the user's code in ``exc``'s traceback; else of a wrapper around it (a hub kernel's
    ``new_forward(self, *args)`` can be where tracing stops)."""
    frames = _frames(exc)
    return _innermost(frames) or next(
        (f for f in reversed(frames) if not f.file.startswith("<")
         and not os.path.abspath(f.file).startswith((_TORCH, _SDSURGEON, _STDLIB))), None)


def _in_gate(exc: BaseException) -> bool:
    """The innermost frame outside torch is an sdsurgeon gate's (a gated model's draws, not the user's code)."""
    own = [f for f in _frames(exc) if not os.path.abspath(f.file).startswith((_TORCH, _STDLIB)) and not f.file.startswith("<")]
    return bool(own) and os.path.abspath(own[-1].file).startswith(_GATE)


def explain(exc: BaseException, limit: int = 240) -> Failure:
    """``exc`` from torch.fx or torch.export in plain words, with the line of the user's code it stopped at.

    Known failures (data-dependent control flow, control flow on traced values, a gate's draw) are worded;
    any other keeps its first line, followed by the user's line where the traceback has one.
    """
    text = str(exc)
    frame = user_frame(exc)
    at = f" at {frame}" if frame else ""
    if _in_gate(exc):
        return Failure(f"an sdsurgeon gate draws whether its block runs{f' (called{at})' if at else ''}, which a "
                       "graph cannot hold in training; folding removes it", GATE)
    name = type(exc).__name__
    if name == "GuardOnDataDependentSymNode" or "data-dependent expression" in text or "data dependent" in text.lower():
        if "specialized integer" in text or "extract" in text:
            return Failure(f"a tensor's value used as a Python number{at}", DATA_DEPENDENT)
        return Failure(f"data-dependent control flow{at}: Python branches on a tensor's values", DATA_DEPENDENT)
    if name == "TraceError" and "cannot be iterated" in text:
        return Failure(f"a loop, unpacking or *args over a tensor{at}", TRACED_VALUE)
    if name == "TraceError" and "inputs to control flow" in text:
        return Failure(f"Python control flow on a tensor (its values or its shape){at}", TRACED_VALUE)
    line = first_line(exc)
    if len(line) > limit:
        line = line[: limit - 1].rstrip() + "…"
    return Failure(f"{line}{at}")
