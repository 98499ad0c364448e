"""Survival-probability rules p_l, per-site overrides, expected depth and expected training cost."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Sequence

from ..errors import ConfigError, option_error


def linear_decay(L: int, p_L: float) -> list[float]:
    """The paper's rule: p_l = 1 - (l / L) * (1 - p_L) for l = 1..L."""
    return [1.0 - (l / L) * (1.0 - p_L) for l in range(1, L + 1)]


def uniform(L: int, p_L: float) -> list[float]:
    """Every block survives with the same probability p_L."""
    return [p_L] * L


RULES: dict[str, Callable[[int, float], list[float]]] = {"linear": linear_decay, "uniform": uniform}


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
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise option_error(option, f"{pattern!r} is not a valid regular expression: {exc}") from None


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
