"""How a gate's torch.cond is differentiated under torch.compile: the kept branch's activations are saved, not recomputed.

torch 2.13 differentiates ``torch.cond`` by running the branch's joint forward+backward graph inside the
backward cond (``CondAutogradOp``): every kept branch runs its forward twice. On a compiled ResNet-56 whose
gates always keep, that cost 1.24x the compiled original. Here the branch is partitioned the way torch's
``scan`` already is (``HopGraphMinCutPartitioner``): the forward cond also returns what the backward needs
(the other side returns uninitialised placeholders of the same shapes), and the backward cond only runs the
backward graph. 4-D values crossing the boundary are kept channels-last when the branch convolves, the
layout inductor gives convolutions, so no copies are made at each gate.

Inductor compiles each cond subgraph for the strides its operands were traced with, but hands it the
operands laid out as its own lowering chose (channels-last convolutions, a permuted norm's output: timm's
ConvNeXt crashed in ``assert_size_stride``). So, while a model compiles, the inductor lowering of every
``torch.cond`` is wrapped to require those traced strides of each operand (a copy only where they differ,
where the subgraph would otherwise fail its input check). inductor's ``view_to_reshape`` is wrapped too: it
rewrites cond subgraphs' graphs but not their code, which the cond's fake propagation then runs.

Only conds whose branches carry ``MARKER`` (a gate traces its sides inside ``torch.fx.traceback.annotate``,
which puts it in each node's ``meta["custom"]``) are handled; every other cond, and any gate whose branch
cannot be partitioned, goes to torch's own implementation unchanged (logged once). Everything here is
private to torch: ``install`` first checks that the running torch has each name it uses (``missing``) and
otherwise leaves torch alone, logging once; gates then train compiled with torch's own backward. Nothing is
installed by ``import sdsurgeon``, by making or unpickling a gate, or by eager training: the first gate that
decides inside a compiled graph installs it (while dynamo traces it), or ``install()`` does; ``uninstall``
puts everything back; ``enabled`` switches the behaviour off (for benchmarks and debugging) without
uninstalling. This module imports nothing of the gate's: it sits below the executor that uses it.
"""

from __future__ import annotations

import importlib
import logging
import warnings

import torch

log = logging.getLogger(__name__)

# The private torch names this module relies on, checked at install time on the running torch.
REQUIRED = {
    "torch._higher_order_ops.cond": ("CondAutogradOp", "cond_op"),
    "torch._higher_order_ops.utils": ("save_values_for_backward", "saved_values"),
    "torch._higher_order_ops.partitioner": ("HopGraphMinCutPartitioner",),
    "torch.fx.experimental.proxy_tensor": ("disable_proxy_modes_tracing",),
}

# Checked while a model compiles (importing inductor costs seconds; only a compile needs it).
REQUIRED_WHILE_COMPILING = {
    "torch._inductor.lowering": ("lowerings",),
    "torch._inductor.ir": ("ExternKernel", "TensorBox"),
    "torch._inductor.virtualized": ("V",),
    "torch._inductor.compile_fx": ("view_to_reshape",),
}

# The annotation a gate's cond branches are traced under (``node.meta["custom"]``): how their conds are known.
MARKER = {"sdsurgeon": "gate"}

enabled = True
plans_built = 0  # conds this module differentiated (tests read it)
_torch_cond_autograd = None  # torch's own CondAutogradOp while ours stands in for it
_torch_cond_lowering = None  # inductor's own cond lowering while ours wraps it
_torch_view_to_reshape = None  # inductor's own view_to_reshape while ours wraps it
_compile_callback = None  # registered with dynamo: wraps the lowering when a compile starts
_warned = False
_logged_fallback = False


def missing(required: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """The names in ``required`` (default REQUIRED) that the running torch lacks (empty: the saved-activation
    backward can run)."""
    absent = []
    for module_name, names in (REQUIRED if required is None else required).items():
        try:
            module = importlib.import_module(module_name)
        except Exception:
            absent.append(module_name)
            continue
        absent += [f"{module_name}.{n}" for n in names if not hasattr(module, n)]
    return absent


def install(compiling: bool = False) -> bool:
    """Route the autograd of torch.cond through ``_Dispatch`` (gates here, everything else to torch).

    Idempotent. Returns whether it is installed; where the running torch lacks a name it needs, nothing
    is replaced and one warning says compiled gates use torch's own (recomputing) cond backward.
    ``compiling``: called while dynamo traces a model, after this compile's start callbacks have run, so
    inductor's cond lowering is wrapped now (AOT autograd and inductor run after the trace: early enough).
    """
    global _torch_cond_autograd
    if _torch_cond_autograd is not None:
        _register_compile_callback()
        if compiling:
            _wrap_cond_lowering()
        return True
    absent = missing()
    if absent:
        _warn_once(f"sdsurgeon: torch {torch.__version__} lacks {absent[0]}; compiled gates use torch's own "
                   "cond backward, which runs each kept branch's forward twice")
        return False
    cond = importlib.import_module("torch._higher_order_ops.cond")
    _torch_cond_autograd = cond.CondAutogradOp
    cond.CondAutogradOp = _Dispatch
    _register_compile_callback()
    if compiling:
        _wrap_cond_lowering()
    log.info("sdsurgeon: torch %s's cond backward now saves gates' activations (uninstall() restores it)",
             torch.__version__)
    return True


def uninstall() -> None:
    """Give torch its own CondAutogradOp and inductor its own cond lowering back."""
    global _torch_cond_autograd, _torch_cond_lowering, _torch_view_to_reshape, _compile_callback
    if _torch_cond_autograd is not None:
        importlib.import_module("torch._higher_order_ops.cond").CondAutogradOp = _torch_cond_autograd
        _torch_cond_autograd = None
    if _compile_callback is not None:
        try:
            importlib.import_module("torch._dynamo.callback").callback_handler.remove_start_callback(_compile_callback)
        except Exception:  # a torch without the removal API: the callback finds nothing installed and does nothing
            pass
        _compile_callback = None
    if _torch_cond_lowering is not None:
        lowering = importlib.import_module("torch._inductor.lowering")
        lowering.lowerings[torch.ops.higher_order.cond] = _torch_cond_lowering
        _torch_cond_lowering = None
    if _torch_view_to_reshape is not None:
        importlib.import_module("torch._inductor.compile_fx").view_to_reshape = _torch_view_to_reshape
        _torch_view_to_reshape = None


def _register_compile_callback() -> None:
    """Ask dynamo to call ``_wrap_cond_lowering`` when a compile starts (inductor is loaded by then).

    Checked at every install call (each compile of a gate): ``torch._dynamo.reset()`` clears dynamo's callbacks. A training compile
    also wraps the lowering from ``_Dispatch.apply``, whatever was reset in between.
    """
    global _compile_callback
    try:
        handler = importlib.import_module("torch._dynamo.callback").callback_handler
        if _compile_callback is not None and _compile_callback in handler.start_callbacks:
            return
        _compile_callback = handler.register_start_callback(lambda *_args: _wrap_cond_lowering())
    except Exception as exc:  # a torch without dynamo's callbacks: compiled conds keep inductor's lowering
        _warn_once(f"sdsurgeon: torch {torch.__version__} has no compile-start callback ({type(exc).__name__}); "
                   "compiled gates keep inductor's own cond lowering")


def _wrap_cond_lowering() -> None:
    """Make inductor's cond lowering give each operand the strides its subgraphs were traced with, and its
    views of cond subgraphs run as reshapes (``_recompiling_view_to_reshape``)."""
    global _torch_cond_lowering, _torch_view_to_reshape
    if _torch_cond_lowering is not None or _torch_cond_autograd is None:
        return
    absent = missing(REQUIRED_WHILE_COMPILING)
    if absent:
        _warn_once(f"sdsurgeon: torch {torch.__version__} lacks {absent[0]}; compiled gates keep inductor's own "
                   "cond lowering")
        return
    lowering = importlib.import_module("torch._inductor.lowering")
    original = lowering.lowerings.get(torch.ops.higher_order.cond)
    if original is None:
        return
    _torch_cond_lowering = original

    def cond(pred, true_fn, false_fn, operands, *rest):
        try:
            operands = _as_traced(operands)
        except Exception as exc:  # an inductor that changed underneath: lower the cond as inductor would
            _warn_once(f"sdsurgeon: could not give a cond's operands their traced strides ({type(exc).__name__}: "
                       f"{exc}); inductor lowers it unchanged")
        return original(pred, true_fn, false_fn, operands, *rest)

    lowering.lowerings[torch.ops.higher_order.cond] = cond

    compile_fx = importlib.import_module("torch._inductor.compile_fx")
    _torch_view_to_reshape = compile_fx.view_to_reshape
    compile_fx.view_to_reshape = _recompiling_view_to_reshape


def _recompiling_view_to_reshape(gm) -> None:
    """inductor's ``view_to_reshape``, then every subgraph recompiled.

    inductor turns views into reshapes because its layouts (a channels-last convolution output) can differ
    from the traced ones, and it does so in cond subgraphs too, but edits only their graphs: the cond's
    fake-tensor rule then runs the subgraphs' stale code, whose views fail on those layouts ("Cannot view a
    tensor with shape [2, 32, 8, 8] and strides (2048, 1, 32, 256)": a GroupNorm backward in timm's
    PoolFormerV2 and torchvision's ConvNeXt).
    """
    _torch_view_to_reshape(gm)
    try:
        for module in gm.modules():
            if module is not gm and isinstance(module, torch.fx.GraphModule):
                module.recompile()
    except Exception as exc:  # a subgraph that cannot regenerate its code: it keeps the code it had
        _warn_once(f"sdsurgeon: could not recompile a cond subgraph ({type(exc).__name__}: {exc})")


def _as_traced(operands):
    """Each tensor operand of the cond being lowered, required to have the strides it was traced with."""
    ir = importlib.import_module("torch._inductor.ir")
    graph = importlib.import_module("torch._inductor.virtualized").V.graph
    traced = graph.current_node.args[-1]
    out = []
    for x, node in zip(operands, traced):
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(x, ir.TensorBox) and isinstance(val, torch.Tensor) and val.dim():
            strides = [s.node.expr if isinstance(s, torch.SymInt) else s for s in val.stride()]
            x = ir.ExternKernel.require_exact_strides(x, strides, allow_padding=False)
        out.append(x)
    return out


def _warn_once(message: str) -> None:
    """A fallback to torch's own behaviour, said once per process: in the log and as a RuntimeWarning."""
    global _warned
    if not _warned:
        _warned = True
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def installed() -> bool:
    return _torch_cond_autograd is not None


def channels_last_boundary() -> bool:
    """Whether 4-D values cross a gate's cond channels-last: when inductor's layout optimisation is on.

    It runs convolutions channels-last and hands a cond's subgraphs tensors in that layout, while each
    subgraph was compiled for the strides it was traced with: its input asserts then fail ("expected ...
    stride 1==256", torchvision's ResNet-18). Pinning 4-D operands and outputs channels-last makes the traced
    strides the ones inductor uses.
    """
    try:
        from torch._inductor import config as inductor_config

        return bool(inductor_config.layout_optimization)
    except Exception:  # no inductor in this torch: nothing reorders layouts
        return False


def canonical(t, channels_last: bool):
    """``t`` laid out the one way both sides of a cond agree on: dense, channels-last for 4-D values when
    ``channels_last``, else row-major, with exactly the canonical strides.

    torch.cond compares the strides of its branches' outputs: an attention branch returns a permuted layout
    where the dropped side returns a copy of the skip (timm's ViT), and a dim of size 1 lets one layout carry
    other strides ((C,1,1,1) vs (C,1,C,C), EfficientNet).
    """
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.contiguous_format
    if not t.is_contiguous(memory_format=fmt):
        return t.contiguous(memory_format=fmt)  # a fresh tensor with the canonical strides
    order = (0, 2, 3, 1) if fmt is torch.channels_last else tuple(range(t.dim()))
    strides, step = [0] * t.dim(), 1
    for d in reversed(order):
        strides[d] = step
        step = step * t.shape[d]
    return t if tuple(t.stride()) == tuple(strides) else t.as_strided(t.shape, strides)


def _from_gate(graph_module) -> bool:
    """Whether a cond branch was traced as a gate's side: some node carries ``MARKER`` in ``meta["custom"]``."""
    for node in graph_module.graph.nodes:
        custom = node.meta.get("custom")
        if isinstance(custom, dict) and all(custom.get(k) == v for k, v in MARKER.items()):
            return True
    return False


class _Dispatch:
    """Stands in for torch's CondAutogradOp: same ``apply`` signature."""

    @staticmethod
    def apply(pred, true_fn, false_fn, *operands):
        global plans_built
        _wrap_cond_lowering()  # compiling now: inductor lowers this cond later
        plan = None
        if enabled and isinstance(true_fn, torch.fx.GraphModule) and _from_gate(true_fn):
            try:
                plan = _Plan.build(true_fn, false_fn, operands)
            except Exception as exc:  # anything unexpected in the partition: torch's own (recomputing) path
                _log_fallback(exc)
        if plan is None:
            return _torch_cond_autograd.apply(pred, true_fn, false_fn, *operands)
        plans_built += 1
        return _SavedCond.apply(plan, pred, *operands)


def _log_fallback(exc: Exception) -> None:
    global _logged_fallback
    if not _logged_fallback:
        _logged_fallback = True
        log.warning("a gate's branch could not be partitioned (%s: %s); torch's own cond backward runs it, "
                    "recomputing its forward", type(exc).__name__, exc)


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
        return canonical(t, self.channels_last)

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
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

        channels_last = channels_last_boundary()  # as the gate's forward pinned its operands
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


def _cond_op(*args):
    return importlib.import_module("torch._higher_order_ops.cond").cond_op(*args)


class _SavedCond(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, pred, *operands):
        with torch._C._AutoDispatchBelowAutograd():
            results = _cond_op(pred, plan.forward_graph(0), plan.forward_graph(1), operands)
        n_out = plan.sides[0].n_out
        ctx.plan = plan
        utils = importlib.import_module("torch._higher_order_ops.utils")
        utils.save_values_for_backward(ctx, (pred, *operands, *results[n_out:]))  # operands may hold SymInts
        return tuple(results[:n_out])

    @staticmethod
    def backward(ctx, *grads):
        plan = ctx.plan
        pred, *saved = importlib.import_module("torch._higher_order_ops.utils").saved_values(ctx)
        kept = plan.sides[0]
        # Incoming gradients are laid out by whatever ran after the gate, differently when traced and when
        # run under inductor's layout optimisation: each crosses the cond in the canonical layout too.
        grads = [kept.layout(torch.zeros(v.shape, dtype=v.dtype, device=v.device) if g is None else g)
                 for g, v in zip(grads, kept.out_vals)]
        results = iter(_cond_op(pred, plan.backward_graph(0), plan.backward_graph(1), (*saved, *grads)))
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
