"""The stochastic-depth gate: runs a residual branch with survival probability p (Huang et al. 2016)."""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import cond_backward
from .errors import ConfigError

MODES = ("batch", "row")
SCALINGS = ("paper", "inverted")


# One seed per process group, agreed once: every rank's gates then draw the same stream.
_SHARED_SEEDS: dict[int, int] = {}


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def shared_seed() -> int:
    """A seed drawn on rank 0 and broadcast once to every rank of the default process group."""
    key = id(dist.group.WORLD)
    if key not in _SHARED_SEEDS:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        if dist.get_backend() == "nccl":  # nccl moves CUDA tensors only
            seed = seed.cuda()
        dist.broadcast(seed, src=0)
        _SHARED_SEEDS[key] = int(seed.item())
    return _SHARED_SEEDS[key]


_DRAW = object()  # forward's default: draw here (a gate called directly, outside a rewritten graph)


_IN_GRAPH = object()  # draw's answer under torch.compile when the gate decides inside the graph (torch.cond)


def draw(gate: "StochasticDepth", skip: torch.Tensor):
    """The gate's decision for its next call.

    The rewritten graph calls this right before each gate. Under torch.compile a batch-mode gate
    whose branch torch.cond can take decides inside the compiled graph (a traced ``torch.rand``,
    fresh every call: one graph for the whole model). Any other gate decides in Python, outside
    the graph: the compiled model breaks there and resumes on either side of the decision, so each
    such gate costs at most two compiled continuations, whatever the drop pattern.
    """
    if torch.compiler.is_compiling() and gate.decides_in_graph():
        return _IN_GRAPH
    return _draw_in_python(gate, skip)


@torch.compiler.disable  # the coin flip stays in Python: drawn afresh, never frozen into a graph
def _draw_in_python(gate: "StochasticDepth", skip: torch.Tensor):
    return gate.draw(skip)


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


class StochasticDepth(nn.Module):
    """Gate for one residual block: ``forward(skip, *branch_inputs) = skip + gate * branch(*branch_inputs)``.

    Training: ``batch`` mode draws one keep/drop per call; a dropped branch is not run at all
    (no forward, no backward). ``row`` mode draws one per sample (dim 0) and runs the branch on the
    kept samples only. ``paper`` scaling adds the branch unscaled in training and ``p * branch`` in
    eval; ``inverted`` divides by p in training and adds it unscaled in eval. Eval is deterministic.

    All settings are plain attributes: the gate adds nothing to the model's state_dict. The branch
    is a callable that shares its modules with the model; it is held outside the module tree so its
    parameters keep their original state_dict keys.

    Under ``torch.distributed`` the draws are the same on every rank (``sync_ranks``, the default:
    one seed is agreed on once), so every rank skips the same blocks; a dropped branch's parameters
    then get zero gradients rather than none, which DistributedDataParallel's default
    ``find_unused_parameters=False`` requires. Under ``torch.compile`` a batch-mode gate over a
    torch.fx branch is a ``torch.cond`` on a ``torch.rand`` traced into the graph: one graph for the
    model, drawn afresh each call; its batch norms return their batch statistics and the running
    ones are updated outside the cond, only when the branch ran. The cond's backward uses the
    activations its forward saved (``cond_backward``) rather than running the branch again.
    Other gates (row mode, seeded, under torch.distributed, ATen branches, branches with dropout
    or other buffers) decide in Python and break the graph there (see ``draw``).
    """

    def __init__(
        self,
        p: float,
        branch: Callable[..., torch.Tensor],
        *,
        mode: str = "batch",
        scaling: str = "paper",
        seed: int | None = None,
        site_id: str = "",
        index: int = 0,
        copy_skip: bool = False,
        sync_ranks: bool = True,
        sample_inputs: tuple[bool, ...] | None = None,
    ) -> None:
        super().__init__()
        if not (0.0 < p <= 1.0):
            raise ConfigError(f"gate {site_id or index}: survival probability {p} is outside (0, 1]")
        if mode not in MODES:
            raise ConfigError(f"unknown gate mode {mode!r}; use one of: {', '.join(MODES)}")
        if scaling not in SCALINGS:
            raise ConfigError(f"unknown scaling {scaling!r}; use one of: {', '.join(SCALINGS)}")
        self.p = float(p)
        self.mode = mode
        self.scaling = scaling
        self.seed = seed
        self.site_id = site_id
        self.index = index
        # A dropped branch returns the skip itself; copy it when the block's output is later
        # modified in place (e.g. ReLU(inplace=True)), which would corrupt the skip's autograd.
        self.copy_skip = copy_skip
        self.sync_ranks = sync_ranks
        # Which branch inputs may be per-sample (row mode subsets them); None: any with the batch size.
        self.sample_inputs = sample_inputs
        object.__setattr__(self, "branch", branch)  # not a registered submodule: see class doc
        cond_backward.install()  # compiled, a kept branch's activations are saved rather than recomputed
        # The branch as torch.cond runs it under torch.compile (built here, never while compiling).
        object.__setattr__(self, "_cond_branch", _stats_branch(branch))
        self._generator: torch.Generator | None = None
        self._last_draw: torch.Tensor | None = None  # replayed when activation checkpointing recomputes

    def __getstate__(self):
        # The cond branch is derived from the branch: rebuilt on unpickling, never pickled (a GraphModule
        # unpickles by re-tracing its code, and batch_norm_with_stats computes on shapes).
        state = dict(self.__dict__)
        state.pop("_cond_branch", None)
        state["_last_draw"] = None
        return state

    def __setstate__(self, state):
        state.setdefault("sync_ranks", True)
        state.setdefault("_last_draw", None)
        state.setdefault("sample_inputs", None)
        if "_cond_branch" not in state:
            state["_cond_branch"] = _stats_branch(state.get("branch"))
        super().__setstate__(state)
        cond_backward.install()

    def extra_repr(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return f"{self.site_id!r}, p={self.p:.4g}, mode={self.mode}, scaling={self.scaling}{seed}"

    def _stream(self) -> torch.Generator | None:
        """This gate's generator: seeded by ``seed``, or by a seed all ranks share; None: torch's global one."""
        if self._generator is None:
            seed = self.seed
            if _distributed():
                if seed is None and self.sync_ranks:
                    seed = shared_seed()
                elif seed is not None and not self.sync_ranks:
                    seed = seed + 7_919 * dist.get_rank()  # independent, still reproducible, per rank
            if seed is None:
                return None
            # Distinct, reproducible stream per gate; a large odd multiplier keeps seeds from overlapping.
            self._generator = torch.Generator().manual_seed((seed * 1_000_003 + self.index) % 2**63)
        return self._generator

    def _rand(self, *shape: int) -> torch.Tensor:
        """Uniform draws on the CPU; activation checkpointing's recompute (run inside backward) replays them."""
        if torch._C._current_graph_task_id() != -1 and self._last_draw is not None:
            return self._last_draw
        generator = self._stream()
        draw = torch.rand(shape) if generator is None else torch.rand(shape, generator=generator)
        self._last_draw = draw
        return draw

    def keep(self) -> bool:
        """One batch-mode draw: True with probability p."""
        return self.p >= 1.0 or bool(self._rand() < self.p)

    def _dropped(self, skip: torch.Tensor, branch_inputs: tuple) -> torch.Tensor:
        out = skip.clone() if self.copy_skip else skip
        if _distributed() and torch.is_grad_enabled():
            # DDP (find_unused_parameters=False) needs a gradient for every parameter: give zeros.
            # The branch's own modules hold them, or (ATen graphs) the graph passes them in.
            params = [*self.branch.parameters(), *(t for t in branch_inputs if isinstance(t, nn.Parameter))]
            anchor = [p.reshape(-1)[:1] for p in params if p.requires_grad]
            if anchor:
                out = out + torch.cat(anchor).sum().to(out.dtype) * 0
        return out

    def _scaled(self, out: torch.Tensor) -> torch.Tensor:
        return out / self.p if self.scaling == "inverted" else out

    def draw(self, skip: torch.Tensor) -> bool | torch.Tensor | None:
        """This call's decision: keep or not (batch mode), the kept rows (row mode); None when nothing is drawn."""
        if not self.training or self.p >= 1.0:
            return None
        if self.mode == "batch":
            return self.keep()
        return (self._rand(skip.shape[0]) < self.p).nonzero().squeeze(1)

    def decides_in_graph(self) -> bool:
        """Whether a compiled model can decide this gate with torch.cond: batch mode, training, p < 1,
        unseeded, single process, and a torch.fx branch whose only buffers are batch norms' with a momentum."""
        # A seeded gate draws from its own generator, and distributed ranks must agree: both stay in Python.
        if self.mode != "batch" or not self.training or self.p >= 1.0 or self.seed is not None or _distributed():
            return False
        if not hasattr(torch, "cond"):  # an older torch: the Python decision, with its graph break
            return False
        return self._cond_branch is not None

    def _decide_in_graph(self, skip: torch.Tensor, branch_inputs: tuple) -> torch.Tensor:
        branch, norms = self._cond_branch
        keep = torch.rand((), device=skip.device) < self.p
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
            out, *stats = run(rest[:n_inputs], rest[n_inputs:])
            return (pin(skip + self._scaled(out).to(skip.dtype)), *stats)

        def dropped(skip, *rest):
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

    def forward(self, skip: torch.Tensor, *branch_inputs: torch.Tensor, decision=_DRAW) -> torch.Tensor:
        """``decision``: the result of ``draw`` for this call; the rewritten graph draws it just before
        (see ``draw``, the function), so that under torch.compile the coin flip is made in Python."""
        if not self.training:
            out = self.branch(*branch_inputs)
            return skip + out * self.p if self.scaling == "paper" else skip + out
        if self.p >= 1.0:
            return skip + self.branch(*branch_inputs)
        if decision is _IN_GRAPH:
            return self._decide_in_graph(skip, branch_inputs)
        if decision is _DRAW:
            decision = self.draw(skip)
        if self.mode == "batch":
            if not decision:
                return self._dropped(skip, branch_inputs)
            return skip + self._scaled(self.branch(*branch_inputs))
        return self._row_forward(skip, branch_inputs, decision)

    def _row_forward(self, skip: torch.Tensor, branch_inputs: tuple, kept: torch.Tensor) -> torch.Tensor:
        """Per-sample draws; the branch runs on the kept samples only, scattered back into the skip."""
        n = skip.shape[0]
        if kept.numel() == 0:
            return self._dropped(skip, branch_inputs)
        if kept.numel() == n:
            return skip + self._scaled(self.branch(*branch_inputs))
        kept = kept.to(skip.device)
        # Inputs sharing the skip's batch size are per-sample; others (masks, tables) pass whole.
        per_sample = self.sample_inputs or (True,) * len(branch_inputs)
        sub = [t.index_select(0, kept) if ok and isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t
               for t, ok in zip(branch_inputs, per_sample)]
        out = self._scaled(self.branch(*sub))
        return skip.index_add(0, kept, out.to(skip.dtype))


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
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
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
