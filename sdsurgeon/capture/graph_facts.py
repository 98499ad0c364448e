"""Read-only facts about fx graphs that capture and detection share: effects, dead values, shapes, constants,
in-place writes."""

from __future__ import annotations

import operator
from typing import Iterable

import torch
import torch.fx as fx

from .. import _torch

_aten = torch.ops.aten

# Ops whose result describes a tensor's shape, not its values: an edge through them is not a data
# dependence, so `x + pos_emb(arange(x.size(1)))` is not mistaken for a residual block.
SHAPE_METHODS = frozenset({"size", "dim", "numel", "nelement", "ndimension", "get_device"})
SHAPE_ATTRS = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout"})
SHAPE_FUNCTIONS = frozenset(
    {_aten.sym_size.int, _aten.sym_size.default, _aten.sym_numel.default, _aten.sym_stride.int}
) | _torch.transformer_shape_readers()  # torch.nn's transformer stacks read their input's length (capture.torch_nn)

# Checks whose only effect is to raise (timm's `_assert(x.ndim == 4)`, export's shape asserts): a
# branch may carry them along, so they never make a value count as used outside it.
CHECK_FUNCTIONS = _torch.check_functions()
_INPLACE_OPERATORS = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv})


def _is_shape_op(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in SHAPE_METHODS
    if node.op == "call_function":
        if node.target is getattr:
            return len(node.args) > 1 and node.args[1] in SHAPE_ATTRS
        return node.target in SHAPE_FUNCTIONS
    return False


def shape_only_nodes(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    shape_only: set[fx.Node] = set()
    for n in nodes:
        ins = n.all_input_nodes
        if _is_shape_op(n) or (ins and all(i in shape_only for i in ins)):
            shape_only.add(n)
    return shape_only


# The metadata that a model's calls share whatever their batch and sequence sizes: dtype, device and rank. A trace on
# one call may decide conditions on them (capture.fx._LeafTracer), never on sizes (a decoder's next-token call has length 1).
SIZE_FREE_METHODS = frozenset({"dim", "ndimension", "get_device"})
SIZE_FREE_ATTRS = frozenset({"dtype", "device", "ndim", "is_cuda", "layout"})


def _reads(node: fx.Node, methods: frozenset[str], attrs: frozenset[str]) -> bool:
    if node.op == "call_method":
        return node.target in methods
    return (node.op == "call_function" and node.target is getattr and len(node.args) > 1
            and node.args[1] in attrs)


def size_free(node: fx.Node) -> bool:
    """Whether ``node``'s value depends on tensors' dtypes, devices and ranks alone: every path back from it passes
    through a read of one of them (``x.dtype == torch.float16``, ``x.dim() == 3``), and it reads nothing else."""
    seen: dict[fx.Node, bool] = {}

    def free(n: fx.Node) -> bool:
        if n not in seen:
            ins = n.all_input_nodes
            seen[n] = _reads(n, SIZE_FREE_METHODS, SIZE_FREE_ATTRS) or (
                n.op in ("call_function", "call_method") and bool(ins) and all(free(i) for i in ins))
        return seen[n]

    return free(node)


def has_effect(n: fx.Node) -> bool:
    """Whether ``n`` matters even when nothing reads its value (it writes, or it is the output).

    Module calls count as effects (a module may update its buffers); checks do not (see CHECK_FUNCTIONS).
    """
    if n.op in ("placeholder", "output", "call_module"):
        return True
    if n.op == "call_method":
        return writes_in_place(n)  # in-place tensor methods: add_, copy_, ...
    if n.op != "call_function":
        return False
    if n.target in CHECK_FUNCTIONS:
        return False
    if n.target in _INPLACE_OPERATORS or n.kwargs.get("inplace"):
        return True
    if (schema := _torch.op_schema(n.target)) is not None and schema.is_mutable:
        return True
    try:
        return n.is_impure()
    except Exception:  # an fx version whose purity check needs what a bare graph lacks
        return False


def dead_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """Values nothing depends on: no path to the output or to an effect (``C`` of ``B, N, C = x.shape``,
    the weights of ``out, _ = attn(x)``, a check's operands). One reverse pass over the graph."""
    dead: set[fx.Node] = set()
    for n in reversed(nodes):
        if not has_effect(n) and all(u in dead for u in n.users):
            dead.add(n)
    return dead


def constant_nodes(nodes: list[fx.Node], shape_only: set[fx.Node]) -> set[fx.Node]:
    """Values made from model attributes and shapes alone (a parameter, ``scale.view(C, 1, 1)`` with C
    read off the input): not data inputs."""
    constant: set[fx.Node] = set()
    for n in nodes:
        ins = n.all_input_nodes
        if n.op == "get_attr" or (
            n.op in ("call_function", "call_method") and any(i in constant for i in ins)
            and all(i in constant or i in shape_only for i in ins)
        ):
            constant.add(n)
    return constant


# Results that share their input's memory: an in-place write to one is a write to its base.
VIEW_METHODS = frozenset({"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "unsqueeze", "squeeze",
                          "expand", "expand_as", "narrow", "flatten", "unflatten", "t", "select", "split", "chunk",
                          "unbind", "movedim", "__getitem__"})
VIEW_FUNCTIONS = frozenset({operator.getitem, torch.reshape, torch.transpose, torch.permute, torch.unsqueeze,
                            torch.squeeze, torch.narrow, torch.flatten, torch.select, torch.split, torch.chunk,
                            torch.unbind, torch.movedim})


def writes_in_place(n: fx.Node, gm: fx.GraphModule | None = None) -> bool:
    """Whether ``n`` overwrites its first argument (``copy_``, ``add_``, ``x[i] = v``, ``+=``; with ``gm``, also a
    module called with ``inplace=True`` such as ``nn.ReLU(inplace=True)``)."""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_module":
        return gm is not None and bool(getattr(gm.get_submodule(n.target), "inplace", False))
    if n.op == "call_method":
        return str(n.target).endswith("_") and not str(n.target).startswith("__")
    if n.op != "call_function":
        return False
    if n.target in _INPLACE_OPERATORS or n.kwargs.get("inplace"):
        return True
    schema = _torch.op_schema(n.target)
    if schema is not None:
        mutated = schema.arguments[:1]
        return bool(mutated) and mutated[0].alias_info is not None and mutated[0].alias_info.is_write
    return False


def is_view(n: fx.Node) -> bool:
    """Whether ``n``'s result shares its first argument's memory (``view``, ``permute``, ``x[i]``, ATen views)."""
    if n.op == "call_method":
        return n.target in VIEW_METHODS
    if n.op != "call_function":
        return False
    schema = _torch.op_schema(n.target)
    if schema is not None:
        return (bool(schema.returns) and schema.returns[0].alias_info is not None
                and not any(a.alias_info is not None and a.alias_info.is_write for a in schema.arguments))
    return n.target in VIEW_FUNCTIONS


def _base(n: fx.Node) -> fx.Node:
    while is_view(n) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def write_edges(nodes: list[fx.Node]) -> dict[fx.Node, list[fx.Node]]:
    """Reads that depend on an earlier in-place write: reader -> the writes it sees.

    ``attn[:, :, 1:, 1:] = attn_view + rel_pos`` (MViTv2: a ``copy_`` into a slice of ``attn``) leaves no edge
    from the written value to ``softmax(attn)``; without one, that value looks computed for nothing, or used
    outside the branch. A later read of the written tensor, or of any view of it, sees the write.
    """
    order = {n: i for i, n in enumerate(nodes)}
    views: dict[fx.Node, list[fx.Node]] = {}  # base -> the base and its views
    for n in nodes:
        views.setdefault(_base(n), []).append(n)
    edges: dict[fx.Node, list[fx.Node]] = {}
    for w in nodes:
        if not writes_in_place(w):
            continue
        for alias in views.get(_base(w.args[0]), ()):
            for reader in alias.users:
                if order.get(reader, -1) > order[w] and reader is not w:
                    edges.setdefault(reader, []).append(w)
    return edges
