"""Survival-probability rules p_l over depth and over training steps, per-site overrides, expected depth and cost."""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Callable, Hashable, Iterable, Sequence

from ..choices import RULE_NAMES
from ..errors import ConfigError, option_error
from ..options import regex_problem


def linear_decay(L: int, p_L: float) -> list[float]:
    """The paper's rule: p_l = 1 - (l / L) * (1 - p_L) for l = 1..L."""
    return [1.0 - (l / L) * (1.0 - p_L) for l in range(1, L + 1)]


def uniform(L: int, p_L: float) -> list[float]:
    """Every block survives with the same probability p_L."""
    return [p_L] * L


def exponential(L: int, p_L: float) -> list[float]:
    """LayerSkip's rate (Elhoushi et al. 2024, eq. 1, its depth part): the drop rate rises exponentially with depth,
    p_max (e^(l ln 2 / (L - 1)) - 1) for l = 0..L-1, from 0 at the first block to p_max = 1 - p_L at the last;
    p_l = 1 - that. One block alone gets p_L."""
    if L == 1:
        return [p_L]
    return [1.0 - (1.0 - p_L) * (math.exp(l * math.log(2) / (L - 1)) - 1.0) for l in range(L)]


# In the order choices.RULE_NAMES names them (what options and --help check and show, without torch).
RULES: dict[str, Callable[[int, float], list[float]]] = dict(zip(RULE_NAMES, (linear_decay, uniform, exponential),
                                                                strict=True))


@dataclass(frozen=True)
class Override:
    """``--set PATTERN=P``: sites whose id matches PATTERN (re.search) get survival probability P."""

    pattern: str
    p: float

    @classmethod
    def parse(cls, text: str) -> "Override":
        pattern, sep, value = text.rpartition("=")
        if not sep or not pattern:
            raise option_error("--set", f"{text!r}: expected PATTERN=P, e.g. 'layer3\\..*=0.8'")
        try:
            p = float(value)
        except ValueError:
            raise option_error("--set", f"{text!r}: {value!r} is not a number; P must be in (0, 1]") from None
        check_probability(p, f"{text!r}", option="--set")
        compile_pattern(pattern, "--set")
        return cls(pattern, p)


def check_probability(p: float, what: str, option: str | None = None) -> float:
    """``p`` if it is in (0, 1]; ``what`` names it (after ``option``, when the value came with one)."""
    if not (0.0 < p <= 1.0):
        problem = f"{what}: survival probability {p} is outside (0, 1]; 1 keeps a block always on"
        raise option_error(option, problem) if option else ConfigError(problem)
    return p


def compile_pattern(pattern: str, option: str) -> re.Pattern[str]:
    problem = regex_problem(pattern)
    if problem:
        raise option_error(option, problem)
    return re.compile(pattern)


def assign(
    site_ids: Sequence[str],
    p_L: float,
    *,
    rule: str = "linear",
    overrides: Sequence[Override] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> list[float | None]:
    """Survival probability per site, in the given (depth) order; None for a site left without a gate.

    Sites are selected by ``include`` (any match; all if empty) minus ``exclude``. The rule runs over
    the selected sites only (l counts selected sites in depth order); then overrides apply, last wins.
    """
    check_probability(p_L, "--pL")
    if rule not in RULES:
        raise ConfigError(f"unknown rule {rule!r}; use one of: {', '.join(RULES)}")
    inc = [compile_pattern(p, "--include") for p in include]
    exc = [compile_pattern(p, "--exclude") for p in exclude]
    selected = [
        (not inc or any(r.search(s) for r in inc)) and not any(r.search(s) for r in exc) for s in site_ids
    ]
    ps = iter(RULES[rule](sum(selected), p_L))
    result: list[float | None] = [next(ps) if keep else None for keep in selected]
    for o in overrides:
        r = compile_pattern(o.pattern, "--set")
        result = [o.p if keep and r.search(s) else p for s, p, keep in zip(site_ids, result, selected)]
    return result


def expected_depth(ps: Sequence[float | None]) -> float:
    """Expected number of active blocks, sum p_l (a block without a gate always counts 1)."""
    return sum(1.0 if p is None else p for p in ps)


def expected_flops_ratio(
    node_flops: dict[Hashable, int], branches: Sequence[tuple[Iterable[Hashable], float | None]], total: int
) -> float | None:
    """Expected training FLOPs with gates / without (a closed gate skips forward and backward).

    ``branches`` pairs each site's branch nodes with its p (None: no gate). A node runs with the
    product of the p of every gated branch containing it, so nested blocks are not counted twice.
    """
    if total <= 0:
        return None
    survival: dict[Hashable, float] = {}
    for nodes, p in branches:
        if p is not None:
            for n in nodes:
                survival[n] = survival.get(n, 1.0) * p
    saved = sum(node_flops.get(n, 0) * (1.0 - s) for n, s in survival.items())
    return (total - saved) / total


# --- over training steps: the depth rule's p_L as a function of the step -----------------------------------

KINDS = ("fixed", "warmup", "pld")


@dataclass(frozen=True)
class ScheduleSpec:
    """What a schedule does, as data (recorded in the recipe as a dict; unknown keys are refused).

    ``fixed``: the p_l inject chose, at every step (theta(t) = p_L; ``--set`` overrides kept). ``warmup``: no drops for ``warmup`` steps,
    then theta falls linearly to p_L over ``ramp`` steps. ``pld`` (Progressive Layer Dropping, Zhang &
    He 2020): theta(t) = (1 - theta_bar) e^(-gamma t) + theta_bar, with theta_bar = ``p_L``. Every
    kind applies theta(t) through the depth rule: p_l(t) = rule(L, theta(t)) over the model's gates.
    """

    kind: str = "fixed"
    p_L: float = 0.5
    rule: str = "linear"
    warmup: int = 0
    ramp: int = 0
    gamma: float = 0.001

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown schedule {self.kind!r}; use one of: {', '.join(KINDS)}")
        if self.rule not in RULES:
            raise ConfigError(f"unknown rule {self.rule!r}; use one of: {', '.join(RULES)}")
        if not (0.0 < self.p_L <= 1.0):
            raise ConfigError(f"schedule: theta / p_L {self.p_L} is outside (0, 1]")
        if self.warmup < 0 or self.ramp < 0:
            raise ConfigError(f"schedule: warm-up and ramp are step counts, got {self.warmup} and {self.ramp}")
        if not (self.gamma >= 0.0 and math.isfinite(self.gamma)):
            raise ConfigError(f"schedule: gamma {self.gamma} must be a finite number >= 0")

    def theta(self, step: int) -> float:
        """The depth rule's p_L at ``step`` (0 before the first ``Schedule.step()``)."""
        if self.kind == "fixed":
            return self.p_L
        if self.kind == "warmup":
            if step < self.warmup:
                return 1.0
            done = 1.0 if self.ramp == 0 else min(1.0, (step - self.warmup) / self.ramp)
            return 1.0 - done * (1.0 - self.p_L)
        return (1.0 - self.p_L) * math.exp(-self.gamma * step) + self.p_L

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ScheduleSpec:
        if not isinstance(d, dict):
            raise ConfigError(f"a schedule is a mapping, not {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise ConfigError(f"unknown schedule key {unknown[0]!r}; valid keys: {', '.join(known)}")
        return cls(**d)
