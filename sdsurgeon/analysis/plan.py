"""The surgery plan: sites found, their survival probabilities and what they cost, as one record."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

from torch import nn

from ..analysis.detect import RefusedAdd
from ..analysis.locate import locate
from ..analysis.owners import rewrites
from ..analysis.schedule import Override, assign, expected_depth, expected_flops_ratio
from ..capture.drop_path import ExistingDropPath, find_drop_paths, switched_off
from ..capture.fx import Capture


@dataclass(frozen=True)
class PlannedSite:
    index: int
    id: str
    p: float  # survival probability (1.0 for a site left without a gate)
    gated: bool
    params: int
    shortcut: str
    flops: int | None = None  # forward FLOPs of the branch on the example input
    flops_share: float | None = None  # of the whole model's forward FLOPs


@dataclass(frozen=True)
class PlannedRewrite:
    """One module inject rewrites (see analysis.owners): where, how, its class and how many gates it gets."""

    path: str
    how: str  # owners.BLOCK | owners.PART | owners.WHOLE
    cls: str
    gates: int

    def to_dict(self) -> dict:
        return {"module": self.path or "(root)", "how": self.how, "class": self.cls, "gates": self.gates}


@dataclass
class Plan:
    sites: list[PlannedSite]
    rule: str
    p_L: float
    expected_depth: float
    expected_train_flops_ratio: float | None
    total_flops: int | None
    capture: str
    untraced: list[tuple[str, str]] = field(default_factory=list)  # (module path, reason)
    drop_paths: list[ExistingDropPath] = field(default_factory=list)  # drop-path modules the model has
    keep_existing: bool = False  # they keep their rates (else the gates replace them)
    refused: list[RefusedAdd] = field(default_factory=list)  # x + f(x) blocks that cannot be gated, and why
    rewrites: list[PlannedRewrite] = field(default_factory=list)  # the modules inject would rewrite, and how

    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def num_gated(self) -> int:
        return sum(s.gated for s in self.sites)

    def to_dict(self) -> dict:
        return {
            "num_sites": self.num_sites,
            "num_gated": self.num_gated,
            "expected_depth": round(self.expected_depth, 4),
            "rule": self.rule,
            "p_L": self.p_L,
            "sites": [
                {
                    "index": s.index, "id": s.id, "p": round(s.p, 4), "gated": s.gated, "params": s.params,
                    "shortcut": s.shortcut, "flops": s.flops,
                    "flops_share": None if s.flops_share is None else round(s.flops_share, 4),
                }
                for s in self.sites
            ],
            "expected_train_flops_ratio": (
                None if self.expected_train_flops_ratio is None else round(self.expected_train_flops_ratio, 4)
            ),
            "total_flops": self.total_flops,
            "capture": self.capture,
            "untraced": [{"module": m or "(root)", "reason": r} for m, r in self.untraced],
            "existing_drop_paths": [d.to_dict() for d in self.drop_paths],
            "existing_drop_paths_kept": self.keep_existing,
            "refused": [{"id": r.id, "reason": r.reason} for r in self.refused],
            "rewrites": [r.to_dict() for r in self.rewrites],
        }


def plan(
    model: nn.Module,
    p_L: float = 0.5,
    *,
    rule: str = "linear",
    overrides: Sequence[Override | str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    leaves: Sequence[str] = (),
    example_inputs=None,
    capture: str = "auto",
    keep_existing: bool = False,
) -> Plan:
    """Find the residual sites of ``model`` and schedule them; never modifies the model's weights.

    With ``example_inputs`` (a tensor, a tuple of args, a dict of kwargs, or ``(args, kwargs)``)
    each branch's FLOPs are counted and the expected training-FLOPs ratio is computed. ``capture``
    and ``keep_existing`` are inject's: the plan shows what inject with the same options would do.
    """
    overrides = [o if isinstance(o, Override) else Override.parse(o) for o in overrides]
    drop_paths = find_drop_paths(model)
    with contextlib.nullcontext() if keep_existing else switched_off(model):
        refused: list[RefusedAdd] = []
        cap, sites = locate(model, leaves, example_inputs, method=capture, refused=refused)
        ps = assign([s.id for s in sites], p_L, rule=rule, overrides=overrides, include=include, exclude=exclude)
        planned_rewrites = [
            PlannedRewrite(r.path, r.how, type(model.get_submodule(r.path)).__name__, len(r.sites))
            for r in rewrites(model, cap, [s for s, p in zip(sites, ps) if p is not None], leaves, example_inputs)
        ]
    total = cap.total_flops
    node_flops = None if total is None else node_flops_of(cap)
    flops = None if node_flops is None else [sum(node_flops.get((s.part, n), 0) for n in s.branch_nodes) for s in sites]
    planned = [
        PlannedSite(
            index=s.index, id=s.id, p=1.0 if p is None else p, gated=p is not None, params=s.params,
            shortcut=s.shortcut, flops=None if flops is None else flops[i],
            flops_share=None if flops is None or not total else flops[i] / total,
        )
        for i, (s, p) in enumerate(zip(sites, ps))
    ]
    ratio = None if node_flops is None else expected_flops_ratio(
        node_flops, [([(s.part, n) for n in s.branch_nodes], p) for s, p in zip(sites, ps)], total
    )
    return Plan(
        sites=planned, rule=rule, p_L=p_L, expected_depth=expected_depth(ps),
        expected_train_flops_ratio=ratio, total_flops=total, capture=cap.method,
        untraced=[(u.path, u.reason) for u in cap.untraced], drop_paths=drop_paths, keep_existing=keep_existing,
        refused=refused, rewrites=planned_rewrites,
    )


def node_flops_of(cap: Capture) -> dict[tuple[str, str], int]:
    """FLOPs per node recorded by capture.annotate, keyed (part path, node name)."""
    return {(p.path, n.name): n.meta.get("sd_flops", 0) for p in cap.parts for n in p.gm.graph.nodes}
