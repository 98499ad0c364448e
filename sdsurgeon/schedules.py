"""Stepping a model's gates through a schedule over training steps, and the state that resumes a run exactly."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .analysis.schedule import RULES, ScheduleSpec
from .errors import ConfigError
from .gate import StochasticDepth
from .surgery.early_exit import early_exit_of
from .surgery.inject import gates
from .surgery.recipe import RECIPE_ATTR


class Schedule:
    """Steps a model's gates through a ScheduleSpec, as an LR scheduler steps an optimizer.

    Built on an injected model (its gates in depth order), it sets every gate's p for step 0 at once;
    ``step()`` after each optimizer step moves to the next. ``state_dict()`` / ``load_state_dict()``
    hold the position (and the spec, checked on load). ``expected_depth()`` and
    ``expected_flops_ratio()`` say what the current step costs in expectation. A model injected with
    ``--early-exit`` has its exit curriculum moved to the same step (``surgery.early_exit``).
    """

    def __init__(self, model: nn.Module, spec: ScheduleSpec | None = None, *, site_flops: Sequence[int] | None = None,
                 total_flops: int | None = None) -> None:
        self.gates: list[StochasticDepth] = gates(model)
        if not self.gates:
            raise ConfigError(f"{type(model).__name__} has no gates: inject it before scheduling its depth")
        self.spec = spec or _recorded(model)
        self._injected = [g.p for g in self.gates]  # what "fixed" keeps: the p_l inject chose, overrides included
        if site_flops is not None and len(site_flops) != len(self.gates):
            raise ConfigError(f"site_flops has {len(site_flops)} entries for {len(self.gates)} gates")
        self.site_flops, self.total_flops = site_flops, total_flops
        self.early_exit = early_exit_of(model)
        self.last_step = 0
        self._apply()

    @classmethod
    def from_plan(cls, model: nn.Module, plan, spec: ScheduleSpec | None = None) -> Schedule:
        """A schedule that knows each gated branch's FLOPs (``plan`` of the same model with example inputs)."""
        flops = {s.id: s.flops for s in plan.sites}
        site_flops = [flops.get(g.site_id) or 0 for g in gates(model)]
        return cls(model, spec, site_flops=site_flops, total_flops=plan.total_flops)

    def probabilities(self, step: int | None = None) -> list[float]:
        """p_l of every gate, in depth order, at ``step`` (default: the current one)."""
        if self.spec.kind == "fixed":
            return list(self._injected)
        theta = self.spec.theta(self.last_step if step is None else step)
        return [min(1.0, p) for p in RULES[self.spec.rule](len(self.gates), theta)]

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def seek(self, step: int) -> None:
        """Go to ``step`` (a training loop that counts its own steps: a Trainer's global_step, a resumed run)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ConfigError(f"a schedule's step is a whole number from 0 (got {step!r})")
        self.last_step = step
        self._apply()

    def _apply(self) -> None:
        if self.early_exit is not None:
            self.early_exit.step = self.last_step
        for gate, p in zip(self.gates, self.probabilities()):
            if gate.p != p:
                gate.replace_spec(p=p)  # the same stream: a new p is not a new seed

    def expected_depth(self, step: int | None = None) -> float:
        """Expected number of blocks that run at ``step``: the sum of p_l."""
        return sum(self.probabilities(step))

    def expected_flops_ratio(self, step: int | None = None) -> float | None:
        """Expected training FLOPs at ``step`` with gates / without (None unless built with FLOPs: ``from_plan``)."""
        if self.site_flops is None or not self.total_flops:
            return None
        saved = sum(f * (1.0 - p) for f, p in zip(self.site_flops, self.probabilities(step)))
        return (self.total_flops - saved) / self.total_flops

    def state_dict(self) -> dict[str, Any]:
        return {"spec": self.spec.to_dict(), "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        spec = ScheduleSpec.from_dict(state.get("spec", {}))
        if spec != self.spec:
            raise ConfigError(f"the saved schedule is {spec.to_dict()}, this one {self.spec.to_dict()}: "
                              "resume with the schedule the run was started with")
        self.last_step = int(state["last_step"])
        self._apply()


def _recorded(model: nn.Module) -> ScheduleSpec:
    """The recipe's schedule; else "fixed" at the recipe's p_L and rule (the gates stay as injected)."""
    recipe = getattr(model, RECIPE_ATTR, None)
    recorded = getattr(recipe, "schedule", None)
    if recorded is not None:
        return ScheduleSpec.from_dict(recorded)
    return ScheduleSpec("fixed", getattr(recipe, "p_L", None) or 0.5, getattr(recipe, "rule", None) or "linear")


def schedule(model: nn.Module, spec: ScheduleSpec | None = None, **kwargs) -> Schedule:
    """The model's schedule: ``spec``, else the one its recipe records (``inject --schedule``), else fixed."""
    return Schedule(model, spec, **kwargs)


def training_state(model: nn.Module, sched: Schedule | None = None) -> dict[str, Any]:
    """What a checkpoint needs besides weights and optimizer for a resumed run to draw exactly as an
    uninterrupted one: each seeded gate's generator state, torch's global CPU RNG state where a gate
    draws from it (unseeded gates), and the schedule's position. No collective: any rank may call it."""
    streams = {gate.site_id: gate.rng_state() for gate in gates(model) if not gate.uses_global_rng()}
    state: dict[str, Any] = {"gates": streams}
    if any(gate.uses_global_rng() for gate in gates(model)):
        state["torch_rng"] = torch.get_rng_state()
    if sched is not None:
        state["schedule"] = sched.state_dict()
    return state


def load_training_state(model: nn.Module, state: dict[str, Any], sched: Schedule | None = None) -> None:
    """Put back what ``training_state`` saved (and the schedule's position, given ``sched``)."""
    saved = state.get("gates", {})
    by_id = {gate.site_id: gate for gate in gates(model)}
    unknown = sorted(set(saved) - set(by_id))
    if unknown:
        raise ConfigError(f"the training state names gate {unknown[0]!r}, which this model does not have")
    for site_id, gate in by_id.items():
        if gate.uses_global_rng() != (site_id not in saved):
            raise ConfigError(f"gate {site_id!r} is seeded in one run and not in the other: resume the model "
                              "the state was saved from")
        if site_id in saved:
            gate.set_rng_state(saved[site_id])
    if "torch_rng" in state:
        torch.set_rng_state(state["torch_rng"])
    if sched is not None:
        if "schedule" not in state:
            raise ConfigError("the training state holds no schedule position: it was saved without one")
        sched.load_state_dict(state["schedule"])
