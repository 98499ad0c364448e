"""The compiled executor: a gate's decision as a torch.cond in the graph, its batch norms returning their statistics."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import operator
import warnings

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


def stats_branch(branch) -> tuple[torch.fx.GraphModule, list[nn.Module]] | None:
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


def _tensors_only(value) -> bool:
    """Whether ``value`` is a tensor, or a tuple/list/dict of them all the way down: what torch.cond takes."""
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return all(_tensors_only(v) for v in value)
    if isinstance(value, dict):
        return all(_tensors_only(v) for v in value.values())
    return False


def _random(module: nn.Module) -> bool:
    return isinstance(module, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)) and module.p > 0


_RANDOM_FUNCTIONS = frozenset({torch.nn.functional.dropout, torch.dropout, torch.rand, torch.randn, torch.bernoulli})


def cond_key(branch) -> str | None:
    """What a gate's cond is refused by: its branch's code (the same layers' branches share it, and so would
    their refusal: one re-trace for them all, not one per layer)."""
    return hashlib.sha1(branch.code.encode()).hexdigest()[:16] if isinstance(branch, torch.fx.GraphModule) else None


_refused: set[str] = set()  # cond keys whose torch.cond dynamo could not capture: those gates decide in Python
_tracing: list[str | None] = [None]  # the cond key of the gate dynamo is tracing now
_warned = False


def _ours(code) -> bool:
    return code.co_name == "kept" and code.co_filename == __file__


def _refuse(exc: Exception) -> None:
    """Dynamo could not capture the traced gate's cond: it and its like decide in Python from the next trace on."""
    global _warned
    _refused.add(_tracing[0])
    if not _warned:
        _warned = True
        reason = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), type(exc).__name__)
        message = (f"sdsurgeon: torch.compile cannot take a gate's branch inside torch.cond ({reason}); those gates "
                   "decide in Python, one graph break each")
        logging.getLogger(__name__).warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)


def may_decide_in_graph(key: str | None) -> bool:
    """Whether a gate whose branch has ``key`` may decide inside the compiled graph: not refused before, and a
    refusal can restart dynamo's trace (else every gate decides in Python: a user's compile never fails on one)."""
    return key is not None and key not in _refused and _torch.restart_on_uncaptured_cond(_ours, _refuse)


def _entering(key: str | None) -> bool:
    _tracing[0] = key
    return cond_backward.install(compiling=True)


# Run for real while dynamo traces the gate, not traced into the graph (_torch says what stands in where the
# private decorator is missing).
may_decide_in_graph = _torch.assume_constant_result(may_decide_in_graph)
_entering = _torch.assume_constant_result(_entering)


def _marked():
    """Nodes traced inside it carry cond_backward's gate marker (``node.meta["custom"]``), HOP subgraphs too."""
    annotate = getattr(torch.fx.traceback, "annotate", None)
    return annotate(dict(cond_backward.MARKER)) if annotate is not None else contextlib.nullcontext()


def run_cond(spec: GateSpec, cond_branch: tuple, skip: torch.Tensor, branch_inputs: tuple,
             key: str | None = None) -> torch.Tensor:
    """The gate decided inside the compiled graph: ``torch.cond`` on a traced ``torch.rand``.

    Both sides are marked so that cond_backward recognises the cond as a gate's (and saves the kept
    branch's activations for its backward); it is installed here, the first time a gate compiles this way.
    Where dynamo cannot capture the branch (a graph break or a side effect in it), the trace restarts with
    gates of this ``key`` deciding in Python (``may_decide_in_graph``).
    """
    _entering(key)
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
    names = list(weights)

    # torch.cond takes pytrees of tensors only: an input holding anything else (None for an absent mask or
    # cache, an int) is closed over, a constant of the traced branch (Gemma-3's decoder layer).
    passed = [i for i, x in enumerate(branch_inputs) if _tensors_only(x)]
    fixed = {i: x for i, x in enumerate(branch_inputs) if not _tensors_only(x)}

    def run(tensors, ws):
        if fixed:
            given = iter(tensors)
            tensors = tuple(fixed[i] if i in fixed else next(given) for i in range(len(branch_inputs)))
        return torch.func.functional_call(branch, dict(zip(names, ws)), tensors) if names else branch(*tensors)

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
    n_inputs = len(passed)
    operands = (skip, *(branch_inputs[i] for i in passed), *weights.values())
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
