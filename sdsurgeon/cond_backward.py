"""How a gate's torch.cond is differentiated under torch.compile: the kept branch's activations are saved, not recomputed.

torch 2.13 differentiates ``torch.cond`` by running the branch's joint forward+backward graph inside the
backward cond (``CondAutogradOp``): every kept branch runs its forward twice. On a compiled ResNet-56 whose
gates always keep, that cost 1.24x the compiled original. Here the branch is partitioned the way torch's
``scan`` already is (``HopGraphMinCutPartitioner``): the forward cond also returns what the backward needs
(the other side returns uninitialised placeholders of the same shapes), and the backward cond only runs the
backward graph. 4-D values crossing the boundary are kept channels-last when the branch convolves, the
layout inductor gives convolutions, so no copies are made at each gate.

Only conds traced from a ``StochasticDepth`` gate are handled; every other cond, and any gate whose branch
cannot be partitioned, goes to torch's own implementation unchanged. ``install`` is idempotent; ``enabled``
switches the behaviour off (for benchmarks and debugging) without uninstalling.
"""

from __future__ import annotations

import importlib

import torch
from torch._higher_order_ops.utils import save_values_for_backward, saved_values

_COND = importlib.import_module("torch._higher_order_ops.cond")
_TORCH_COND_AUTOGRAD = getattr(_COND, "CondAutogradOp", None)  # private to torch: absent, nothing is replaced

enabled = True
plans_built = 0  # conds this module differentiated (tests read it)


def boundary_layout():
    """How 4-D values must be laid out where they cross a gate's cond, under the inductor config now in force.

    Inductor's layout optimisation runs convolutions channels-last and hands a cond's subgraphs tensors in
    that layout, while each subgraph was compiled for the strides it was traced with (contiguous): its input
    asserts then fail ("expected ... stride 1==256", torchvision's ResNet-18), and two branches may return
    differently ordered strides (EfficientNet). Pinning every 4-D operand and output to channels-last makes
    the traced strides the ones inductor uses. Without layout optimisation (or inductor), nothing is pinned.
    """
    try:
        from torch._inductor import config as inductor_config

        channels_last = bool(inductor_config.layout_optimization)
    except Exception:  # no inductor in this torch: nothing reorders layouts
        channels_last = False
    if not channels_last:
        return as_is
    return _channels_last


def as_is(t):
    return t


def _channels_last(t):
    """t channels-last with exactly the canonical strides: cond compares the strides of its branches'
    outputs, and a dim of size 1 lets the same layout carry other strides ((C,1,1,1) vs (C,1,C,C))."""
    if not (isinstance(t, torch.Tensor) and t.dim() == 4):
        return t
    if not t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous(memory_format=torch.channels_last)  # a fresh tensor, canonical strides
    n, c, h, w = t.shape
    canonical = (h * w * c, 1, w * c, c)
    return t if tuple(t.stride()) == canonical else t.as_strided(t.shape, canonical)


def install() -> None:
    """Route the autograd of torch.cond through ``_Dispatch`` (gates here, everything else to torch)."""
    if _TORCH_COND_AUTOGRAD is not None:
        _COND.CondAutogradOp = _Dispatch


def _from_gate(graph_module) -> bool:
    """Whether a cond branch was traced inside a StochasticDepth gate (dynamo's nn_module_stack says so)."""
    from .layers import StochasticDepth

    for node in graph_module.graph.nodes:
        for _path, cls in (node.meta.get("nn_module_stack") or {}).values():
            if cls is StochasticDepth:
                return True
    return False


class _Dispatch:
    """Stands in for torch's CondAutogradOp: same ``apply`` signature."""

    @staticmethod
    def apply(pred, true_fn, false_fn, *operands):
        global plans_built
        plan = None
        if enabled and isinstance(true_fn, torch.fx.GraphModule) and _from_gate(true_fn):
            try:
                plan = _Plan.build(true_fn, false_fn, operands)
            except Exception:  # anything unexpected in the partition: torch's own (recomputing) path
                plan = None
        if plan is None:
            return _TORCH_COND_AUTOGRAD.apply(pred, true_fn, false_fn, *operands)
        plans_built += 1
        return _SavedCond.apply(plan, pred, *operands)


def _fresh(t, seen: list):
    """t, cloned when it aliases an input or an earlier output: cond refuses aliased outputs."""
    if t is not None and any(t is s for s in seen):
        t = t.clone()
    seen.append(t)
    return t


class _Side:
    """One branch, partitioned into a forward that also returns its saved values and a backward that takes them."""

    def __init__(self, partitioned, channels_last: bool):
        self.part = partitioned
        self.channels_last = channels_last
        placeholders = {n: i for i, n in enumerate(partitioned.fw_gm.graph.find_nodes(op="placeholder"))}
        outputs = list(partitioned.fw_gm.graph.find_nodes(op="output")[0].args[0])
        self.n_out = partitioned.n_fw_outputs
        self.out_vals = [n.meta["val"] for n in outputs[: self.n_out]]
        self.saved: list[tuple[str, int]] = []  # ("operand", k): an input kept as is; ("computed", j)
        self.computed_vals: list[torch.Tensor] = []
        for node in outputs[self.n_out:]:
            if node in placeholders:
                self.saved.append(("operand", placeholders[node]))
                continue
            val = node.meta["val"]
            if not isinstance(val, torch.Tensor):
                raise NotImplementedError(f"the branch saves a non-tensor value {val!r}")
            self.saved.append(("computed", len(self.computed_vals)))
            self.computed_vals.append(val)

    def layout(self, t):
        return _channels_last(t) if self.channels_last else t

    def forward(self, operands):
        results = self.part.fw_gm(*operands)
        seen = list(operands)
        outs = [self.layout(_fresh(o, seen)) for o in results[: self.n_out]]
        computed = [self.layout(_fresh(results[self.n_out + i], seen))
                    for i, (kind, _) in enumerate(self.saved) if kind == "computed"]
        return outs, computed

    def backward(self, operands, computed, grads):
        values = [operands[k] if kind == "operand" else computed[k] for kind, k in self.saved]
        return self.part.bw_gm(*values, *grads)


class _Plan:
    """Both sides of one cond and the graphs the forward and backward conds run."""

    def __init__(self, kept: _Side, dropped: _Side, operands):
        self.sides = (kept, dropped)
        self.n_operands = len(operands)
        # Gradient slots: floating tensors that need one (cond outputs must be tensors, never None).
        self.grad_mask = [isinstance(o, torch.Tensor) and o.dtype.is_floating_point and o.requires_grad
                          for o in operands]

    @staticmethod
    def build(true_fn, false_fn, operands) -> "_Plan":
        from torch._higher_order_ops.partitioner import HopGraphMinCutPartitioner
        from torch._inductor import config as inductor_config
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        convolves = any("conv" in str(n.target) for n in true_fn.graph.nodes if n.op == "call_function")
        channels_last = convolves and bool(inductor_config.layout_optimization)
        with disable_proxy_modes_tracing():
            kept = _Side(HopGraphMinCutPartitioner.create_partitioned_graph(true_fn, operands), channels_last)
            dropped = _Side(HopGraphMinCutPartitioner.create_partitioned_graph(false_fn, operands), channels_last)
        if kept.n_out != dropped.n_out:
            raise NotImplementedError("the branches return different numbers of values")
        return _Plan(kept, dropped, operands)

    def placeholders(self, side: _Side) -> list[torch.Tensor]:
        return [side.layout(torch.empty(v.shape, dtype=v.dtype, device=v.device)) for v in side.computed_vals]

    def forward_graph(self, which: int):
        def run(*operands):
            outs, computed = self.sides[which].forward(operands)
            saved = [self.placeholders(side) for side in self.sides]
            saved[which] = computed
            return (*outs, *saved[0], *saved[1])

        return run

    def backward_graph(self, which: int):
        n_ops, n_kept, n_dropped = self.n_operands, *(len(s.computed_vals) for s in self.sides)

        def run(*args):
            operands = args[:n_ops]
            computed = (args[n_ops:n_ops + n_kept], args[n_ops + n_kept:n_ops + n_kept + n_dropped])
            grads = args[n_ops + n_kept + n_dropped:]
            side = self.sides[which]
            raw = side.backward(operands, computed[which], grads)
            seen = list(args)
            return [_flat(side.layout(_fresh(torch.zeros_like(op) if g is None else g, seen)), op)
                    for g, op, slot in zip(raw, operands, self.grad_mask) if slot]

        return run


class _SavedCond(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, pred, *operands):
        with torch._C._AutoDispatchBelowAutograd():
            results = _COND.cond_op(pred, plan.forward_graph(0), plan.forward_graph(1), operands)
        n_out = plan.sides[0].n_out
        ctx.plan = plan
        save_values_for_backward(ctx, (pred, *operands, *results[n_out:]))  # operands may hold SymInts
        return tuple(results[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        pred, *saved = saved_values(ctx)
        kept = plan.sides[0]
        grads = [kept.layout(torch.zeros(v.shape, dtype=v.dtype, device=v.device)) if g is None else g
                 for g, v in zip(grads, kept.out_vals)]
        results = iter(_COND.cond_op(pred, plan.backward_graph(0), plan.backward_graph(1), (*saved, *grads)))
        operands = saved[:plan.n_operands]
        return (None, None, *(_unflat(next(results), op) if slot else None for slot, op in zip(plan.grad_mask, operands)))


def _ambiguous(like) -> bool:
    """A shape whose size-1 dims let one memory layout carry several strides (a 1x1 conv weight, a pooled map)."""
    return isinstance(like, torch.Tensor) and like.dim() >= 2 and any(d == 1 for d in like.shape[1:])


def _flat(t, like):
    """Gradients cross the backward cond flat where their strides are ambiguous: inductor compares the two
    branches' output strides, and lays out each side's size-1 dims its own way ((C,1,1,1) vs (C,1,C,C))."""
    return t.contiguous().reshape(-1) if _ambiguous(like) else t


def _unflat(t, like):
    return t.view(like.shape) if _ambiguous(like) else t
