"""The surgery plan: sites found, their survival probabilities and what they cost, as one record."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from ..analysis.detect import RefusedAdd
from ..analysis.locate import locate
from ..analysis.owners import WHOLE, rewrites
from ..analysis.schedule import Override, assign, expected_depth, expected_flops_ratio
from ..capture.drop_path import ExistingDropPath, find_drop_paths, switched_off
from ..capture.fx import LEAF_REGISTRY, Capture, eval_trace_failure, export_failure_of
from ..capture.inputs import normalize_inputs, sequence_inputs
from ..gate import StochasticDepth, gates
from ..io.hf import is_hf
from ..io.source import SOURCE_ATTR
from ..options import SurgeryOptions
from ..progress import SILENT, Progress


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


@dataclass(frozen=True)
class Reach:
    """Whether ``export --format`` can write one output of the model, and why (not), as plan can tell cheaply."""

    format: str  # "onnx" | "safetensors" | "hf" (choices.FORMATS)
    ok: bool | None  # None: not checked (plan lacked what the check needs, e.g. example inputs)
    why: str
    dynamic: list[str] | None = None  # ONNX: the axes export will make dynamic (batch, sequence, ...)

    def to_dict(self) -> dict:
        return {"format": self.format, "reachable": self.ok, "why": self.why,
                **({} if self.dynamic is None else {"dynamic": self.dynamic})}


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
    outputs: list[Reach] = field(default_factory=list)  # what export can write of the model (see reachable_outputs)

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
            "outputs": [r.to_dict() for r in self.outputs],
        }


def plan(
    model: nn.Module,
    p_L: float | SurgeryOptions = 0.5,
    *,
    rule: str = "linear",
    overrides: Sequence[Override | str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    leaves: Sequence[str] = (),
    example_inputs=None,
    capture: str = "auto",
    keep_existing: bool = False,
    progress: Progress = SILENT,
) -> Plan:
    """Find the residual sites of ``model`` and schedule them; never modifies the model's weights.

    With ``example_inputs`` (a tensor, a tuple of args, a dict of kwargs, or ``(args, kwargs)``)
    each branch's FLOPs are counted and the expected training-FLOPs ratio is computed. ``capture``
    and ``keep_existing`` are inject's: the plan shows what inject with the same options would do.
    ``progress`` hears of each stage (capture, FLOPs count, detection, placing the gates). ``p_L`` may be the
    whole SurgeryOptions instead (what the pipeline passes); the keywords are then unused.
    """
    o = p_L if isinstance(p_L, SurgeryOptions) else SurgeryOptions(
        pL=p_L, rule=rule, overrides=overrides, include=include, exclude=exclude, leaves=leaves, capture=capture,
        keep_existing=keep_existing)  # checked there, once
    overrides = [x if isinstance(x, Override) else Override.parse(x) for x in o.overrides]
    leaves, keep_existing = o.leaves, o.keep_existing
    drop_paths = find_drop_paths(model)
    with contextlib.nullcontext() if keep_existing else switched_off(model):
        refused: list[RefusedAdd] = []
        cap, sites = locate(model, leaves, example_inputs, method=o.capture, refused=refused, progress=progress)
        ps = assign([s.id for s in sites], o.pL, rule=o.rule, overrides=overrides, include=o.include,
                    exclude=o.exclude)
        with progress.stage("place the gates"):
            planned_rewrites = [
                PlannedRewrite(r.path, r.how, type(model.get_submodule(r.path)).__name__, len(r.sites))
                for r in rewrites(model, cap, [s for s, p in zip(sites, ps) if p is not None], leaves, example_inputs)
            ]
        with progress.stage("check which outputs it can reach"):
            outputs = reachable_outputs(model, cap, planned_rewrites, leaves, example_inputs)
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
        sites=planned, rule=o.rule, p_L=o.pL, expected_depth=expected_depth(ps),
        expected_train_flops_ratio=ratio, total_flops=total, capture=cap.method,
        untraced=[(u.path, u.reason) for u in cap.untraced], drop_paths=drop_paths, keep_existing=keep_existing,
        refused=refused, rewrites=planned_rewrites, outputs=outputs,
    )


def reachable_outputs(model: nn.Module, cap: Capture, planned: Sequence[PlannedRewrite], leaves: Sequence[str] = (),
                      example_inputs=None) -> list[Reach]:
    """What ``export`` can write of ``model`` gated as planned: ONNX, safetensors, a transformers folder.

    Told at plan time, so that a model that cannot reach ONNX is told before its training, not after it. ONNX
    export captures the folded model with torch.export in eval mode. The capture already answers for most models:
    a whole-model torch.export capture, or a torch.fx trace of the whole model with no module the user kept opaque
    (fx fails on any Python control flow on tensors, which is what stops torch.export). Only where neither did
    does one eval-mode torch.export run on the example inputs (the capture's own failed attempt ran in training
    mode, where training-only code such as LayerDrop's draw may be what stopped it); it names the line that stops
    it. A gated model (a .sd.pt) is first traced in eval mode with its gates opaque, since folding removes them.
    """
    onnx = _onnx(model, cap, leaves, example_inputs)
    if onnx.ok and (inputs := normalize_inputs(example_inputs)) is not None:
        # what export will try to make dynamic (it falls back to the batch alone where the model fixes a length)
        tokens = sorted(set(sequence_inputs({f"{i}": t for i, t in enumerate(inputs[0]) if isinstance(t, torch.Tensor)}
                                            | {k: t for k, t in inputs[1].items() if isinstance(t, torch.Tensor)}).values()))
        onnx = Reach("onnx", True, onnx.why, ["batch", *tokens])
    return [onnx, _safetensors(model, planned), _hf(model)]


def _onnx(model: nn.Module, cap: Capture, leaves: Sequence[str], example_inputs) -> Reach:
    def exported(what: str) -> Reach:
        if normalize_inputs(example_inputs) is None:
            return Reach("onnx", None, f"give --input-shape to check it with torch.export; {what}")
        failure = export_failure_of(model, example_inputs, training=False)
        if failure is None:
            return Reach("onnx", True, "torch.export captures the model in eval mode")
        return Reach("onnx", False, failure.reason)

    if gates(model):  # its draws stop every training-mode capture; in eval a gate is x + p * f(x)
        gate = f"{StochasticDepth.__module__}.{StochasticDepth.__qualname__}"
        failure = eval_trace_failure(model, (*leaves, gate))
        if failure is None:
            return Reach("onnx", True, "torch.fx traces the gated model whole in eval mode, where folding leaves it")
        return exported(f"torch.fx cannot trace the gated model in eval mode: {failure.reason}")
    if cap.method == "export":
        return Reach("onnx", True, "torch.export captured the whole model")
    whole = next((p.gm for p in cap.parts if p.path == ""), None)
    if whole is not None:
        opaque = sorted({type(whole.get_submodule(n.target)).__name__ for n in whole.graph.nodes
                         if n.op == "call_module" and _users_leaf(whole.get_submodule(n.target), leaves)})
        if not opaque:
            return Reach("onnx", True, "torch.fx traced the whole model: no data-dependent control flow")
        return exported(f"torch.fx kept {', '.join(opaque)} opaque (--leaf)")
    root = next((u.reason for u in cap.untraced if u.path == ""), "its forward does not trace")
    return exported(f"torch.fx cannot trace the whole model: {root}")


def _users_leaf(module: nn.Module, leaves: Sequence[str]) -> bool:
    """A module the user made opaque (--leaf, register_leaf): its code was never traced."""
    cls = type(module)
    return cls in LEAF_REGISTRY or cls.__name__ in leaves or f"{cls.__module__}.{cls.__qualname__}" in leaves


def _safetensors(model: nn.Module, planned: Sequence[PlannedRewrite]) -> Reach:
    odd = next(((k, v) for k, v in model.state_dict().items()
                if not isinstance(v, torch.Tensor) or type(v) not in (torch.Tensor, nn.Parameter)
                or v.layout is not torch.strided or v.is_quantized), None)
    if odd is not None:
        return Reach("safetensors", False, f"its state_dict holds {odd[0]} as {type(odd[1]).__name__}, not a plain tensor")
    source = getattr(model, SOURCE_ATTR, None)
    if any(r.how == WHOLE for r in planned) and (source is None or source.kind not in ("arch", "hf")):
        return Reach("safetensors", False, "the model is captured whole (torch.export) and nothing records its "
                     "architecture to hold the weights: give its state_dict with --arch package.module:factory")
    return Reach("safetensors", True, "its state_dict is plain tensors (export says if a gate keeps a multiply "
                 "that the architecture does not compute)")


def _hf(model: nn.Module) -> Reach:
    if not is_hf(model):
        return Reach("hf", False, "not a transformers model")
    source = getattr(model, SOURCE_ATTR, None)
    if source is None or source.kind != "hf":
        return Reach("hf", False, "not loaded from a save_pretrained folder, so sdsurgeon has no config to write")
    return Reach("hf", True, "a transformers model loaded from its save_pretrained folder")


def node_flops_of(cap: Capture) -> dict[tuple[str, str], int]:
    """FLOPs per node recorded by capture.annotate, keyed (part path, node name)."""
    return {(p.path, n.name): n.meta.get("sd_flops", 0) for p in cap.parts for n in p.gm.graph.nodes}
