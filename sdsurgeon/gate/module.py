"""StochasticDepth: the gate as an nn.Module, composing its spec, its draws and the executors."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

from . import compiled, eager
from .decision import DRAW, IN_GRAPH, Draws, decides_in_graph
from .spec import GateSpec


def _spec_field(name: str) -> property:
    """``gate.<name>`` reads the spec; setting it replaces the spec (validated again)."""

    def get(self):
        return getattr(self._spec, name)

    def set(self, value):
        self.replace_spec(**{name: value})

    return property(get, set, doc=f"The spec's ``{name}``.")


class StochasticDepth(nn.Module):
    """Gate for one residual block: ``forward(skip, *branch_inputs) = skip + gate * branch(*branch_inputs)``.

    Training: ``batch`` mode draws one keep/drop per call; a dropped branch is not run at all
    (no forward, no backward). ``row`` mode draws one per sample (dim 0) and runs the branch on the
    kept samples only. ``paper`` scaling adds the branch unscaled in training and ``p * branch`` in
    eval; ``inverted`` divides by p in training and adds it unscaled in eval. Eval is deterministic.

    Settings live in a frozen ``GateSpec`` (``gate.spec``; ``gate.p``, ``gate.mode``, ... read it, and
    setting one replaces it): the gate adds nothing to the model's state_dict. The branch is a callable
    that shares its modules with the model; it is held outside the module tree so its parameters keep
    their original state_dict keys.

    Under ``torch.distributed`` the draws are the same on every rank (``sync_ranks``, the default:
    one seed is agreed on once), so every rank skips the same blocks; a dropped branch's parameters
    then get zero gradients rather than none, which DistributedDataParallel's default
    ``find_unused_parameters=False`` requires. Under ``torch.compile`` a batch-mode gate over a
    torch.fx branch is a ``torch.cond`` on a ``torch.rand`` traced into the graph (``compiled``): one
    graph for the model, drawn afresh each call; its batch norms return their batch statistics and the
    running ones are updated outside the cond, only when the branch ran. The cond's backward uses the
    activations its forward saved (``cond_backward``) rather than running the branch again.
    Other gates (row mode, seeded, under torch.distributed, ATen branches, branches with dropout
    or other buffers) decide in Python and break the graph there (see ``draw``).
    """

    p = _spec_field("p")
    mode = _spec_field("mode")
    scaling = _spec_field("scaling")
    seed = _spec_field("seed")
    site_id = _spec_field("site_id")
    index = _spec_field("index")
    copy_skip = _spec_field("copy_skip")
    sync_ranks = _spec_field("sync_ranks")
    sample_inputs = _spec_field("sample_inputs")

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
        spec = GateSpec(p, mode, scaling, seed, site_id, index, copy_skip, sync_ranks, sample_inputs)
        super().__init__()
        object.__setattr__(self, "_spec", spec)
        object.__setattr__(self, "branch", branch)  # not a registered submodule: see class doc
        # The branch as torch.cond runs it under torch.compile (built here, never while compiling).
        object.__setattr__(self, "_cond_branch", compiled.stats_branch(branch))
        object.__setattr__(self, "_cond_key", compiled.cond_key(branch))
        self._draws = Draws()

    @property
    def spec(self) -> GateSpec:
        return self._spec

    def replace_spec(self, **changes) -> None:
        """Change settings (``dataclasses.replace``, validated); a new seed or index starts a new stream."""
        spec = dataclasses.replace(self._spec, **changes)
        if (spec.seed, spec.index, spec.sync_ranks) != (self._spec.seed, self._spec.index, self._spec.sync_ranks):
            self._draws = Draws()
        object.__setattr__(self, "_spec", spec)

    @property
    def _last_draw(self) -> torch.Tensor | None:
        """The most recent uniform draw (batch: a scalar, row: one per sample)."""
        return self._draws.last

    def __getstate__(self):
        # The cond branch is derived from the branch: rebuilt on unpickling, never pickled (a GraphModule
        # unpickles by re-tracing its code, and batch_norm_with_stats computes on shapes).
        state = dict(self.__dict__)
        state.pop("_cond_branch", None)
        return state

    def __setstate__(self, state):
        if "_spec" not in state:  # pickled by the old sdsurgeon.layers.StochasticDepth: settings as attributes
            fields = {f.name: state.pop(f.name) for f in dataclasses.fields(GateSpec) if f.name in state}
            state["_spec"] = GateSpec(**fields)
            draws = Draws()
            draws.generator = state.pop("_generator", None)
            state.pop("_last_draw", None)
            state["_draws"] = draws
        if "_cond_branch" not in state:
            state["_cond_branch"] = compiled.stats_branch(state.get("branch"))
        state.setdefault("_cond_key", compiled.cond_key(state.get("branch")))
        super().__setstate__(state)

    def extra_repr(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return f"{self.site_id!r}, p={self.p:.4g}, mode={self.mode}, scaling={self.scaling}{seed}"

    def keep(self) -> bool:
        """One batch-mode draw: True with probability p."""
        return self._draws.keep(self._spec)

    def draw(self, skip: torch.Tensor) -> bool | torch.Tensor | None:
        """This call's decision: keep or not (batch mode), the kept rows (row mode); None when nothing is drawn.
        A decision drawn ahead (``draw_ahead``) is this call's."""
        return self._draws.next_decision(self._spec, self.training, skip)

    def uses_global_rng(self) -> bool:
        """Whether this gate draws from torch's global generator (unseeded, not agreeing a seed with other ranks)."""
        return self._draws.uses_global_rng(self._spec)

    def rng_state(self) -> torch.Tensor | None:
        """Its own stream's position (None: not started, or drawing from torch's global generator)."""
        return self._draws.rng_state()

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        """Continue its own stream from ``rng_state()``; None starts it afresh."""
        self._draws.set_rng_state(state)

    def draw_ahead(self) -> bool | None:
        """Draw the next call's batch-mode decision now (a sharded unit decides before it gathers its weights)."""
        if self._spec.mode != "batch":
            raise ValueError("only a batch-mode gate decides without seeing its input")
        return self._draws.draw_ahead(self._spec, self.training)

    def decides_in_graph(self) -> bool:
        """Whether a compiled model can decide this gate with torch.cond: batch mode, training, p < 1,
        unseeded, single process, a torch.fx branch whose only buffers are batch norms' with a momentum, and
        not refused by dynamo before (see ``compiled.may_decide_in_graph``)."""
        return decides_in_graph(self._spec, self.training, self._cond_branch is not None) and \
            compiled.may_decide_in_graph(self._cond_key)

    def forward(self, skip: torch.Tensor, *branch_inputs: torch.Tensor, decision=DRAW) -> torch.Tensor:
        """``decision``: the result of ``draw`` for this call; the rewritten graph draws it just before
        (see ``draw``, the function), so that under torch.compile the coin flip is made in Python."""
        spec = self._spec
        if not self.training:
            out = self.branch(*branch_inputs)
            return skip + out * spec.p if spec.scaling == "paper" else skip + out
        if spec.p >= 1.0:
            return skip + self.branch(*branch_inputs)
        if decision is IN_GRAPH:
            return compiled.run_cond(spec, self._cond_branch, skip, branch_inputs, self._cond_key)
        if decision is DRAW:
            decision = self.draw(skip)
        if spec.mode == "batch":
            return eager.batch_forward(spec, self.branch, skip, branch_inputs, decision)
        return eager.row_forward(spec, self.branch, skip, branch_inputs, decision)


def gates(model: nn.Module) -> list[StochasticDepth]:
    """The model's gates in depth order."""
    found = [m for m in model.modules() if isinstance(m, StochasticDepth)]
    return sorted(found, key=lambda g: g.index)
