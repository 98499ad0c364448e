"""Find residual blocks ``x + f(x)`` in a captured graph; read-only, returns plain records."""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, replace

import torch
import torch.fx as fx
from torch import nn

from ..attrs import resolve
from ..capture.graph_facts import constant_nodes, dead_nodes, shape_only_nodes, write_edges
from ..capture.where import describe, used_by

_aten = torch.ops.aten
ADD_FUNCTIONS = frozenset({operator.add, operator.iadd, torch.add, _aten.add.Tensor, _aten.add_.Tensor})
ADD_METHODS = frozenset({"add", "add_"})

# A projection shortcut (conv+bn, avg-pool+conv+bn, slice+pad, ...) is a short single-input chain.
MAX_SHORTCUT_OPS = 8

@dataclass(frozen=True)
class ResidualSite:
    """One residual block found in a graph. Node names refer to the graph it was found in."""

    id: str  # stable: module path of the add + its position among the adds there, e.g. "layers.0:add"
    index: int  # 1-based depth order (execution order)
    part: str  # module path of the captured part holding the graph ("" = whole model)
    add: str  # the add node
    skip: str  # the value added unchanged: x, or g(x) for a projection shortcut
    branch_output: str  # f(x)
    branch_inputs: tuple[str, ...]  # values the branch reads from outside itself
    branch_nodes: tuple[str, ...]  # the branch's own nodes, in graph order
    shortcut: str  # "identity" | "projection"
    params: int  # parameters the branch owns (shared modules counted too)
    modules: tuple[str, ...]  # submodules the branch calls


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensor operands of a plain residual-style addition, else None."""
    if node.op == "call_function" and node.target in ADD_FUNCTIONS:
        args, kwargs = node.args, dict(node.kwargs)
    elif node.op == "call_method" and node.target in ADD_METHODS:
        args, kwargs = node.args, dict(node.kwargs)
    else:
        return None
    if len(args) != 2 or kwargs.get("alpha", 1) != 1 or kwargs.get("out") is not None:
        return None
    a, b = args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or a is b:
        return None
    return a, b


def is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in ADD_METHODS
    )


def module_scope(node: fx.Node) -> str:
    """Path of the innermost module whose forward produced ``node`` ("" for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if node.op == "call_module" and path == node.target:
        # A leaf call records itself as innermost: its scope is the module calling it.
        path = list(stack.values())[-2][0] if len(stack) > 1 else ""
    return path


class _Graph:
    """Per-graph indexes shared by all matches (built once: keeps detection linear)."""

    def __init__(self, gm: fx.GraphModule, part: str = "") -> None:
        self.gm = gm
        self.part = part  # the module path of the captured module: messages name nodes by where they are
        self.nodes = list(gm.graph.nodes)
        self.order = {n: i for i, n in enumerate(self.nodes)}
        self.by_name = {n.name: n for n in self.nodes}
        self.shape_only = shape_only_nodes(self.nodes)
        self.dead = dead_nodes(self.nodes)
        self.constant = constant_nodes(self.nodes, self.shape_only)
        self.writes = write_edges(self.nodes)  # a read after an in-place write depends on what was written
        self._module_params: dict[str, int] = {}
        self.visited = 0  # nodes walked by branch(): the cost of detection, for tests of its scaling

    def inputs(self, n: fx.Node) -> list[fx.Node]:
        """What ``n``'s value depends on: its arguments and the in-place writes to them before it."""
        return n.all_input_nodes + self.writes.get(n, [])

    def data_inputs(self, n: fx.Node) -> list[fx.Node]:
        return [i for i in self.inputs(n) if i not in self.shape_only]

    def value_users(self, n: fx.Node) -> set[fx.Node]:
        """The users of ``n`` that read its values: not its shape, not for nothing (Hiera's branch reshapes
        to its pooled skip's shape; the skip is still a projection)."""
        return {u for u in n.users if u not in self.shape_only and u not in self.dead}

    def module_params(self, target: str) -> int:
        if target not in self._module_params:
            mod = self.gm.get_submodule(target)
            self._module_params[target] = sum(p.numel() for p in mod.parameters())
        return self._module_params[target]

    def attr_params(self, n: fx.Node) -> int:
        if n.op != "get_attr":
            return 0
        value = resolve(self.gm, n.target)
        return value.numel() if isinstance(value, nn.Parameter) else 0

    def own_attr_params(self, inputs: list[fx.Node], region: set[fx.Node]) -> int:
        """Parameters the region reads, directly or through a view (``gamma.view(1, C, 1, 1)``). Others may read them
        too: a layer whose weights every step of a loop shares (ALBERT calls one layer L times) holds them in each
        step's branch, as a module called twice does (``module_params``)."""
        made: set[fx.Node] = set()  # the inputs made from model attributes, and what they are made from
        stack = [i for i in inputs if i in self.constant]
        while stack:
            n = stack.pop()
            if n not in made:
                made.add(n)
                stack += [i for i in n.all_input_nodes if i in self.constant]
        return sum(self.attr_params(n) for n in made if n.op == "get_attr" and any(u in region or u in made for u in n.users))

    def branch(self, x: fx.Node, t: fx.Node) -> list[fx.Node] | None:
        """Nodes computing ``t`` from ``x`` (graph order), or None if t does not depend on x's values.

        Walks back from t only over nodes after x in graph order, so the cost is the size of the
        block, not of the graph.
        """
        lo = self.order[x]
        if self.order[t] <= lo:
            return None
        seen = {t}
        stack = [t]
        while stack:
            n = stack.pop()
            for i in self.inputs(n):
                if n in self.shape_only and i not in self.shape_only:
                    continue  # a shape read pulls in no values: Hiera's branch reshapes to its skip's shape
                if self.order[i] > lo and i not in seen:
                    seen.add(i)
                    stack.append(i)
        self.visited += len(seen)
        region: set[fx.Node] = set()
        data_dependent: set[fx.Node] = set()
        for n in sorted(seen, key=self.order.__getitem__):
            if any(i is x or i in data_dependent for i in self.data_inputs(n)) and n not in self.shape_only:
                data_dependent.add(n)
            # What reads only x's shape besides values from outside (an attention mask cut to x's length) is
            # no part of the branch: it is computed before the gate, whether the branch runs or not.
            if any(i is x or i in region for i in self.inputs(n)) and (
                    n in data_dependent or n in self.shape_only or n in self.constant):
                region.add(n)
        if t not in data_dependent:
            return None
        return sorted(region | self._hanging(region), key=self.order.__getitem__)

    def _hanging(self, region: set[fx.Node]) -> set[fx.Node]:
        """Dead values computed from the region (unused shapes, dropped outputs, checks): they go with it."""
        hanging: set[fx.Node] = set()
        stack = [u for n in region for u in n.users if u not in region and u in self.dead]
        while stack:
            n = stack.pop()
            if n not in hanging:
                hanging.add(n)
                stack += [u for u in n.users if u not in region]
        return hanging


def _shortcut_chain(g: _Graph, s: fx.Node, add: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """Walk back from skip operand ``s`` along a single-input chain: (fork x, chain) or None."""
    chain: list[fx.Node] = []
    cur, user = s, add
    for _ in range(MAX_SHORTCUT_OPS + 1):
        ins = [i for i in g.data_inputs(cur) if i not in g.constant]  # a learnt skip scale is a projection
        if cur.op in ("placeholder", "get_attr") or len(ins) != 1 or g.value_users(cur) != {user}:
            break
        chain.append(cur)
        cur, user = ins[0], cur
    else:
        return None
    return (cur, chain) if chain else None


def _site_fields(g: _Graph, add: fx.Node, x: fx.Node, t: fx.Node, region: list[fx.Node]) -> dict | str | None:
    """Describe ``region`` if it is a real block; else why a block with parameters cannot be gated (a str),
    or None where it is no block at all (e.g. x + relu(x): no parameters)."""
    region_set = set(region)
    inputs: list[fx.Node] = []
    for n in region:
        for i in n.all_input_nodes:
            if i not in region_set and i not in inputs:
                inputs.append(i)
    modules = tuple(n.target for n in region if n.op == "call_module")
    params = sum(g.module_params(m) for m in set(modules))
    params += g.own_attr_params(inputs, region_set)
    if params == 0:
        return None
    # Reasons name values by the user's source line and module path (capture.where), never by graph node names.
    outside = [u for u in t.users if u is not add]
    if outside:
        return (f"its branch output, {describe(t, g.part)}, is also used {used_by(outside[0], g.part)}: gating it "
                "would change that use")
    for n in region:
        # An intermediate value escapes the branch; a shape may (the branch then reads its own copy).
        users = [u for u in n.users if u not in region_set]
        if n is not t and users and n not in g.shape_only:
            return (f"{describe(n, g.part)}, computed inside the branch, is also used {used_by(users[0], g.part)} "
                    "outside it")
    later = next((i for i in inputs if g.order[i] > g.order[add]), None)
    if later is not None:
        return f"its branch reads {describe(later, g.part)}, which is computed after the add"
    inputs.sort(key=lambda n: (n is not x, g.order[n]))  # x first, then side inputs in order
    return dict(
        branch_output=t.name,
        branch_inputs=tuple(n.name for n in inputs),
        branch_nodes=tuple(n.name for n in region),
        params=params,
        modules=modules,
    )


def _match(g: _Graph, add: fx.Node) -> dict | str | None:
    """The site's fields, why this block cannot be gated (a str), or None: no residual block."""
    operands = add_operands(add)
    if operands is None or any(o in g.shape_only for o in operands):
        return None
    fields = _match_operands(g, add, *operands)
    if isinstance(fields, str):
        return fields
    # With shapes known (capture.annotate), a skip that broadcasts is no residual: a dropped gate
    # returns the skip, which must already have the block's output shape.
    out_shape = add.meta.get("sd_shape")
    if fields and out_shape is not None and g.by_name[fields["skip"]].meta.get("sd_shape", out_shape) != out_shape:
        return None
    # A residual adds to an activation: a fork that is an index (positions gathered into embedding
    # tables, e.g. BERT's token types) makes a data dependence, not a block.
    if fields and not (_floating(g.by_name[fields["skip"]]) and _floating(g.by_name[fields["branch_inputs"][0]])):
        return None
    return fields


def _floating(node: fx.Node) -> bool:
    """False only when annotations say the value is not a floating-point tensor."""
    dtype = node.meta.get("sd_dtype")
    return dtype is None or dtype.is_floating_point or dtype.is_complex


def _match_operands(g: _Graph, add: fx.Node, a: fx.Node, b: fx.Node) -> dict | str | None:
    for s, t in ((a, b), (b, a)):
        region = g.branch(s, t)
        if region is not None:
            fields = _site_fields(g, add, s, t, region)
            return dict(fields, skip=s.name, shortcut="identity") if isinstance(fields, dict) else fields
    best, refused = None, None
    for s, t in ((a, b), (b, a)):
        found = _shortcut_chain(g, s, add)
        if found is None:
            continue
        x, chain = found
        region = g.branch(x, t)
        if region is None or len(chain) >= len(region):
            continue
        fields = _site_fields(g, add, x, t, region)
        if not isinstance(fields, dict):
            refused = refused or fields
            continue
        if best is not None:
            if len(chain) == best[0]:
                return None  # two symmetric paths: a sum of branches, not x + f(x)
            if len(chain) > best[0]:
                continue
        best = (len(chain), dict(fields, skip=s.name, shortcut="projection"))
    return best[1] if best else refused


@dataclass(frozen=True)
class RefusedAdd:
    """An add shaped like ``x + f(x)`` with parameters in ``f`` that cannot be gated, and why."""

    id: str  # as a site's id would be
    reason: str


def find_residuals(gm: fx.GraphModule, *, part: str = "") -> list[ResidualSite]:
    """Residual sites of ``gm`` in execution order (index from 1). Never modifies ``gm``."""
    return _find(_Graph(gm, part), part)[0]


def detect(gm: fx.GraphModule, *, part: str = "") -> tuple[list[ResidualSite], list[RefusedAdd]]:
    """``find_residuals`` and the blocks it had to refuse, each with its reason. Never modifies ``gm``."""
    return _find(_Graph(gm, part), part)


def _find(g: _Graph, part: str) -> tuple[list[ResidualSite], list[RefusedAdd]]:
    positions: Counter[str] = Counter()
    sites: list[ResidualSite] = []
    refused: list[RefusedAdd] = []
    for n in g.nodes:
        if not is_add(n):
            continue
        scope = module_scope(n)
        position = positions[scope]
        positions[scope] += 1
        fields = _match(g, n)
        if fields is None:
            continue
        path = ".".join(p for p in (part, scope) if p)
        name = "add" if position == 0 else f"add_{position}"
        if isinstance(fields, str):
            refused.append(RefusedAdd(f"{path}:{name}" if path else name, fields))
            continue
        sites.append(
            ResidualSite(
                id=f"{path}:{name}" if path else name,
                index=len(sites) + 1,
                part=part,
                add=n.name,
                **fields,
            )
        )
    return _without_multi_branch_bodies(g, sites), refused


def _without_multi_branch_bodies(g: _Graph, sites: list[ResidualSite]) -> list[ResidualSite]:
    """Drop the sums of paths that look like projection blocks and are not, and renumber. Two rules:

    - A parallel body. GPT-NeoX's parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))`` adds two parameterised paths
      from the same x, inside the branch of a residual from that x; ``mlp(ln2(x))`` is a chain back to x, so
      ``attn + mlp`` has the shape of ``f(x) + proj(x)``. It is not one: the paths are one multi-branch body
      (dropping "the branch" would drop the attention and keep the MLP). The paths may also fork from one value
      made of x by a single-input chain inside that branch: Falcon's and GPT-J's ``h = ln(x)``,
      ``x + attn(h) + mlp(h)``. A ResNet's downsampling block ``f(x) + proj(x)`` is not inside a residual of its
      own x, so it stays a block.
    - A merge of two depths. A projection shortcut stands beside one block: LR-ASPP's segmentation head
      ``classify(low) + classify(up(deeper(low)))`` has the shape of ``f(x) + proj(x)``, but its ``f`` runs
      residual blocks of its own (the rest of the backbone). It merges a shallow and a deep path; gating it would
      drop every block of the deep one. An identity skip around blocks (a residual in residual) stays a block.
    """
    fork = {s.id: s.branch_inputs[0] if s.branch_inputs else None for s in sites}
    adds = {s.add for s in sites}

    def made_of(inner: str | None, outer: ResidualSite) -> bool:
        """Whether value ``inner`` is ``outer``'s x, or made of it by a short single-input chain in its branch."""
        cur, region = g.by_name.get(inner) if inner else None, set(outer.branch_nodes)
        for _ in range(MAX_SHORTCUT_OPS + 1):
            if cur is None or cur.name == fork[outer.id]:
                return cur is not None
            ins = [i for i in g.data_inputs(cur) if i not in g.constant]
            if cur.name not in region or len(ins) != 1:
                return False
            cur = ins[0]
        return False

    body = {s.id for s in sites if s.shortcut == "projection" and (
        any(t is not s and s.add in t.branch_nodes and made_of(fork[s.id], t) for t in sites)
        or not adds.isdisjoint(s.branch_nodes))}
    kept = [s for s in sites if s.id not in body]
    return [replace(s, index=i) for i, s in enumerate(kept, 1)] if body else sites
