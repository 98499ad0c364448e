"""Tracing a module on the call it really receives: recorded arguments, non-tensor ones fixed only where tracing needs it."""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import has_side_effect
from torch.overrides import TorchFunctionMode

from .. import _torch
from ..errors import CaptureError, DroppedOutputError, SpecializedCallError
from .fx import ModeDependentForward, is_default_leaf, trace, untouched
from .graph_facts import writes_in_place
from .inputs import normalize_inputs
from .modes import modes_kept
from .torch_export import cache_off
from .where import explain

# Argument values a graph may be specialised on: fixed in the graph, checked on every call.
_FIXABLE = (type(None), bool, int, float, str)
# A keyword traced through a forward's **kwargs: where it goes is where any other keyword would go.
PROBE = "sdsurgeon_other_keywords"
# GraphModule.meta key: the modules (paths in the traced module) that receive keywords the call did not record.
ROUTES = "sdsurgeon_routes"


@has_side_effect  # a check: graph passes must keep it though nothing reads its result
def expect_value(value: Any, expected: Any, where: str) -> None:
    """Raise unless ``value`` is the constant a rewritten forward was traced with (a graph node: runs every call)."""
    if isinstance(value, fx.Proxy):  # the graph traced back from its code (surgery.install): the check stays a node
        return value.tracer.create_proxy("call_function", expect_value, (value, expected, where), {})
    if value is not expected and not (type(value) is type(expected) and value == expected):
        raise SpecializedCallError(
            f"{where} was rewritten for calls with this argument = {expected!r} (as in the example inputs) and now "
            f"got {type(value).__name__ if not isinstance(value, _FIXABLE) else repr(value)}; re-run inject with "
            "example inputs that pass it"
        )


@dataclass(frozen=True)
class Call:
    """The arguments one module received in a real forward."""

    args: tuple
    kwargs: dict
    # Positions of the module's output (``output_positions`` names) that the model drops after this call and every
    # other call of the module in the forward, in eval and in train: None there, or a tensor that no later torch op
    # reads and the model does not return (transformers' Falcon and BLOOM layers return their attention weights
    # whatever ``output_attentions`` says; their stacks read them only when it is True). Filled by
    # ``record_calls(..., outputs=True)``; ``drop_outputs`` makes a trace return a DroppedOutput there (None where
    # the value was None on every call: ``absent``).
    dropped: frozenset = field(default=frozenset())
    absent: frozenset = field(default=frozenset())


def record_calls(model: nn.Module, paths: Iterable[str], example_inputs, outputs: bool = False) -> dict[str, Call] | None:
    """The first call each module at ``paths`` receives in one eval forward of ``model`` on ``example_inputs``
    (transformers' ``use_cache`` off, as in capture). None where there are no inputs or the model does not
    run on them. ``model`` is left as it was. ``outputs``: also find the positions of each module's output that the
    model drops (``Call.dropped``), confirmed by a train forward (a caller may read an output only in training)."""
    inputs = normalize_inputs(example_inputs)
    if inputs is None:
        return None
    paths = set(paths)
    calls: dict[str, Call] = {}
    handles = []
    for path in paths:
        def record(module, args, kwargs, path=path):
            calls.setdefault(path, Call(tuple(args), dict(kwargs)))
        handles.append(model.get_submodule(path).register_forward_pre_hook(record, with_kwargs=True))
    try:
        dropped, absent = _dropped_outputs(model, paths if outputs else set(), inputs, training=False)
    except Exception:  # it does not run outside torch.export: nothing recorded
        return None
    finally:
        for handle in handles:
            handle.remove()
    if any(dropped.values()):
        try:
            in_training, absent_in_training = _dropped_outputs(model, paths, inputs, training=True)
        except Exception:  # no evidence from training: nothing counts as dropped
            in_training, absent_in_training = {}, {}
        calls = {p: replace(c, dropped=dropped.get(p, frozenset()) & in_training.get(p, frozenset()),
                            absent=absent.get(p, frozenset()) & absent_in_training.get(p, frozenset()))
                 for p, c in calls.items()}
    return calls


def output_positions(output: Any, at: str = "") -> Iterator[tuple[str, Any]]:
    """``(position, value)`` for each item of a module's output, through tuples, lists and dicts (``[1]``,
    ``['k']``, as pytree's keystr names them); the same walk reads a traced graph's output node."""
    if isinstance(output, (tuple, list)):
        for i, value in enumerate(output):
            yield from output_positions(value, f"{at}[{i}]")
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from output_positions(value, f"{at}[{key!r}]")
    else:
        yield at, output


class _OutputReads(TorchFunctionMode):
    """While active: which tensors that a watched module returned any torch op takes as an input afterwards."""

    def __init__(self, model: nn.Module, paths: Iterable[str]) -> None:
        super().__init__()
        self.model, self.paths = model, list(paths)
        self.outputs: dict[str, list[dict[str, Any]]] = {}  # path -> per call: position -> value
        self.watched: dict[int, torch.Tensor] = {}  # held, so that ids stay unique
        self.read: set[int] = set()

    def watch(self, path: str):
        def hook(_module, _args, output):
            positions = dict(output_positions(output))
            self.outputs.setdefault(path, []).append(positions)
            self.watched.update((id(v), v) for v in positions.values() if isinstance(v, torch.Tensor))
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched:
            self.read.update(id(v) for v in _torch.tree_leaves((args, kwargs))
                             if isinstance(v, torch.Tensor) and id(v) in self.watched)
        return func(*args, **kwargs)


def _dropped_outputs(model: nn.Module, paths: set[str], inputs, training: bool
                     ) -> tuple[dict[str, frozenset], dict[str, frozenset]]:
    """Each module's output positions the rest of one forward drops in every call (``Call.dropped``), and those of
    them that were None in every call (``Call.absent``); the whole output never counts. Runs ``model`` (as in ``record_calls``, the RNG put back), raising what it raises."""
    reads = _OutputReads(model, paths)
    # prepended: a hook of the model's own that reads an output reads it after the watch began
    handles = [model.get_submodule(p).register_forward_hook(reads.watch(p), prepend=True) for p in paths]
    args, kwargs = inputs
    try:
        with torch.random.fork_rng(devices=[]), untouched(model), cache_off(model), \
                modes_kept(model, training=training), torch.no_grad():
            with reads if paths else contextlib.nullcontext():
                output = model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    returned = {id(v) for v in _torch.tree_leaves(output) if isinstance(v, torch.Tensor)}
    dropped, absent = {}, {}
    for path, per_call in reads.outputs.items():
        sets = [{at for at, v in positions.items() if at and (v is None or (
            isinstance(v, torch.Tensor) and id(v) not in reads.read and id(v) not in returned))}
            for positions in per_call]
        dropped[path] = frozenset(set.intersection(*sets))
        absent[path] = frozenset(at for at in dropped[path] if all(positions[at] is None for positions in per_call))
    return dropped, absent


class DroppedOutput:
    """What a rewritten block returns where the model dropped a tensor when the block was traced (the attention
    weights of a layer whose caller did not ask for them): using it raises DroppedOutputError, so that a call that
    reads it after all (``output_attentions=True``) fails in one line instead of reading a None it never had."""

    __slots__ = ("block", "position")

    def __init__(self, block: str, position: str) -> None:
        self.block, self.position = block, position

    def error(self) -> DroppedOutputError:
        return DroppedOutputError(
            f"{self.block}'s output {self.position} is not computed by its rewritten forward: nothing read it on the "
            "example inputs inject traced it on; inject again with example inputs that read it (e.g. "
            "output_attentions=True)", what="output dropped at inject", where=f"{self.block}{self.position}")

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy, pickle and friends look for optional protocol methods: not a use
            raise AttributeError(name)
        raise self.error()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        dropped = next(v for v in _torch.tree_leaves((args, kwargs or {})) if isinstance(v, cls))
        raise dropped.error()

    def __bool__(self) -> bool:
        raise self.error()

    def __len__(self) -> int:
        raise self.error()

    def __getitem__(self, key):
        raise self.error()

    def __iter__(self):
        raise self.error()

    def __repr__(self) -> str:
        return f"<{self.block}{self.position}: dropped at inject (sdsurgeon)>"


def dropped_output(block: str, position: str) -> DroppedOutput:
    """A graph's node for a dropped output (``drop_outputs``)."""
    return DroppedOutput(block, position)


def drop_outputs(gm: fx.GraphModule, dropped: Iterable[str], absent: Iterable[str] = ()) -> fx.GraphModule:
    """``gm`` (a module traced on its call) returning a DroppedOutput at the ``dropped`` positions of its output
    (``Call.dropped``; None at those of them that were None, ``absent``), the output's structure kept, and without
    the nodes only those values needed: a value the model drops is no output of the block, so that a branch
    computing it stays a branch (detect)."""
    dropped, absent = set(dropped), set(absent)
    output = next((n for n in gm.graph.nodes if n.op == "output"), None)
    if not dropped or output is None:
        return gm
    hit = [at for at, v in output_positions(output.args[0]) if at in dropped and isinstance(v, fx.Node)]
    if not hit:
        return gm
    block = type(gm).__name__  # the owner's class: one trace serves every owner alike (analysis.owners)

    def stand_in(at: str) -> Any:
        if at in absent:
            return None
        with gm.graph.inserting_before(output):
            return gm.graph.call_function(dropped_output, (block, at))

    def rebuilt(value: Any, at: str) -> Any:
        if isinstance(value, (tuple, list)):
            items = [rebuilt(v, f"{at}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if isinstance(value, tuple) else list(items)
        if isinstance(value, dict):
            return {k: rebuilt(v, f"{at}[{k!r}]") for k, v in value.items()}
        return stand_in(at) if at in hit else value

    output.args = (rebuilt(output.args[0], ""),)
    # Dead code out, in reverse: never a module call, a placeholder, a check, an impure or an in-place op
    # (fx's own pass would take ``w.masked_fill_(m, v)`` whose result is unused while ``w`` is read later).
    for node in reversed(list(gm.graph.nodes)):
        if (not node.users and node.op in ("call_function", "call_method", "get_attr") and not node.is_impure()
                and not writes_in_place(node, gm)):
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def call_key(call: Call) -> tuple:
    """What a trace on ``call`` depends on besides the module: each argument's name, and its value if fixable."""
    items = [(None, v) for v in call.args] + sorted(call.kwargs.items())
    return tuple((k, v if isinstance(v, _FIXABLE) else type(v)) for k, v in items)


def trace_call(module: nn.Module, call: Call, leaves: Iterable[str] = ()) -> fx.GraphModule:
    """Trace ``module`` as it was called, for forwards torch.fx cannot trace as written (transformers'
    layers take ``**kwargs``, are wrapped by decorators and test ``if x is not None`` on arguments).

    The graph's forward names every parameter of the class's forward (unwrapped), with its defaults,
    and the keywords the call put into ``**kwargs`` (default None). Tried in order, the first that
    traces wins, so that the graph serves as many calls as it can and reaches as deep as it can:
    non-tensor arguments fixed to their recorded values (None, flags), tracing into every child; then
    with children called as leaves (then the same with no argument fixed). Leaves are then pushed
    as deep as tracing allows (a failing attention module stays a leaf, the projection after it is
    traced), and then as few arguments fixed as that depth allows. A trace counts only if its graph
    gives what the module gives on the call (``_check_replay``). A fixed argument is checked on every call (SpecializedCallError).
    Where the forward takes ``**kwargs``, the graph's ``meta[ROUTES]`` names the modules that keywords
    the call did not record go to (found with a probe keyword): ``surgery.install`` passes them on.
    """
    if _takes_kwargs(module):  # a probe keyword shows where keywords the call did not record would go
        gm = _trace_call(module, Call(call.args, {**call.kwargs, PROBE: None}), leaves)
        routes = _routes(gm)
        if routes is not None:
            gm.meta[ROUTES] = routes
            return gm
    return _trace_call(module, call, leaves)


def trace_with_constants(module: nn.Module, call: Call, leaves: Iterable[str], leaf_paths: Iterable[str]) -> fx.GraphModule:
    """Trace ``module`` with the constants of a call a whole-model trace recorded (``capture.fx.CALLS``: its traced
    values marked) fixed, defaults it left too, each checked on every call (SpecializedCallError): traced alone,
    ``layer(x, None)``'s None would be a placeholder, and ``if mask is None`` would take the other path.
    ``leaf_paths``: the modules that trace called."""
    spec = _Spec.of(module, call)
    fixed = [n for n in spec.names if n in spec.values and isinstance(spec.values[n], _FIXABLE)]
    return spec.trace(leaves, fixed, list(leaf_paths), replay=False)


def _takes_kwargs(module: nn.Module) -> bool:
    parameters = inspect.signature(inspect.unwrap(type(module).forward)).parameters.values()
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _routes(gm: fx.GraphModule) -> tuple[str, ...] | None:
    """The modules the probe keyword reached, passed on as a keyword, with it taken out of the graph; None
    where the traced code itself reads it (then other keywords cannot be passed on)."""
    probe = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.target == PROBE), None)
    if probe is None:
        return ()
    users = list(probe.users)
    if not all(u.op == "call_module" and u.kwargs.get(PROBE) is probe and probe not in u.args
               and list(u.kwargs.values()).count(probe) == 1 for u in users):
        return None
    for user in users:
        user.kwargs = {k: v for k, v in user.kwargs.items() if k != PROBE}
    gm.graph.erase_node(probe)
    gm.graph.lint()
    gm.recompile()
    return tuple(dict.fromkeys(u.target for u in users))


def _trace_call(module: nn.Module, call: Call, leaves: Iterable[str]) -> fx.GraphModule:
    spec = _Spec.of(module, call)
    fixable = [n for n in spec.names if n in spec.values and isinstance(spec.values[n], _FIXABLE) and n != PROBE]
    failure: Exception | None = None
    for fixed in (fixable, []):  # every constant fixed first: the deepest trace, then as few as it needs
        for opaque in ([], _callable_children(module, "")):
            try:
                spec.trace(leaves, fixed, opaque)
            except ModeDependentForward:
                raise
            except Exception as exc:
                failure = failure or exc
                continue
            # Depth first (the adds inside children are what a trace is for), then as few constants as that
            # depth allows: DeBERTa's attention traces only with its None query_states fixed.
            opaque = _deepest(module, opaque, lambda o: spec.trace(leaves, fixed, o))
            fixed = _fewest(fixed, lambda f: spec.trace(leaves, f, opaque))
            return spec.trace(leaves, fixed, opaque)
    raise CaptureError(f"{type(module).__name__} does not trace on its recorded call: {explain(failure).reason}")


def _callable_children(module: nn.Module, path: str) -> list[str]:
    """Paths (under ``path``) of the modules ``module`` calls directly that torch.fx would trace into:
    its children, the items of its ModuleLists and ModuleDicts in their place."""
    out = []
    for name, child in module.named_children():
        child_path = f"{path}.{name}" if path else name
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            out += _callable_children(child, child_path)
        elif not is_default_leaf(child):
            out.append(child_path)
    return out


def _deepest(module: nn.Module, opaque: list[str], traces) -> list[str]:
    """``opaque`` (module paths called as leaves) with each one traced into instead, its own children
    now the leaves, wherever ``traces`` (a trace attempt) still succeeds; down to the modules that fail."""
    kept, queue = list(opaque), list(opaque)
    while queue:
        path = queue.pop(0)
        inner = _callable_children(module.get_submodule(path), path)
        trial = [p for p in kept if p != path] + inner
        if _succeeds(traces, trial):
            kept = trial
            queue += inner
    return kept


def _fewest(items: Sequence[str], traces) -> list[str]:
    """``items`` with each left out that ``traces`` (a trace attempt) does without, one at a time."""
    kept = list(items)
    for item in list(items):
        trial = [i for i in kept if i != item]
        if _succeeds(traces, trial):
            kept = trial
    return kept


def _succeeds(traces, trial) -> bool:
    try:
        traces(trial)
    except ModeDependentForward:  # no choice of leaves or constants changes that
        raise
    except Exception:
        return False
    return True


@dataclass
class _Spec:
    module: nn.Module
    fn: Any  # the class's forward, decorators unwrapped
    names: list[str]  # parameters after self, then the **kwargs keywords the call used
    defaults: dict[str, Any]
    values: dict[str, Any]  # name -> the value the call passed (or its default)
    call: Call  # the recorded call itself: a trace must give what the module gives on it

    @classmethod
    def of(cls, module: nn.Module, call: Call) -> _Spec:
        fn = inspect.unwrap(type(module).forward)
        sig = inspect.signature(fn)
        bound = sig.bind(module, *call.args, **call.kwargs)
        names, defaults, values = [], {}, {}
        for name, p in list(sig.parameters.items())[1:]:
            if p.kind is inspect.Parameter.VAR_POSITIONAL:
                raise CaptureError(f"{type(module).__name__}.forward takes *{name}, which a traced call cannot name")
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                for key, value in bound.arguments.get(name, {}).items():
                    names.append(key)
                    defaults[key], values[key] = None, value
                continue
            names.append(name)
            if p.default is not inspect.Parameter.empty:
                defaults[name] = p.default
            if name in bound.arguments:
                values[name] = bound.arguments[name]
            elif name in defaults:
                values[name] = defaults[name]
        return cls(module, fn, names, defaults, values, call)

    def trace(self, leaves: Iterable[str], fixed: Sequence[str], opaque: Sequence[str],
              replay: bool = True) -> fx.GraphModule:
        """Trace through a stand-in class whose forward passes every argument by name to the real one;
        ``fixed`` arguments are passed as their recorded values, ``opaque`` children are leaves. ``replay``:
        check the graph on the recorded call (which needs its values: not a call recorded by a trace)."""
        cls_name = type(self.module).__name__
        params = [f"{n}=_d_{n}" if n in self.defaults else n for n in self.names]
        passed = [f"{n}=_v_{n}" if n in fixed else f"{n}={n}" for n in self.names]
        src = f"def forward(self, {', '.join(params)}):\n    return _fn(self, {', '.join(passed)})\n"
        namespace = {"_fn": self.fn, **{f"_d_{n}": v for n, v in self.defaults.items()},
                     **{f"_v_{n}": self.values[n] for n in fixed}}
        exec(compile(src, f"<sdsurgeon call of {type(self.module).__qualname__}>", "exec"), namespace)
        shell = _shell(type(self.module), namespace["forward"])
        shell.__dict__ = self.module.__dict__  # the module itself, seen through a forward with named arguments
        # on the call's own values (a recorded call only), what tensors' metadata decides is decided (capture.fx)
        values = {n: self.values[n] for n in self.names if n in self.values} if replay else None
        gm = trace(shell, leaves, leaf_paths=opaque, values=values)
        _check_fixed(gm, {n: self.values[n] for n in fixed}, cls_name)
        if replay:
            _check_replay(self.module, gm, self.call, cls_name)
        return gm


def _check_replay(module: nn.Module, gm: fx.GraphModule, call: Call, cls_name: str) -> None:
    """Raise unless ``gm`` gives what ``module`` gives on the recorded call (in eval, outputs' tensors alike).

    Tracing cannot see ``is None``: an argument the call left None (DeBERTa's ``query_states``, replaced by
    ``hidden_states`` inside) traced as a placeholder takes the other path, and the graph would add None. A trace
    that does not reproduce its own call is rejected, so that the argument is fixed to its value instead."""
    kwargs = {k: v for k, v in call.kwargs.items() if k != PROBE}
    with untouched(module), modes_kept(module, training=False), torch.no_grad():
        gm.training = False
        want = _torch.tree_leaves(module(*call.args, **kwargs))
        try:
            got = _torch.tree_leaves(gm.forward(*call.args, **kwargs))  # not gm(): that prints its failures
        except Exception as exc:
            raise CaptureError(f"{cls_name} traced on its call does not run on it: {explain(exc).reason}") from None
    want, got = ([t for t in out if isinstance(t, torch.Tensor)] for out in (want, got))
    if len(want) != len(got) or not all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
                                        for a, b in zip(want, got)):
        raise CaptureError(f"{cls_name} traced on its call computes something else than on the call itself")


def _shell(cls: type, forward) -> nn.Module:
    """An uninitialised instance of ``cls`` with another forward: its own methods (``self.helper(x)``) still resolve."""
    try:
        shell_class = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__})
    except Exception:  # a class that refuses subclasses: its methods stay out of reach
        shell_class = type(cls.__name__, (nn.Module,), {"forward": forward})
    return shell_class.__new__(shell_class)


def _check_fixed(gm: fx.GraphModule, fixed: dict[str, Any], cls_name: str) -> None:
    """Guard each fixed argument's placeholder: a call with another value raises instead of computing wrong."""
    if not fixed:
        return
    placeholders = {n.target: n for n in gm.graph.nodes if n.op == "placeholder"}
    last = list(placeholders.values())[-1]
    with gm.graph.inserting_after(last):
        for name, value in fixed.items():
            gm.graph.call_function(expect_value, (placeholders[name], value, f"{cls_name}.forward's {name}"))
    gm.graph.lint()
    gm.recompile()


def returned_submodule(module: nn.Module, call: Call, item: int | None) -> str | None:
    """The path (within ``module``) of the submodule whose output ``module`` returns as is (``item`` of a
    returned tuple, or the whole output), seen when ``module`` runs on ``call`` in eval: the very tensor
    that submodule made first, unchanged since (same version counter), the submodule called once. None
    where no submodule's output comes back untouched (so nothing inside can take a scale for it)."""
    made: dict[int, tuple[str, torch.Tensor, int]] = {}  # id(tensor) -> the first module to return it
    calls: dict[str, int] = {}

    def seen(path):
        def hook(_module, _args, output):
            calls[path] = calls.get(path, 0) + 1
            if isinstance(output, torch.Tensor) and id(output) not in made:
                made[id(output)] = (path, output, output._version)
        return hook

    handles = [m.register_forward_hook(seen(path)) for path, m in module.named_modules() if path]
    try:
        with untouched(module), modes_kept(module, training=False), torch.no_grad():
            output = module(*call.args, **call.kwargs)
    except Exception:  # it does not run alone on its recorded call: no evidence
        return None
    finally:
        for handle in handles:
            handle.remove()
    if item is not None:
        output = output[item] if isinstance(output, (tuple, list)) and -len(output) <= item < len(output) else None
    if not isinstance(output, torch.Tensor) or id(output) not in made:
        return None
    path, tensor, version = made[id(output)]
    return path if tensor is output and output._version == version and calls[path] == 1 else None


def scaled_parameter(module: nn.Module, call: Call, item: int | None) -> str | None:
    """The name of one of ``module``'s own parameters (not its submodules') that its output (``item`` of a
    returned tuple, or the whole output) is proportional to, seen when ``module`` runs on ``call`` in eval:
    with that parameter times 1/2, and times 2, the output is the same times 1/2 and 2 (a power of two scales
    floats exactly, so a linear use gives the same numbers). A module whose code no graph reaches (a mixture of
    experts' fused expert weights, ``out = sum_k w_k * act(x W_k) D_k``, D a 3-D parameter) can take a scale
    there. None where no parameter does (a nonlinear use, or a bias beside the weight)."""

    def run():
        output = module(*call.args, **call.kwargs)
        if item is not None:
            output = output[item] if isinstance(output, (tuple, list)) and -len(output) <= item < len(output) else None
        return output if isinstance(output, torch.Tensor) and output.is_floating_point() else None

    with untouched(module), modes_kept(module, training=False), torch.no_grad():
        try:
            base = run()
        except Exception:  # it does not run alone on its recorded call: no evidence
            return None
        if base is None or not bool(base.abs().max() > 0):
            return None
        for name, param in module.named_parameters(recurse=False):
            if not param.is_floating_point():
                continue
            saved = param.detach().clone()
            try:
                ok = True
                for factor in (0.5, 2.0):
                    param.mul_(factor)
                    got = run()
                    param.copy_(saved)
                    if got is None or got.shape != base.shape or not torch.allclose(
                            got, base * factor, rtol=1e-3, atol=1e-6 * float(base.abs().max())):
                        ok = False
                        break
            except Exception:
                ok = False
            finally:
                param.copy_(saved)
            if ok:
                return name
    return None
