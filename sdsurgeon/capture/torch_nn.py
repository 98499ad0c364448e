"""torch.nn's own composites (its transformer layers and stacks) as tracing follows them: like user code.

torch.fx takes every torch.nn module for a leaf, which hides the residual adds of ``nn.TransformerEncoderLayer``
(``x + self._sa_block(...)``) and its kin: the most common hand-written transformer had no blocks. The rule
here: a torch.nn module that *calls* its child modules is a composite and is traced into, like user code; one
that only reads its children's weights (``nn.MultiheadAttention`` computes with ``out_proj.weight``) or has none
stays a leaf. Two things keep these composites traceable, while tracing only (``followable``): their fast path
is off (``torch.backends.mha``: the fused op that bypasses the children; train mode never takes it, eval may),
and the Python checks they run on masks and inputs (``if src.is_nested``) are recorded as calls, run at run
time. A stack that could still bypass gated layers at run time (the encoder's nested-tensor path) is told not
to (``call_children_always``).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
from typing import Callable, Iterator

import torch
import torch.fx as fx
from torch import nn

from .. import _torch

_CALLED = re.compile(r"\bself\.(\w+)\s*\(|\bin\s+self\.(\w+)\b")  # self.norm1(x), for mod in self.layers


@functools.lru_cache(maxsize=None)
def _called_attributes(cls: type) -> frozenset[str]:
    """Attributes that the methods torch.nn defines for ``cls`` call or loop over (read from their source)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass in (nn.Module, object) or not klass.__module__.startswith("torch.nn"):
            continue
        for value in vars(klass).values():
            if inspect.isfunction(value):
                try:
                    source = inspect.getsource(value)
                except (OSError, TypeError):  # no source shipped: such a class stays a leaf
                    continue
                names.update(a or b for a, b in _CALLED.findall(source))
    return frozenset(names)


def is_composite(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch.nn's own modules that calls its children (then tracing goes in)."""
    cls = type(module)
    if not cls.__module__.startswith("torch.nn") or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    return bool(set(module._modules) & _called_attributes(cls))


def _recorded(fn: Callable) -> Callable:
    """``fn`` traced where it can be (``_canonical_mask(None, ..., target_type=x.dtype)`` is None, no node), and
    otherwise a call in the graph, run at run time, instead of a Python ``if`` on a proxy."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        proxy = next((v for v in (*args, *kwargs.values()) if isinstance(v, fx.Proxy)), None)
        if proxy is None:
            return fn(*args, **kwargs)
        graph = proxy.tracer.graph
        before = set(graph.nodes)
        try:
            return fn(*args, **kwargs)
        except Exception:  # it branched on a proxy (TraceError) or checked its type: a call, then
            for node in reversed([n for n in graph.nodes if n not in before]):
                graph.erase_node(node)  # what it traced before failing
        return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

    return call


@contextlib.contextmanager
def followable() -> Iterator[None]:
    """While tracing: torch.nn's transformer layers take the path that calls their children, and their checks of
    masks and inputs become calls in the graph. Process-wide while it lasts (as torch.fx's own patches are)."""
    fast = torch.backends.mha.get_fastpath_enabled()
    patched = []
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for owner, name in _torch.transformer_input_checks():
            original = getattr(owner, name)
            setattr(owner, name, _recorded(original))
            patched.append((owner, name, original))
        yield
    finally:
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
        torch.backends.mha.set_fastpath_enabled(fast)


def call_children_always(module: nn.Module) -> None:
    """Keep a torch.nn stack from bypassing its layers' forward at run time: ``nn.TransformerEncoder`` in eval with
    a padding mask packs its input into a nested tensor for the layers' fused path, which gated layers (run as
    graphs) do not take. Its fast path is an optimisation: switched off, it computes the same."""
    if isinstance(module, nn.TransformerEncoder):
        module.use_nested_tensor = False
