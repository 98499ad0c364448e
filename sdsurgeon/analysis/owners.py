"""Which module each residual site is rewritten in: the block that owns it, traced alone, or the captured part."""

from __future__ import annotations

import copy
import functools
import types
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..analysis.detect import ResidualSite, detect, module_scope
from ..capture.drop_path import find_drop_paths, leaf_classes
from ..capture.call_trace import ROUTES, Call, call_key, drop_outputs, record_calls, trace_call, trace_with_constants
from ..capture.fx import CALLS, Capture, faithful_graph_module, is_default_leaf, op_names, trace_as_part
from ..capture.graph_facts import is_view, shape_only_nodes, writes_in_place

# How a rewrite reaches the model (plan shows it; inject does it).
BLOCK = "block"  # the module owning the sites was traced alone and runs its gated graph; its class stays
PART = "part"  # the captured part runs its gated graph in place; its class stays
WHOLE = "whole model"  # an ATen capture: the captured part is replaced by a GraphModule


@dataclass
class Rewrite:
    """One module to rewrite: where it is, how, the sites it gates (node names in ``gm``) and its graph."""

    path: str  # module path in the model ("" is the model itself)
    how: str  # BLOCK | PART | WHOLE
    sites: list[ResidualSite]
    graph_module: fx.GraphModule | Callable[[], fx.GraphModule]  # or how to build it (a copy of a twin's graph)
    copy_skip: dict[str, bool]  # site id -> whether the skip is written in place later, seen from the whole part
    routes: tuple[str, ...] | None = None  # modules that keywords the graph does not name go to (call_trace.ROUTES)

    @property
    def gm(self) -> fx.GraphModule:
        if not isinstance(self.graph_module, fx.GraphModule):
            self.graph_module = self.graph_module()
        return self.graph_module


def rewrites(model: nn.Module, cap: Capture, sites: Sequence[ResidualSite], leaves: Iterable[str] = (),
             example_inputs=None) -> list[Rewrite]:
    """Where inject rewrites ``sites`` (found by ``locate`` on ``cap``), in module order. Never mutates.

    A site's owner is the innermost module whose forward computes its add and its whole branch
    (the common scope of those nodes). Owners nested in another owner go with the outer one. Each
    owner is traced with torch.fx on its own; if every one traces and shows the same sites (ids
    match: the same adds, in a module called once), each is rewritten alone (BLOCK) and the rest of
    the model runs its own code. Owners inside an ATen (torch.export) capture are traced on the
    call they receive in a forward on ``example_inputs`` (``capture.call_trace``: how transformers'
    layers trace). Otherwise the whole captured part is rewritten (PART), still in place; an ATen
    capture is then replaced whole (WHOLE), as its graph has no Python module boundaries to put back.
    """
    leaves = frozenset(leaves) | set(leaf_classes([d for d in find_drop_paths(model) if d.rate > 0]))
    out: list[Rewrite] = []
    for part in cap.parts:
        mine = [s for s in sites if s.part == part.path]
        if not mine:
            continue
        nodes = {n.name: n for n in part.gm.graph.nodes}
        whole = Rewrite(part.path, PART if cap.method == "fx" else WHOLE, mine, part.gm,
                        {s.id: written_in_place(part.gm, nodes[s.add]) for s in mine})
        blocks = _blocks(model, part.path, part.gm, mine, whole.copy_skip,
                         _PartTracing(part.gm, leaves) if cap.method == "fx" else _CallTracing(model, example_inputs, leaves))
        out += blocks or [whole]
    return out


def written_in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether some user of ``node`` overwrites it, or a view of it, in place (ReLU(inplace=True), relu_, +=,
    ``x[:, 0] = v``, ...): a dropped gate returning its skip must then return a copy."""
    return any(u.args and u.args[0] is node and (writes_in_place(u, gm) or (is_view(u) and written_in_place(gm, u)))
               for u in node.users)


def _join(*paths: str) -> str:
    return ".".join(p for p in paths if p)


def _owner(nodes: dict[str, fx.Node], site: ResidualSite, shape_only: set[fx.Node]) -> str:
    """The common scope of the site's add and branch nodes (``nodes``: the graph's, by name), shape reads aside:
    a stack that reads its input's length for its layers (torch.nn's encoder) leaves each layer the owner."""
    scopes = [module_scope(nodes[site.add])] + [module_scope(nodes[n]) for n in site.branch_nodes
                                                 if nodes[n] not in shape_only]
    common = scopes[0].split(".") if scopes[0] else []
    for scope in scopes[1:]:
        atoms = scope.split(".") if scope else []
        k = 0
        while k < min(len(common), len(atoms)) and common[k] == atoms[k]:
            k += 1
        common = common[:k]
    return ".".join(common)


def _outermost(paths) -> dict[str, str]:
    """Each module path -> the outermost of ``paths`` that holds it (itself if none does)."""
    present = set(paths)
    out = {}
    for path in paths:
        atoms = path.split(".") if path else []
        holders = [""] if "" in present else []
        holders += [p for k in range(1, len(atoms)) if (p := ".".join(atoms[:k])) in present]
        out[path] = holders[0] if holders else path
    return out


def _leaf_paths(called: list[str], owner: str) -> set[str]:
    """The modules inside ``owner`` that the part's trace called rather than traced into (``called``: all
    such module paths of the part; returned relative to the owner): traced alone with the same leaves, the
    owner gives the graph the part's trace had for it."""
    prefix = owner + "." if owner else ""
    return {target[len(prefix):] for target in called if target.startswith(prefix)}


class _PartTracing:
    """Owners inside an fx part: traced in one mode, calling what the part's trace called (``_leaf_paths``)."""

    def __init__(self, gm: fx.GraphModule, leaves: frozenset[str]) -> None:
        self.gm, self.leaves = gm, leaves
        self.called = sorted({n.target for n in gm.graph.nodes
                              if n.op == "call_module" and not is_default_leaf(gm.get_submodule(n.target))})
        self.calls = gm.meta.get(CALLS, {})  # each module's call in the part's trace

    def prepare(self, model: nn.Module, paths: list[str]) -> bool:
        return True

    def key(self, path: str, relative: str, owner: nn.Module) -> tuple:
        call = self.calls.get(relative)
        return (_structure(owner), frozenset(_leaf_paths(self.called, relative)),
                None if call is None else call_key(Call(*call)))

    def trace(self, path: str, relative: str, owner: nn.Module) -> fx.GraphModule:
        leaf_paths = _leaf_paths(self.called, relative)
        if relative in self.calls:  # on the call the part made: its None and flag arguments fixed as there
            try:
                return trace_with_constants(owner, Call(*self.calls[relative]), self.leaves, leaf_paths)
            except Exception:  # any failure: as the part traced it, checked by faithful()
                pass
        # one mode is enough: the part's trace already isolated what decides on self.training
        return trace_as_part(owner, self.leaves, leaf_paths)

    def faithful(self, block_gm: fx.GraphModule, relative: str, alone: ResidualSite, in_part: ResidualSite) -> bool:
        """Whether the owner traced alone computes a site's branch as the part did. Alone, an argument the part
        passed as a constant (``layer(x, None)``) is a placeholder, and ``if mask is None`` takes the other path."""
        return op_names(block_gm, alone.branch_nodes) == op_names(self.gm, in_part.branch_nodes, f"{relative}.")


class _CallTracing:
    """Owners inside an ATen capture: traced with torch.fx on the call each receives (``capture.call_trace``)."""

    def __init__(self, model: nn.Module, example_inputs, leaves: frozenset[str]) -> None:
        self.example_inputs, self.leaves = example_inputs, leaves
        self.calls = None

    def prepare(self, model: nn.Module, paths: list[str]) -> bool:
        self.calls = record_calls(model, paths, self.example_inputs, outputs=True)
        return self.calls is not None and all(p in self.calls for p in paths)

    def key(self, path: str, relative: str, owner: nn.Module) -> tuple:
        call = self.calls[path]
        return _structure(owner), call_key(call), call.dropped, call.absent

    def trace(self, path: str, relative: str, owner: nn.Module) -> fx.GraphModule:
        # what the model drops of the owner's output (attention weights nobody asked for) is no output of its
        # graph: a branch computing it stays a branch, and the rewritten owner returns a DroppedOutput there
        call = self.calls[path]
        return drop_outputs(trace_call(owner, call, self.leaves), call.dropped, call.absent)

    def faithful(self, block_gm: fx.GraphModule, relative: str, alone: ResidualSite, in_part: ResidualSite) -> bool:
        return True  # traced on its recorded call and replayed on it (call_trace)


def _blocks(
    model: nn.Module, part: str, gm: fx.GraphModule, sites: list[ResidualSite], copy_skip: dict[str, bool],
    tracing: _PartTracing | _CallTracing,
) -> list[Rewrite] | None:
    nodes = {n.name: n for n in gm.graph.nodes}
    shape_only = shape_only_nodes(gm.graph.nodes)
    owner_of = {site.id: _owner(nodes, site, shape_only) for site in sites}
    outer = _outermost(owner_of.values())
    grouped: dict[str, list[ResidualSite]] = {}
    for site in sites:
        grouped.setdefault(outer[owner_of[site.id]], []).append(site)
    if list(grouped) == [""]:
        return None  # the part itself owns them: nothing narrower to trace
    if not tracing.prepare(model, [_join(part, relative) for relative in grouped]):
        return None  # an owner was not called on the example inputs
    found: list[Rewrite] = []
    # Blocks alike (same class, submodules, flags and leaves) trace alike: one trace serves them all,
    # which keeps plan of a 600-block model from tracing 600 times.
    traced: dict[tuple, tuple[fx.Graph, str, dict[str, ResidualSite], tuple | None]] = {}  # key -> graph, twin, sites, routes
    for relative, expected in grouped.items():
        path = _join(part, relative)
        owner = model.get_submodule(path)
        key = tracing.key(path, relative, owner)
        if key not in traced:
            try:
                block_gm = tracing.trace(path, relative, owner)
            except Exception:  # any tracing failure: the part is rewritten whole instead
                return None
            traced[key] = (copy.deepcopy(block_gm.graph), path, {s.id: s for s in detect(block_gm, part=path)[0]},
                           block_gm.meta.get(ROUTES))
            build: fx.GraphModule | Callable[[], fx.GraphModule] = block_gm
        else:  # built when inject asks, from a copy of the twin's graph as traced (inject gates the twin's own)
            build = functools.partial(_graph_module_of, owner, traced[key][0])
        _, twin, by_id, routes = traced[key]
        wanted = [twin + s.id[len(path):] for s in expected]  # the ids as the twin's trace names them
        if any(w not in by_id for w in wanted):
            return None  # the block alone shows other sites (called twice, or traced otherwise)
        if build is block_gm and not all(tracing.faithful(block_gm, relative, by_id[w], s)
                                         for w, s in zip(wanted, expected)):
            return None  # alone it computes a branch otherwise: the part is rewritten whole instead
        matched = [replace(by_id[w], id=s.id, index=s.index, part=path) for w, s in zip(wanted, expected)]
        found.append(Rewrite(path, BLOCK, matched, build, {s.id: copy_skip[s.id] for s in expected}, routes))
    return sorted(found, key=lambda r: min(s.index for s in r.sites))


def _graph_module_of(owner: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    return faithful_graph_module(owner, copy.deepcopy(graph))


_PLAIN = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def _value_key(value):
    """A module attribute as far as tracing its forward can depend on it: plain values by value (sizes,
    flags), functions and classes by identity, anything else by object identity (never shared)."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value):
        return (type(value), tuple(value))
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return value
    return ("object", id(value))


def _structure(module: nn.Module) -> tuple:
    """What torch.fx's graph of ``module`` depends on besides its class's code: every submodule's path and
    class, its plain attributes, and which parameters and buffers it holds (or holds as None)."""
    key = []
    for path, m in module.named_modules():
        attrs = tuple(sorted((k, _value_key(v)) for k, v in m.__dict__.items()
                             if not isinstance(v, (dict, set, nn.Module))))  # the dicts: hooks, and the three below
        params = tuple((k, v is None) for k, v in m._parameters.items())
        buffers = tuple((k, v is None) for k, v in m._buffers.items())
        key.append((path, type(m), attrs, params, buffers))
    return tuple(key)
