"""Putting rewritten graphs into the user's modules: a forward that is an fx graph over the module's own attributes,
installed on the instance, so its class, methods and hooks stay."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.package import sys_importer

from .. import _torch
from ..attrs import resolve, resolves
from ..capture.torch_nn import followable
from ..distributed import Unit
from ..gate import StochasticDepth

FORWARD = "forward"


class GraphForward:
    """The callable that stands for ``owner.forward``: runs a graph's generated code with ``self = owner``.

    It lives in the owner's ``__dict__`` (``nn.Module.__call__`` finds it before the class's
    forward), so the owner keeps its class, its other methods and its hooks; the graph reads the
    owner's own submodules, parameters and buffers by name, so ``.to()``, ``load_state_dict`` and
    FSDP act on what the graph runs. It pickles as generated source (as a GraphModule does); the
    graph is traced back from that source the first time a pass asks for it.
    """

    def __init__(self, owner: nn.Module, graph: fx.Graph | None, src: str, globals_: dict[str, Any],
                 routes: tuple[str, ...] | None = None) -> None:
        self.owner = owner
        self._graph = graph
        self.src = src
        self._globals = {k: v for k, v in globals_.items() if not k.startswith("__")}
        self._fn = _torch.forward_from_src(src, self._globals)
        # where keywords the graph does not name go (a forward taking **kwargs passes them to these
        # modules: capture.call_trace); None: nowhere, Python refuses them as for any function
        self.routes = routes
        self._names = frozenset(list(inspect.signature(self._fn).parameters)[1:])
        # its standing as an FSDP2 unit (distributed.Unit: a sharded owner whose gates all drop is not called)
        self.unit = Unit(owner, lambda: self.graph, _is_gate)

    @classmethod
    def of(cls, owner: nn.Module, graph: fx.Graph, routes: tuple[str, ...] | None = None) -> GraphForward:
        code = graph.python_code(root_module="self")
        return cls(owner, graph, code.src, code.globals, routes)

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling():  # compiled, every unit is called (and dynamo would guard on the flag)
            self.unit.skippable()
        if self.routes is None or kwargs.keys() <= self._names:
            return self._fn(self.owner, *args, **kwargs)
        others = {k: kwargs.pop(k) for k in list(kwargs) if k not in self._names}
        with _passed_on([self.owner.get_submodule(r) for r in self.routes], others):
            return self._fn(self.owner, *args, **kwargs)

    @property
    def graph(self) -> fx.Graph:
        if self._graph is None:
            self._graph = _retrace(self.owner, self._fn)
        return self._graph

    @property
    def code(self) -> str:
        return self.src

    def __reduce__(self):
        # as a GraphModule pickles: its code and the imports that code needs, never the graph itself
        return (_rebuild, (self.owner, self.src, _torch.format_import_block(self._globals, sys_importer), self.routes))

    def __repr__(self) -> str:
        return f"GraphForward({type(self.owner).__name__})"


def _rebuild(owner: nn.Module, src: str, import_block: str, routes: tuple[str, ...] | None = None) -> GraphForward:
    namespace: dict[str, Any] = {}
    exec(compile(import_block, "<sdsurgeon graph imports>", "exec"), namespace)
    return GraphForward(owner, None, src, namespace, routes)


@contextlib.contextmanager
def _passed_on(modules: list[nn.Module], keywords: dict[str, Any]) -> Iterator[None]:
    """``keywords`` added to every call of ``modules`` for the block: as the class's code passes its **kwargs on."""
    def add(_module, args, kwargs):
        return args, {**kwargs, **keywords}

    handles = [m.register_forward_pre_hook(add, with_kwargs=True) for m in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _is_gate(module: nn.Module) -> bool:
    return isinstance(module, StochasticDepth)


def _retrace(owner: nn.Module, fn) -> fx.Graph:
    """The graph back from generated code: every module a leaf, as torch.fx unpickles a GraphModule. The owner's
    ``training`` flag, read at run time by dropouts that follow the mode (``capture.fx._follow_mode``), is read
    again, not the mode it has now."""

    class KeepModules(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return True

    tracer = KeepModules()
    flag = property(lambda self: tracer.create_proxy("get_attr", "training", (), {}))
    shell_class = type(type(owner).__name__, (nn.Module,), {"forward": fn, "training": flag})
    shell = shell_class.__new__(shell_class)
    shell.__dict__ = {k: v for k, v in owner.__dict__.items() if k not in (FORWARD, "training")}  # the same _modules...
    with followable():  # torch.nn's input checks that the code calls are calls again, not run on proxies
        return tracer.trace(shell)


def graph_forward(module: nn.Module) -> GraphForward | None:
    """The graph forward installed on ``module``, if any."""
    found = module.__dict__.get(FORWARD)
    return found if isinstance(found, GraphForward) else None


def rewritten(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module of ``model`` that runs an installed graph forward."""
    return [(path, m) for path, m in model.named_modules() if graph_forward(m) is not None]


_KEEP = object()


def install(owner: nn.Module, gm: fx.GraphModule, routes: tuple[str, ...] | None | object = _KEEP) -> None:
    """Make ``owner`` run ``gm``'s graph as its forward; ``gm`` must have been traced from ``owner``.
    ``routes``: see GraphForward (by default those of the graph forward ``owner`` runs now, if any).

    What the graph reads that ``owner`` lacks (modules a pass added, such as gates, or constants
    the trace made) moves onto ``owner``: modules as children, tensors as non-persistent buffers,
    so the state_dict keeps its keys.
    """
    for name, child in gm.named_children():  # gates, read from the graph or from an outer gate's branch
        if name not in owner._modules:
            owner.add_module(name, child)
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr") and not resolves(owner, node.target):
            _place(owner, node.target, resolve(gm, node.target))
    if routes is _KEEP:
        routes = getattr(graph_forward(owner), "routes", None)
    owner.__dict__[FORWARD] = GraphForward.of(owner, copy.deepcopy(gm.graph), routes)  # a copy: gm may be thrown away


def replace(root: nn.Module, path: str, gm: fx.GraphModule) -> nn.Module:
    """Put a rewritten ATen part (a torch.export capture, rewritten whole) where its module was; returns the
    model, which is ``gm`` itself when the part is the root."""
    if not path:
        return gm
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, gm)
    return root


def uninstall(owner: nn.Module, added: tuple[str, ...] = ()) -> None:
    """Give ``owner`` its class's forward back, and drop the children named in ``added``."""
    owner.__dict__.pop(FORWARD, None)
    for name in added:
        if name in owner._modules:
            del owner._modules[name]


def view(owner: nn.Module) -> fx.GraphModule:
    """A GraphModule over ``owner``'s installed graph (a copy) that shares ``owner``'s very module,
    parameter and buffer dicts: a pass that adds a module or buffer to it adds it to ``owner``.
    Install the view back (``install``) once the pass is done. The view itself is transient: a
    copy or pickle of it is no longer a view."""
    found = graph_forward(owner)
    if found is None:
        raise ValueError(f"{type(owner).__name__} has no graph forward installed")
    gm = fx.GraphModule(nn.Module(), fx.Graph(), class_name=type(owner).__name__)
    for slot in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
        gm.__dict__[slot] = owner.__dict__[slot]
    gm.training = owner.training
    gm.graph = copy.deepcopy(found.graph)
    return gm


def _place(owner: nn.Module, target: str, value: Any) -> None:
    *prefix, name = target.split(".")
    holder = owner
    for atom in prefix:
        if not hasattr(holder, atom):
            holder.add_module(atom, nn.Module())
        holder = getattr(holder, atom)
    if isinstance(value, nn.Module):
        holder.add_module(name, value)
    elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        holder.register_buffer(name, value, persistent=False)
    else:
        setattr(holder, name, value)
