"""The compiled executor: a gate's decision as a torch.cond in the graph, its batch norms returning their statistics."""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import nn

from .. import _torch
from . import cond_backward
from .eager import scaled
from .spec import GateSpec


def batch_norm_with_stats(bn: nn.Module, x: torch.Tensor):
    """Train-mode batch norm that returns its batch statistics instead of updating the running ones.

    torch.cond refuses branches that mutate buffers; the gate applies the update outside the cond. The
    statistics are the normalisation's own (one reduction): the variance comes back from its inverse
    standard deviation, made unbiased as ``nn.BatchNorm``'s running_var is.
    """
    out, mean, invstd = torch.ops.aten._native_batch_norm_legit.no_stats(x, bn.weight, bn.bias, True, 0.0, bn.eps)
    n = x.numel() // x.shape[1]
    var = (invstd.detach().pow(-2) - bn.eps) * (n / max(n - 1, 1))
    return out, mean.detach(), var


torch.fx.wrap("batch_norm_with_stats")  # a call in any graph that holds it, never traced through


def _stats_branch(branch) -> tuple[torch.fx.GraphModule, list[nn.Module]] | None:
    """A copy of a torch.fx branch whose batch norms return their batch statistics (see
    batch_norm_with_stats), returning ``(out, *means, *vars)``; None if torch.cond cannot take it."""
    import torch.fx as fx

    if not isinstance(branch, fx.GraphModule):
        return None
    graph = fx.Graph()
    env: dict = {}
    norms: list[nn.Module] = []
    stats: list[tuple] = []
    for n in branch.graph.nodes:
        if n.op == "output":
            break
        module = branch.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(module, _torch.batch_norm_classes()) and module.track_running_stats:
            if module.momentum is None:
                return None
            ref = graph.get_attr(n.target)
            both = graph.call_function(batch_norm_with_stats, (ref, env[n.args[0]]))
            env[n] = graph.call_function(operator.getitem, (both, 0))
            stats.append((graph.call_function(operator.getitem, (both, 1)),
                          graph.call_function(operator.getitem, (both, 2))))
            norms.append(module)
        elif module is not None and (any(True for _ in module.buffers()) or _random(module)):
            return None  # other state or randomness inside a cond: keep the graph break
        elif n.op == "call_function" and n.target in _RANDOM_FUNCTIONS:
            return None
        else:
            env[n] = graph.node_copy(n, env.__getitem__)
    out = next(n for n in branch.graph.nodes if n.op == "output").args[0]
    if not isinstance(out, fx.Node):
        return None
    graph.output((env[out], *(m for m, _ in stats), *(v for _, v in stats)))
    return fx.GraphModule(branch, graph, class_name="CondBranch"), norms


def _random(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)) and module.p > 0


_RANDOM_FUNCTIONS = frozenset({torch.nn.functional.dropout, torch.dropout, torch.rand, torch.randn, torch.bernoulli})


def _install_while_compiling() -> bool:
    return cond_backward.install(compiling=True)


# Run for real while dynamo traces the gate, not traced into the graph (_torch says what stands in where the
# private decorator is missing).
_install_while_compiling = _torch.assume_constant_result(_install_while_compiling)


def _marked():
    """Nodes traced inside it carry cond_backward's gate marker (``node.meta["custom"]``), HOP subgraphs too."""
    annotate = getattr(torch.fx.traceback, "annotate", None)
    return annotate(dict(cond_backward.MARKER)) if annotate is not None else contextlib.nullcontext()


def run_cond(spec: GateSpec, cond_branch: tuple, skip: torch.Tensor, branch_inputs: tuple) -> torch.Tensor:
    """The gate decided inside the compiled graph: ``torch.cond`` on a traced ``torch.rand``.

    Both sides are marked so that cond_backward recognises the cond as a gate's (and saves the kept
    branch's activations for its backward); it is installed here, the first time a gate compiles this way.
    """
    _install_while_compiling()
    branch, norms = cond_branch
    keep = torch.rand((), device=skip.device) < spec.p
    channels_last = cond_backward.channels_last_boundary()

    def pin(t):  # both sides of the cond lay every value out the same way (see cond_backward.canonical)
        return cond_backward.canonical(t, channels_last)

    # A training graph's convolution weights are re-laid out by inductor too: they cross the boundary as
    # operands, pinned like the activations (torch.cond would lift them with their traced strides). An
    # inference graph (no grad) keeps weights as they are, and so do they here.
    relaid = channels_last and torch.is_grad_enabled()
    weights = {n: w for n, w in branch.named_parameters() if w.dim() == 4} if relaid else {}
    names, n_inputs = list(weights), len(branch_inputs)

    def run(inputs, ws):
        return torch.func.functional_call(branch, dict(zip(names, ws)), inputs) if names else branch(*inputs)

    def kept(skip, *rest):
        with _marked():
            out, *stats = run(rest[:n_inputs], rest[n_inputs:])
            return (pin(skip + scaled(spec, out).to(skip.dtype)), *stats)

    def dropped(skip, *rest):
        with _marked():
            # fresh tensors (cond refuses aliased outputs), not made from the buffers updated below
            means = [skip.new_zeros(bn.num_features) for bn in norms]
            variances = [skip.new_zeros(bn.num_features) for bn in norms]
            return (pin(skip.clone()), *means, *variances)

    pinned = {}  # one pinned copy per tensor: the skip is often a branch input too (cond refuses aliases)
    operands = (skip, *branch_inputs, *weights.values())
    for t in operands:
        if id(t) not in pinned:
            pinned[id(t)] = pin(t)
    out, *stats = torch.cond(keep, kept, dropped, tuple(pinned[id(t)] for t in operands))
    with torch.no_grad():  # the running statistics move only when the branch ran, as in eager
        weight = keep.to(skip.dtype)
        for bn, mean, var in zip(norms, stats[:len(norms)], stats[len(norms):]):
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), weight * bn.momentum)
            bn.running_var.lerp_(var.to(bn.running_var.dtype), weight * bn.momentum)
            bn.num_batches_tracked.add_(keep.to(bn.num_batches_tracked.dtype))
    return out
