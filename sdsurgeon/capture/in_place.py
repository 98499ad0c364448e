"""A module whose forward is an fx graph over its own attributes, installed on the instance: its class stays."""

from __future__ import annotations

import contextlib
import copy
import inspect
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn
from torch.package import sys_importer

from .. import _torch
from ..errors import ConfigError
from ..gate import StochasticDepth
from .torch_nn import followable

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
        self._unit_class: type | None = None  # the owner's class when _unit was decided (fully_shard changes it)
        self._unit = False  # whether a sharded owner may skip its call (see _unit_call)

    @classmethod
    def of(cls, owner: nn.Module, graph: fx.Graph, routes: tuple[str, ...] | None = None) -> GraphForward:
        code = graph.python_code(root_module="self")
        return cls(owner, graph, code.src, code.globals, routes)

    def __call__(self, *args, **kwargs):
        if not torch.compiler.is_compiling():  # compiled, every unit is called (and dynamo would guard on the flag)
            _unit(self)
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


# --- FSDP2: a unit whose every gate dropped is not called, so its weights are neither gathered nor reduced ---


def _unit(forward: GraphForward) -> bool:
    """Whether ``forward``'s owner is a sharded unit that may skip its call; decided again when its class changes."""
    if forward._unit_class is not type(forward.owner):
        forward._unit_class = type(forward.owner)
        forward._unit = _sharded(forward.owner) and _skippable(forward.owner, forward.graph)
    return forward._unit


def prepare_units(model: nn.Module, _args) -> None:
    """Forward pre-hook on an injected model: before any of its blocks runs, each sharded one learns to skip
    (FSDP2 gathers a unit's weights before its own forward, too late to decide there)."""
    if torch.compiler.is_compiling():  # a compiled model calls every block (the gates decide inside the graph)
        return
    fsdp = _fsdp_module()
    if fsdp is None or not isinstance(model, fsdp):  # sharded the usual way, the root is a unit too; else
        return  # nothing to walk on every step (a block sharded alone still learns at its first call)
    for _, module in rewritten(model):
        _unit(graph_forward(module))


def watch_units(model: nn.Module) -> None:
    """Register ``prepare_units`` on ``model`` (once)."""
    if not any(hook is prepare_units for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(prepare_units)


def unwatch_units(model: nn.Module) -> None:
    """Take ``prepare_units`` off ``model`` (fold: no graph forward is left)."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is prepare_units:
            del model._forward_pre_hooks[key]


def _fsdp_module() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule  # public since torch 2.6
    except ImportError:
        return None
    return FSDPModule


def _sharded(owner: nn.Module) -> bool:
    """Whether ``owner`` is an FSDP2 unit (``fully_shard``); its class then learns to skip dropped calls.

    FSDP2 gathers a unit's weights in a forward pre-hook, before the gates inside decide. A unit not
    called at all is neither gathered nor reduce-scattered that step (FSDP2's final backward callback
    expects that), so the decision is drawn before the call (``_unit_call``), every rank alike.
    """
    fsdp = _fsdp_module()
    if fsdp is None or not isinstance(owner, fsdp):
        return False
    gates = [m for m in owner.modules() if _is_gate(m)]
    if dist.is_available() and dist.is_initialized() and any(not g.sync_ranks for g in gates):
        own = next(c for c in type(owner).__mro__ if not issubclass(c, fsdp))  # the class FSDP2 wrapped
        raise ConfigError(f"{own.__name__} is sharded with FSDP2 and its gates draw per rank "
                          "(sync_ranks=False, --per-rank-draws): ranks would gather different units and hang; "
                          "inject with the default sync_ranks=True")
    cls = type(owner)
    if cls.__dict__.get("__call__") is not _unit_call:
        cls.__call__ = _unit_call  # FSDP2's own generated class for this module class (FSDPModule, cls)
    return True


def _is_gate(module: nn.Module) -> bool:
    return isinstance(module, StochasticDepth)


def _skippable(owner: nn.Module, graph: fx.Graph) -> bool:
    """Whether ``graph`` (the owner's, gates not looked into) reads none of the owner's parameters outside
    its gates' branches, every gate draws per batch and the graph calls each itself (none nested in another's
    branch, where a decision drawn ahead might never be used): then a call with every gate dropped needs none."""
    gates = [m for m in owner.modules() if _is_gate(m)]
    called = {id(owner.get_submodule(n.target)) for n in graph.nodes if n.op == "call_module"}
    if not gates or any(g.mode != "batch" or id(g) not in called for g in gates):
        return False
    def into_gates_only(node: fx.Node) -> bool:  # a weight read only to be handed to gates (their branches')
        return all(u.op == "call_module" and _is_gate(owner.get_submodule(u.target)) for u in node.users)

    for node in graph.nodes:
        if node.op == "get_attr" and isinstance(_resolve(owner, node.target), nn.Parameter) and not into_gates_only(node):
            return False
        if node.op == "call_module" and not _is_gate(module := owner.get_submodule(node.target)):
            if any(True for _ in module.parameters()):
                return False
    return True


def _unit_call(self: nn.Module, *args, **kwargs):
    """``__call__`` of a sharded unit running a graph forward: in training, its gates decide first; if every
    one drops and the graph reads no weight outside their branches, the graph runs without the FSDP hooks
    (no gather, no reduce-scatter, nor any other hook: the unit is absent from the step)."""
    forward = graph_forward(self)
    if forward is None or not self.training or torch.compiler.is_compiling() or not _unit(forward):
        return nn.Module.__call__(self, *args, **kwargs)
    kept = [g.draw_ahead() for g in self.modules() if _is_gate(g)]
    if any(k is None or k for k in kept):
        return nn.Module.__call__(self, *args, **kwargs)
    return forward(*args, **kwargs)


def _retrace(owner: nn.Module, fn) -> fx.Graph:
    """The graph back from generated code: every module a leaf, as torch.fx unpickles a GraphModule."""
    shell_class = type(type(owner).__name__, (nn.Module,), {"forward": fn})
    shell = shell_class.__new__(shell_class)
    shell.__dict__ = {k: v for k, v in owner.__dict__.items() if k != FORWARD}  # the same _modules, _parameters...

    class KeepModules(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return True

    with followable():  # torch.nn's input checks that the code calls are calls again, not run on proxies
        return KeepModules().trace(shell)


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
        if node.op in ("call_module", "get_attr") and not _resolves(owner, node.target):
            _place(owner, node.target, _resolve(gm, node.target))
    if routes is _KEEP:
        routes = getattr(graph_forward(owner), "routes", None)
    owner.__dict__[FORWARD] = GraphForward.of(owner, copy.deepcopy(gm.graph), routes)  # a copy: gm may be thrown away


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


def _resolves(root: nn.Module, target: str) -> bool:
    try:
        _resolve(root, target)
        return True
    except AttributeError:
        return False


def _resolve(root: nn.Module, target: str) -> Any:
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


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
