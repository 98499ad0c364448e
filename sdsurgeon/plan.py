"""The surgery plan: sites found, their survival probabilities and what they cost, as one record."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .capture import Capture, bind_placeholders, normalize_inputs
from .inject import locate
from .schedule import Override, assign, expected_depth, expected_flops_ratio


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
) -> Plan:
    """Find the residual sites of ``model`` and schedule them; never modifies the model's weights.

    With ``example_inputs`` (a tensor, a tuple of args, a dict of kwargs, or ``(args, kwargs)``)
    each branch's FLOPs are counted and the expected training-FLOPs ratio is computed.
    """
    overrides = [o if isinstance(o, Override) else Override.parse(o) for o in overrides]
    cap, sites = locate(model, leaves)
    ps = assign([s.id for s in sites], p_L, rule=rule, overrides=overrides, include=include, exclude=exclude)
    inputs = normalize_inputs(example_inputs)
    node_flops, total = (None, None) if inputs is None else count_flops(model, cap, *inputs)
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
        untraced=[(u.path, u.reason) for u in cap.untraced],
    )


class _FlopsPerNode(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter
        self.flops: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        self.flops[n.name] = self.counter.get_total_flops() - before
        return result


def count_flops(model: nn.Module, cap: Capture, args: tuple, kwargs: dict) -> tuple[dict[tuple[str, str], int], int]:
    """Forward FLOPs per graph node, keyed (part path, node name), and of the whole model (eval mode)."""
    calls: dict[str, tuple[tuple, dict]] = {}

    def recorder(path: str):
        def hook(_module, a, kw):
            calls.setdefault(path, (a, kw))

        return hook

    modes = {m: m.training for m in model.modules()}
    handles = [
        (model.get_submodule(p.path) if p.path else model).register_forward_pre_hook(
            recorder(p.path), with_kwargs=True
        )
        for p in cap.parts
    ]
    try:
        model.eval()  # no batch-norm statistics updates, no dropout while counting
        with torch.no_grad():
            with FlopCounterMode(display=False) as whole:
                model(*args, **kwargs)
            per_node: dict[tuple[str, str], int] = {}
            for part in cap.parts:
                if part.path not in calls:
                    continue  # this part did not run on the example input
                with FlopCounterMode(display=False) as counter:
                    interp = _FlopsPerNode(part.gm, counter)
                    interp.run(*bind_placeholders(part.gm, *calls[part.path]))
                per_node.update({(part.path, k): v for k, v in interp.flops.items()})
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    return per_node, whole.get_total_flops()
