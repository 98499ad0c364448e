"""nn.Module -> fx.GraphModule: torch.fx tracing with leaf control and a partial-capture fallback."""

from __future__ import annotations

import contextlib
import copy
import enum
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.node import has_side_effect

from .. import _torch
from ..capture.drop_path import find_drop_paths, leaf_classes, restore_calls
from ..capture.graph_facts import dead_nodes, shape_only_nodes, size_free
from ..capture.torch_export import at_least_two, cache_off, check_train_eval, export_graph, train_only
from ..choices import CAPTURES as CAPTURE_METHODS  # named there, for options.py and --help
from ..errors import CaptureError, ConfigError, SpecializedCallError
from .inputs import ExampleInputs, normalize_inputs
from .torch_nn import followable, is_composite
from .where import calling_frame, explain

# User module classes that torch.fx must not trace into (see register_leaf and --leaf).
LEAF_REGISTRY: set[type] = set()



def register_leaf(cls: type) -> type:
    """Mark a module class as opaque to tracing (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"register_leaf expects an nn.Module subclass, got {cls!r}")
    LEAF_REGISTRY.add(cls)
    return cls


@dataclass
class CapturedPart:
    """One traced module: ``path`` is where it sits in the model ("" is the whole model)."""

    path: str
    gm: fx.GraphModule


@dataclass(frozen=True)
class UntracedPart:
    """A module whose own forward could not be traced (its children may have been)."""

    path: str
    reason: str  # in the user's terms: what stopped the trace, at which line of their code (see capture.where)


@dataclass
class Capture:
    """The result of capturing a model: traced parts in module order, and what could not be traced."""

    method: str
    parts: list[CapturedPart]
    untraced: list[UntracedPart] = field(default_factory=list)
    total_flops: int | None = None  # whole-model forward FLOPs, once annotate() has run


class _Traced(enum.Enum):
    """A value a trace computed (a graph node), where a module's recorded call has no constant."""

    VALUE = "traced"


TRACED = _Traced.VALUE
# GraphModule.meta key: module path -> (args, kwargs) of its first call in the trace, TRACED for traced values.
CALLS = "sdsurgeon_calls"


@has_side_effect  # a check: graph passes must keep it though nothing reads its result
def expect_decided(value, decided: bool, where: str) -> None:
    """Raise unless a condition on tensors' dtypes, devices and ranks alone comes out as the trace decided it on
    the recorded call (``_LeafTracer.to_bool``): a graph node, run on every call."""
    if isinstance(value, fx.Proxy):  # the graph traced back from its code (surgery.install): the check stays a node
        return value.tracer.create_proxy("call_function", expect_decided, (value, decided, where), {})
    got = bool(value)
    if got != decided:
        raise SpecializedCallError(
            f"the rewritten forward was traced where {where} gave {decided!r} (on the example inputs) and this call "
            f"gives {got!r}; re-run inject with example inputs of this dtype, device or rank"
        )


class _LeafTracer(fx.Tracer):
    """torch.fx tracer whose leaves are torch.nn layers (not its composites: ``capture.torch_nn``), registered
    and named user classes, and the modules (by path) that decide something on ``self.training`` (see ``trace``).

    With ``values`` (the recorded call's value of each placeholder, ``capture.call_trace``) it decides a condition
    torch.fx cannot take where the answer depends only on what every call of a model shares, tensors' dtypes,
    devices and ranks (``graph_facts.size_free``: ``if h.dtype == torch.float16``): the graph traced so far runs on
    those values (each node once per trace), and a guard node (``expect_decided``) raises on a call that decides
    otherwise. Conditions on sizes are never decided (a decoder's next-token call has length 1), nor on tensors'
    contents: the trace then fails as torch.fx's does."""

    def __init__(self, leaf_names: frozenset[str] = frozenset(), leaf_paths: frozenset[str] = frozenset(),
                 values: dict | None = None) -> None:
        super().__init__()  # no arguments needed: GraphModule unpickling builds one bare
        self.leaf_names = leaf_names
        self.leaf_paths = leaf_paths
        self.calls: dict[str, tuple[tuple, dict]] = {}
        self.values = values
        self._env: dict[fx.Node, object] = {}  # node -> its value on the recorded call, as far as one was needed
        self._evaluating = False  # the graph runs on real values: modules and attributes are themselves

    def to_bool(self, obj: fx.Proxy) -> bool:
        return self._decide(obj) if self._decidable(obj.node) else super().to_bool(obj)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def _decidable(self, node: fx.Node) -> bool:
        placeholders = [n.target for n in self.graph.nodes if n.op == "placeholder"]
        return self.values is not None and all(p in self.values for p in placeholders) and size_free(node)

    def _decide(self, obj: fx.Proxy) -> bool:
        decided = bool(self._evaluate(obj.node))
        frame = calling_frame()
        where = f"`{frame.code.strip()}` ({frame.file.rsplit('/', 1)[-1]}:{frame.line})" if frame else str(obj.node)
        self.create_proxy("call_function", expect_decided, (obj, decided, where), {})
        return decided

    def _evaluate(self, node: fx.Node):
        """``node``'s value on the recorded call: the graph so far run on it (each node once per trace; a copy of
        each tensor argument, so that nothing the graph writes in place reaches the call; the RNG left as it was)."""
        interpreter = fx.Interpreter(self.root, garbage_collect_values=False, graph=self.graph)
        interpreter.env = self._env
        copied = lambda v: v.clone() if isinstance(v, torch.Tensor) else v
        devices = sorted({t.device.index or 0 for t in _torch.tree_leaves(self.values)
                          if isinstance(t, torch.Tensor) and t.is_cuda})
        self._evaluating = True
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                for n in self.graph.nodes:
                    if n not in self._env:
                        self._env[n] = (_torch.tree_map(copied, self.values[n.target]) if n.op == "placeholder"
                                        else interpreter.run_node(n))
                    if n is node:
                        break
        finally:
            self._evaluating = False
        return self._env[node]

    user_lines = False  # record on each node the line of user code that made it (where.calling_frame)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None) -> fx.Node:
        if name is None and target == "self":  # a child named `self` (DeBERTa's attention): its value would be
            name = "self_module"  # a local named self in the generated forward, shadowing the module itself
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if self.user_lines:
            frame = calling_frame()
            if frame is not None:
                node.meta["stack_trace"] = frame.as_stack_trace()
        return node

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if self._evaluating:
            return forward(*args, **kwargs)
        # what each module was called with, constants kept and traced values marked: traced alone later (the
        # owner of a residual add), its None and flag arguments are fixed to these (analysis.owners)
        path = self.path_of_module(m)
        if path not in self.calls:
            mark = lambda v: TRACED if isinstance(v, fx.Proxy) else v
            self.calls[path] = (tuple(mark(a) for a in args), {k: mark(v) for k, v in kwargs.items()})
        return super().call_module(m, forward, args, kwargs)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        cls = type(m)
        if cls in LEAF_REGISTRY or _class_matches(cls, self.leaf_names) or module_qualified_name in self.leaf_paths:
            return True
        return super().is_leaf_module(m, module_qualified_name) and not is_composite(m)


def _class_matches(cls: type, names: frozenset[str]) -> bool:
    return cls.__name__ in names or f"{cls.__module__}.{cls.__qualname__}" in names


def is_default_leaf(m: nn.Module) -> bool:
    """Whether tracing calls ``m`` rather than going into it, user leaves aside: torch.nn's layers."""
    return fx.Tracer().is_leaf_module(m, "") and not is_composite(m)


def faithful_graph_module(root: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """A GraphModule running ``graph`` that keeps root's whole module tree.

    fx.GraphModule copies only what the graph references, which drops unused children and
    parameters; we keep root's own dicts so the state_dict has the original keys, in order.
    """
    gm = fx.GraphModule(root, graph, class_name=type(root).__name__)
    for slot in ("_modules", "_parameters", "_buffers"):
        merged = OrderedDict(getattr(root, slot))
        for name, value in getattr(gm, slot).items():
            merged.setdefault(name, value)
        gm.__dict__[slot] = merged
    gm.__dict__["_non_persistent_buffers_set"] = set(root._non_persistent_buffers_set)
    gm.training = root.training
    return gm


class ModeDependentForward(Exception):
    """A module's own forward computes something else in train than in eval mode, which tracing would freeze."""


# Rounds of "trace both modes, make the modules that differ leaves": one per nesting level of such modules.
_MODE_ROUNDS = 4


def trace(module: nn.Module, leaves: Iterable[str] = (), leaf_paths: Iterable[str] = (),
          values: dict | None = None) -> fx.GraphModule:
    """Trace one module with torch.fx so that the graph still switches train/eval; leaves no state on it.

    torch.fx runs the Python of ``forward``, so an ``if self.training`` is decided once, at trace time
    (timm's BatchNormAct2d picks batch statistics that way). The module is therefore traced in train
    and in eval mode: a functional dropout on in one and off in the other reads the module's flag at
    run time (``_follow_mode``); every submodule whose own ops still differ between the two becomes a
    leaf, called at run time where it decides for itself, and tracing repeats. If ``module``'s own ops
    differ there is nothing to isolate: ModeDependentForward (callers then capture its children instead).
    ``values``: see ``_LeafTracer``. Raises whatever tracing raises otherwise.
    """
    leaf_names, leaf_paths = frozenset(leaves), frozenset(leaf_paths)
    for _ in range(_MODE_ROUNDS):
        train, eval_ = (_trace_in_mode(module, mode, leaf_names, leaf_paths, values) for mode in (True, False))
        _follow_mode(train, eval_)
        differing = _mode_dependent_scopes(train, eval_)
        if not differing:
            gm = faithful_graph_module(module, train)
            gm.meta[CALLS] = train._sdsurgeon_calls
            return gm
        if "" in differing:
            break
        leaf_paths |= differing
    raise ModeDependentForward(
        f"{type(module).__name__}.forward computes something else in train than in eval mode (it decides on "
        "self.training in Python), which torch.fx would freeze"
    )


def trace_as_part(module: nn.Module, leaves: Iterable[str], leaf_paths: Iterable[str]) -> fx.GraphModule:
    """``trace`` in one mode, for a module inside a part ``trace`` already captured: ``leaf_paths`` (relative
    to ``module``) are the modules that trace called there, those deciding on ``self.training`` among them,
    so the train and eval graphs of ``module`` are known to agree, but for the dropouts that follow the mode
    (traced in eval too where there is one)."""
    leaf_names, leaf_paths = frozenset(leaves), frozenset(leaf_paths)
    graph = _trace_in_mode(module, True, leaf_names, leaf_paths)
    if any(_mode_flag(n) is not None for n in graph.nodes):
        _follow_mode(graph, _trace_in_mode(module, False, leaf_names, leaf_paths))
    return faithful_graph_module(module, graph)


# Functional dropouts: (input, p, training) by position or by name.
_DROPOUTS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout})
_SDPA_DROPOUT = ("dropout_p", 4)  # F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)


def _argument(n: fx.Node, name: str, index: int):
    return n.kwargs[name] if name in n.kwargs else n.args[index] if len(n.args) > index else None


def _set_argument(n: fx.Node, name: str, index: int, value) -> None:
    if name in n.kwargs or len(n.args) <= index:
        n.update_kwarg(name, value)
    else:
        n.update_arg(index, value)


def _mode_flag(n: fx.Node) -> tuple[str, int] | None:
    """Where a call's train-only behaviour is set: a functional dropout's ``training`` flag, attention's dropout rate."""
    if n.op != "call_function":
        return None
    if n.target in _DROPOUTS:
        return "training", 2
    return _SDPA_DROPOUT if n.target is F.scaled_dot_product_attention else None


def _follow_mode(train: fx.Graph, eval_: fx.Graph) -> None:
    """Make the train-mode-only calls of two traces of one module (the same nodes in the same order, each traced
    in its mode) read the traced module's ``training`` flag at run time, in both graphs alike.

    A functional dropout called with ``training=self.training`` (transformers' layers) is traced with True in
    train and False in eval; attention's dropout rate with ``0.0 if not self.training else rate``. Each such
    pair takes the train trace's rate and the module's flag: in train that is the train trace's call, in eval
    a dropout off (the identity whatever its rate) or a rate of 0, as the eval trace's. A flag the same in both
    (dropout always on) stays a constant. The flag read is the traced module's own (``model.train()`` and
    ``eval()`` set every module's alike; the ATen front-end reads its graph's, ``torch_export``)."""
    a, b = list(train.nodes), list(eval_.nodes)
    if len(a) != len(b):
        return  # they differ anyway (_mode_dependent_scopes)
    flags: dict[fx.Graph, fx.Node] = {}

    def flag_of(graph: fx.Graph) -> fx.Node:
        if graph not in flags:
            placeholders = [n for n in graph.nodes if n.op == "placeholder"]
            with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before():
                flags[graph] = graph.create_node("get_attr", "training", name="training")
        return flags[graph]

    for m, n in zip(a, b):
        where = _mode_flag(m)
        if where is None or n.op != m.op or n.target is not m.target:
            continue
        on, off = _argument(m, *where), _argument(n, *where)
        if m.target in _DROPOUTS:
            if on is True and off is False:
                _set_argument(n, "p", 1, _argument(m, "p", 1))
                for node, graph in ((m, train), (n, eval_)):
                    _set_argument(node, *where, flag_of(graph))
        elif isinstance(on, float) and on > 0 and off == 0:
            for node, graph in ((m, train), (n, eval_)):
                with graph.inserting_before(node):
                    _set_argument(node, *where, graph.call_function(train_only, (flag_of(graph), on)))


def trace_eval(module: nn.Module) -> fx.GraphModule:
    """``module``'s eval-mode function as a graph (no train/eval check: for passes that work in eval, as fold)."""
    return fx.GraphModule(module, _trace_in_mode(module, False, frozenset(), frozenset()))


def _trace_in_mode(module: nn.Module, training: bool, leaf_names: frozenset[str], leaf_paths: frozenset[str],
                   values: dict | None = None) -> fx.Graph:
    with untouched(module), followable():
        for m in module.modules():
            m.training = training
        tracer = _LeafTracer(leaf_names, leaf_paths, values)
        # The train-mode graph is the one kept: its nodes remember the user's source line (messages name it).
        tracer.user_lines = training
        graph = tracer.trace(module)
        graph._sdsurgeon_calls = tracer.calls  # read by trace(): the graph module's meta[CALLS]
        return graph


def _untraced(path: str, exc: BaseException) -> UntracedPart:
    """Why ``path`` did not trace, in the user's terms (our own errors already are)."""
    if isinstance(exc, (CaptureError, ModeDependentForward)):
        return UntracedPart(path, str(exc))
    return UntracedPart(path, explain(exc).reason)


_PROXY_TEXT = re.compile(r"Proxy\(\w+\)")  # node names inside traced strings (assert messages) may differ


def _signature(value):
    """A node argument with the nodes themselves left out: ops and constants, not wiring."""
    if isinstance(value, fx.Node):
        return "%"
    if isinstance(value, (tuple, list)):
        return type(value)(_signature(v) for v in value)
    if isinstance(value, dict):
        return tuple((k, _signature(v)) for k, v in value.items())
    if isinstance(value, str):
        return _PROXY_TEXT.sub("Proxy()", value)
    if isinstance(value, (int, float, bool, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)):
        return value
    return repr(type(value))


def _scope(node: fx.Node) -> str:
    """Path of the module whose own code made ``node`` ("" for the traced module itself)."""
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    if node.op == "call_module" and stack and stack[-1][0] == node.target:
        stack = stack[:-1]  # a leaf call belongs to the module calling it
    return stack[-1][0] if stack else ""


def op_names(gm: fx.GraphModule, names: Iterable[str], prefix: str = "") -> list[tuple[str, str]]:
    """Each named node of ``gm`` that computes on values (reads of shapes and attributes left out) as its op and
    target, module paths with ``prefix`` taken off: what two traces of one region that took the same path agree
    on, whether an argument was a constant or a placeholder."""
    shape_only = shape_only_nodes(gm.graph.nodes)
    nodes = {n.name: n for n in gm.graph.nodes if n not in shape_only}

    def target(n: fx.Node) -> str:
        if n.op in ("call_module", "get_attr") and n.target.startswith(prefix):
            return n.target[len(prefix):]
        return _target_name(n.target)

    return [(nodes[name].op, target(nodes[name])) for name in names if name in nodes]


def _mode_dependent_scopes(train: fx.Graph, eval_: fx.Graph) -> set[str]:
    """Modules whose own ops or constants differ between a train-mode and an eval-mode trace.

    Wiring alone differing (``return a if self.training else b``) cannot be pinned on a submodule:
    it is blamed on the traced module itself ("").
    """
    def by_scope(graph: fx.Graph) -> dict[str, list]:
        ops: dict[str, list] = {}
        for n in live[graph]:
            ops.setdefault(_scope(n), []).append((n.op, _target_name(n.target), _signature(n.args), _signature(n.kwargs)))
        return ops

    # Dead values differ freely: fx records an attribute such as x.device only once something reads it.
    live = {g: [n for n in g.nodes if n not in dead] for g in (train, eval_) for dead in [dead_nodes(list(g.nodes))]}
    a, b = by_scope(train), by_scope(eval_)
    differing = {scope for scope in a.keys() | b.keys() if a.get(scope) != b.get(scope)}
    if not differing and _wiring(live[train]) != _wiring(live[eval_]):
        return {""}
    # The innermost first: once they are leaves, a module around them may well trace the same in both modes.
    return {s for s in differing if not any(d != s and (not s or d.startswith(f"{s}.")) for d in differing)}


def _target_name(target) -> str:
    return target if isinstance(target, str) else f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', target)}"


def _wiring(nodes: list[fx.Node]) -> list:
    index = {n: i for i, n in enumerate(nodes)}
    return [[index[i] for i in n.all_input_nodes] for n in nodes]


_MODULE_SLOTS = ("_modules", "_parameters", "_buffers")


@contextlib.contextmanager
def untouched(model: nn.Module) -> Iterator[None]:
    """Put back whatever a block changed on ``model``'s modules: attributes, the contents of their
    dicts, lists and sets (caches filled while tracing hold proxies), and buffer values.

    Tracing runs the model's Python on proxies: timm's LeViT, traced in eval mode, stores a Proxy in its
    own ``attention_bias_cache``, and a forward that counts batches in Python moves a buffer.
    """
    modules = list(model.modules())
    attributes = [(m, dict(m.__dict__)) for m in modules]
    containers = [(v, copy.copy(v)) for _, d in attributes for v in d.values() if type(v) in (dict, OrderedDict, list, set)]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        for m, d in attributes:
            m.__dict__.clear()
            m.__dict__.update(d)
        for value, saved in containers:
            if isinstance(value, list):
                value[:] = saved
            else:
                value.clear()
                value.update(saved)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape and not torch.equal(b, saved):
                    b.copy_(saved)


def capture(model: nn.Module, *, leaves: Iterable[str] = (), method: str = "auto", example_inputs=None) -> Capture:
    """Capture ``model`` as graphs without modifying it.

    ``fx``: torch.fx traces the whole model if it can; otherwise the largest traceable submodules
    are captured (top-down) and every module whose own forward failed is listed with the reason.
    ``export``: torch.export captures the whole model on ``example_inputs`` at the ATen level (see
    export_capture). ``auto``: fx if it traces the whole model, else export when example inputs
    are given and it succeeds, else fx's partial capture. The parts share modules with ``model``:
    copy the model first to change them independently.
    """
    if method not in CAPTURE_METHODS:
        raise ConfigError(f"unknown capture method {method!r}; use one of: {', '.join(CAPTURE_METHODS)}")
    inputs = normalize_inputs(example_inputs)
    if method == "export":
        if inputs is None:
            raise ConfigError("--capture export runs the model: give example inputs with --input-shape or --input")
        return _export(model, inputs)
    # Drop paths still dropping (kept by the user) stay modules, deciding train/eval at run time.
    leaves = frozenset(leaves) | set(leaf_classes([d for d in find_drop_paths(model) if d.rate > 0]))
    if not isinstance(model, (nn.ModuleList, nn.ModuleDict)):
        try:
            gm = trace(model, leaves)
            if inputs is not None:  # what the trace specialised on, seen on the inputs the user gave
                with untouched(model):
                    check_train_eval(model, gm, *at_least_two(inputs), front_end="fx")
            return Capture("fx", [CapturedPart("", gm)])
        except Exception as exc:  # any tracing failure: try torch.export, then the children
            root_failure = _untraced("", exc)
    else:
        root_failure = None
    export_failure = None
    if method == "auto" and inputs is not None:
        try:
            return _export(model, inputs)
        except CaptureError as exc:  # without its advice: the combined message below advises
            export_failure = UntracedPart("", exc.what or str(exc))
    cap = _partial_fx(model, leaves, root_failure)
    if export_failure:
        cap.untraced.insert(1 if root_failure else 0, export_failure)
    if not cap.parts:
        fx_reason = cap.untraced[0].reason if cap.untraced else "no traceable module"
        tried = f"torch.fx: {fx_reason}" + (f"; {export_failure.reason}" if export_failure else "")
        hint = "" if inputs is not None or method == "fx" else ", or give --input so torch.export can capture it"
        raise CaptureError(
            f"could not capture any part of {type(model).__name__} ({tried}); mark the module that fails as "
            f"opaque with --leaf CLASSNAME, try --capture fx|export, or another input spec{hint}"
        )
    return cap


def _export(model: nn.Module, inputs: "ExampleInputs") -> Capture:

    args, kwargs = at_least_two(inputs)
    with untouched(model), cache_off(model):
        gm = export_graph(model, args, kwargs)
        restore_calls(gm, model, [d for d in find_drop_paths(model) if d.rate > 0])
        check_train_eval(model, gm, args, kwargs)
    return Capture("export", [CapturedPart("", gm)])


def export_failure_of(model: nn.Module, example_inputs, *, training: bool = False) -> UntracedPart | None:
    """Why torch.export (strict=False) cannot capture the whole ``model`` on the example inputs in ``training``
    mode, or None where it can: what ONNX export (torch.onnx's dynamo exporter, in eval mode) needs first."""
    args, kwargs = at_least_two(normalize_inputs(example_inputs))
    with untouched(model), cache_off(model):
        try:
            export_graph(model, args, kwargs, training=training)
        except CaptureError as exc:
            return UntracedPart("", exc.what or str(exc))
    return None


def eval_trace_failure(model: nn.Module, leaves: Iterable[str] = ()) -> UntracedPart | None:
    """Why torch.fx cannot trace the whole ``model`` in eval mode with ``leaves`` (class names) kept opaque,
    or None where it can."""
    try:
        _trace_in_mode(model, False, frozenset(leaves), frozenset())
    except Exception as exc:  # any tracing failure
        return _untraced("", exc)
    return None


def _partial_fx(model: nn.Module, leaves: frozenset[str], root_failure: UntracedPart | None) -> Capture:
    """The largest traceable submodules, top-down, below a root that did not trace."""
    parts: list[CapturedPart] = []
    untraced: list[UntracedPart] = [root_failure] if root_failure else []

    def visit(module: nn.Module, path: str) -> None:
        if path and not isinstance(module, (nn.ModuleList, nn.ModuleDict)):
            # containers have no forward of their own: look inside without reporting a failure
            try:
                parts.append(CapturedPart(path, trace(module, leaves)))
                return
            except Exception as exc:  # any tracing failure: fall back to the children
                untraced.append(_untraced(path, exc))
        for name, child in module.named_children():
            container = isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential))
            if (is_default_leaf(child) and not container) or type(child) in LEAF_REGISTRY or _class_matches(
                type(child), leaves
            ):
                continue
            visit(child, f"{path}.{name}" if path else name)

    visit(model, "")
    return Capture("fx", parts, untraced)


# --- example inputs -------------------------------------------------------------------------------


# --- shapes and FLOPs on an example input -----------------------------------------------------------


