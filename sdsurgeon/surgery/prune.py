"""Prune: remove whole gated blocks (fold with p = 0), fold the rest, and say how faithful the result stays."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from torch import nn

from ..analysis.fidelity import Fidelity, compare, outputs_and_parameters
from ..analysis.influence import INFLUENCE_MEASURE, block_influence
from ..analysis.layers import ANGULAR_MEASURE, LayerList, find_layers, layer_angular_distance
from ..capture.inputs import InputSpec, make_example_inputs, normalize_inputs
from ..choices import DROP_RULES  # named there, for options.py and --help
from ..errors import NoResidualSitesError, SurgeonError, first_line, option_error
from ..gate import StochasticDepth, gates
from ..options import ConvertOptions, field_error, pruning_conflict, read_count, regex_problem
from ..progress import SILENT, Progress
from .fold import FoldReport, fold_with_report
from .recipe import RECIPE_ATTR

LAYER_RULES = {"schedule": "the lowest mean p_l of its blocks", "influence": "the lowest summed block influence",
               "angular": "the lowest angular distance between its input and output"}  # each first, deepest first among equals
CALIBRATION_BATCH = 16  # random calibration inputs: samples per input, so the fidelity figures average something


@dataclass
class LayerRemoval:
    """Whole layers removed: which of the list at ``path``, and the figure each layer was ranked by."""

    path: str  # the layer list's module path
    total: int  # layers in the list
    removed: list[int]  # indices into the list, ascending
    by: str  # a LAYER_RULES key, or "sites" when the dropped sites happened to make up whole layers
    scores: list[float] | None = None  # per layer, what ``by`` ranked (None for "sites")

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"list": self.path, "total": self.total, "removed": self.removed,
                             "kept": self.total - len(self.removed), "by": self.by}
        if self.scores is not None:
            d["scores"] = [round(v, 6) for v in self.scores]
            d["measure"] = {"schedule": "mean p_l of the layer's blocks", "influence": INFLUENCE_MEASURE + ", summed "
                            "over the layer's blocks", "angular": ANGULAR_MEASURE}[self.by]
        return d


@dataclass
class PruneReport:
    """What prune removed and what it cost, against the unpruned model (all blocks, each scaled by its p_l)."""

    by: str  # "schedule" | "influence" | "sites"
    dropped: list[str]  # site ids, in depth order (blocks nested in a dropped one included)
    kept: list[str]
    fold: FoldReport
    calibration: str  # where the inputs the figures were measured on came from
    influence: dict[str, float] | None = None  # per site, when ``by`` is influence
    params_before: int | None = None  # parameter elements the forward uses
    params_after: int | None = None
    fidelity: Fidelity | None = None
    layers: LayerRemoval | None = None  # with --drop-layers, or whole layers deleted for --format hf

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"dropped": self.dropped, "kept": self.kept, "drop_by": self.by,
                             "calibration": self.calibration, "params_before": self.params_before,
                             "params_after": self.params_after,
                             "fidelity": None if self.fidelity is None else self.fidelity.to_dict(),
                             "layers": None if self.layers is None else self.layers.to_dict()}
        if self.influence is not None:
            d["influence"] = {"measure": INFLUENCE_MEASURE, "sites": {k: round(v, 6) for k, v in self.influence.items()}}
        return d


# --- how many, which ----------------------------------------------------------------------------------------


def parse_drop(drop: int | str, total: int | None = None, option: str = "--drop") -> tuple[str, float]:
    """``("count", n)`` or ``("share", percent)``; raises unless it is a whole count >= 0 (at most ``total``,
    when known) or a share from 0% to 100%. ``option`` names what is counted: --drop blocks, --drop-layers layers."""
    try:
        return read_count(drop, total, "layers" if option == "--drop-layers" else "gated blocks")
    except ValueError as exc:
        raise option_error(option, str(exc)) from None


def drop_count(drop: int | str, total: int, option: str = "--drop") -> int:
    """``drop`` as a number of blocks (or layers) out of ``total``: a count (``3``) or a share (``25%``, rounded
    half up)."""
    kind, value = parse_drop(drop, total, option)
    return int(value) if kind == "count" else math.floor(total * value / 100 + 0.5)


def order(model: nn.Module, by: str, influence: dict[str, float] | None = None) -> list[str]:
    """Site ids in the order ``by`` removes them: ``schedule``, lowest p_l first (deepest first among equals);
    ``influence``, lowest block influence first (deepest first among equals)."""
    found = gates(model)
    if by == "schedule":
        return [g.site_id for g in sorted(found, key=lambda g: (g.p, -g.index))]
    if by == "influence":
        if influence is None:
            raise ValueError("order by influence needs the influence figures")
        return [g.site_id for g in sorted(found, key=lambda g: (influence[g.site_id], -g.index))]
    if by == "angular":
        raise option_error("--drop-by", "angular ranks whole layers (the distance between a layer's input and "
                           "output): give --drop-layers N instead of --drop")
    raise option_error("--drop-by", f"{by!r}: use one of: {', '.join(DROP_RULES)}")


def layer_scores(model: nn.Module, layers: LayerList, by: str, inputs=None,
                 influence: dict[str, float] | None = None) -> list[float]:
    """Per layer, the figure ``by`` ranks it by (lowest removed first): see LAYER_RULES."""
    if by == "schedule":
        p = {g.site_id: g.p for g in gates(model)}
        return [sum(p[s] for s in held) / len(held) for held in layers.sites]
    if by == "influence":
        if influence is None:
            raise ValueError("layers by influence need the influence figures")
        return [sum(influence[s] for s in held) for held in layers.sites]
    return layer_angular_distance(model, layers, inputs)


def layer_order(scores: Sequence[float]) -> list[int]:
    """Layer indices, lowest score first, deepest first among equals."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], -i))


def matching(model: nn.Module, pattern: str) -> list[str]:
    """Site ids that ``pattern`` finds (re.search), in depth order; an error names some ids when none does."""
    problem = regex_problem(pattern)
    if problem:
        raise field_error(ConvertOptions, "drop_sites", problem)
    regex = re.compile(pattern)
    ids = [g.site_id for g in gates(model)]
    found = [i for i in ids if regex.search(i)]
    if not found:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise option_error("--drop-sites", f"{pattern!r} matches none of the {len(ids)} gated sites ({shown})",
                           hint="`sdsurgeon plan MODEL` lists the site ids")
    return found


# --- inputs -------------------------------------------------------------------------------------------------


def calibration_inputs(model: nn.Module, calibration=None, specs: Sequence[InputSpec] | None = None) -> tuple[Any, str]:
    """The inputs to measure on and where they came from: ``calibration`` as given, else random inputs
    made from ``specs`` or those the model's recipe remembers (CALIBRATION_BATCH samples), else none."""
    if calibration is not None:
        return normalize_inputs(calibration), "the given inputs"
    recipe = getattr(model, RECIPE_ATTR, None)
    specs = specs or (recipe.inputs if recipe is not None and recipe.inputs else None)
    if not specs:
        return None, "none"
    batched = [replace(s, shape=(CALIBRATION_BATCH, *s.shape[1:])) if s.shape else s for s in specs]
    return make_example_inputs(batched, seed=1), f"{CALIBRATION_BATCH} random samples (no calibration given)"


def _start(model: nn.Module, by: str, calibration, specs) -> tuple[list[StochasticDepth], Any, str]:
    """The gates, the inputs to measure on and where they came from, once the model and the rule are checked."""
    found = gates(model)
    if not found:
        raise NoResidualSitesError(f"{type(model).__name__} has no stochastic-depth gates to prune: inject it first")
    if by not in DROP_RULES:
        raise option_error("--drop-by", f"{by!r}: use one of: {', '.join(DROP_RULES)}")
    return (found, *calibration_inputs(model, calibration, specs))


def _checked_outputs(model: nn.Module, inputs) -> tuple[Any, int]:
    """The model's eval outputs and the parameters it uses (one forward), or the inputs' misfit in one line."""
    try:
        return outputs_and_parameters(model, inputs)
    except SurgeonError:
        raise
    except Exception as exc:  # the model's own error: the inputs do not fit it
        raise option_error("--calibration", f"inputs do not fit the model ({first_line(exc)})",
                           hint="save a tensor, or a dict of tensors named as the forward's arguments") from None


# --- prune ------------------------------------------------------------------------------------------------


def prune(model: nn.Module, drop: int | str = 0, *, by: str = "schedule", sites: str | None = None,
          layers: int | str | None = None, calibration=None, into_weights: bool = True,
          input_specs: Sequence[InputSpec] | None = None) -> tuple[nn.Module, PruneReport]:
    """A deterministic copy of an injected model with ``drop`` gated blocks removed and the rest folded.

    A removed block loses its branch and its gate; its skip stays (a projection shortcut keeps its
    projection). Which blocks: ``by="schedule"`` (lowest p_l first, deepest first among equals),
    ``by="influence"`` (lowest block influence on the calibration inputs first, see block_influence), or
    ``sites`` (a regular expression over site ids, instead of ``drop``). ``drop``: a count or a share
    (``"25%"``). ``layers`` (a count or a share, instead of ``drop``): remove that many whole layers of the model's
    layer list (analysis.layers.find_layers), every block of each, ranked by ``by`` per layer (LAYER_RULES; also
    ``"angular"``, Gromov et al.'s distance between a layer's input and output). ``calibration``: the inputs the report's figures are measured on (a tensor, dict, tuple
    or ``(args, kwargs)``); without it, random inputs from ``input_specs`` or the recipe's. ``model`` is unchanged.
    """
    conflict = pruning_conflict(drop, sites, layers)
    if conflict:
        raise field_error(ConvertOptions, *conflict)
    found, inputs, source = _start(model, by, calibration, input_specs)
    reference, params_before = (None, None) if inputs is None else _checked_outputs(model, inputs)
    influence = removal = None
    if layers is not None:
        listed = find_layers(model)
        count = drop_count(layers, listed.count, "--drop-layers")
        if by in ("influence", "angular") and inputs is None:
            raise option_error("--drop-by", f"{by} measures the layers on inputs: give --calibration FILE or the "
                               "model's input shape")
        if by == "influence":
            influence = block_influence(model, inputs)
        scores = layer_scores(model, listed, by, inputs, influence)
        removed = sorted(layer_order(scores)[:count])
        removal = LayerRemoval(listed.path, listed.count, removed, by, scores)
        chosen = {s for i in removed for s in listed.sites[i]}
    elif sites is not None:
        chosen, by = set(matching(model, sites)), "sites"
    else:
        count = drop_count(drop, len(found))
        if by == "influence":
            if inputs is None:
                raise option_error("--drop-by", "influence measures the blocks on inputs: give --calibration FILE "
                                   "or the model's input shape")
            influence = block_influence(model, inputs)
        chosen = set(order(model, by, influence)[:count])
    pruned, folded = fold_with_report(model, into_weights=into_weights, drop=chosen)
    dropped = [s.id for s in folded.dropped]
    report = PruneReport(by, dropped, [g.site_id for g in found if g.site_id not in set(dropped)], folded, source,
                         influence, layers=removal)
    if inputs is not None:
        report.params_before = params_before
        out, report.params_after = outputs_and_parameters(pruned, inputs)
        report.fidelity = compare(out, reference)
    return pruned, report


# --- the curve: fidelity against blocks removed --------------------------------------------------------------


@dataclass
class CurvePoint:
    """The model with the first ``removed`` blocks of the order gone; ``site`` is the one this step removed."""

    removed: int
    site: str | None
    params: int
    fidelity: Fidelity

    def to_dict(self) -> dict:
        return {"removed": self.removed, "site": self.site, "params": self.params, "fidelity": self.fidelity.to_dict()}


@dataclass
class PruneCurve:
    by: str
    calibration: str
    points: list[CurvePoint] = field(default_factory=list)
    influence: dict[str, float] | None = None

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"drop_by": self.by, "calibration": self.calibration,
                             "points": [p.to_dict() for p in self.points]}
        if self.influence is not None:
            d["influence"] = {"measure": INFLUENCE_MEASURE, "sites": {k: round(v, 6) for k, v in self.influence.items()}}
        return d


def prune_curve(model: nn.Module, *, by: str = "schedule", calibration=None,
                input_specs: Sequence[InputSpec] | None = None, progress: Progress = SILENT) -> PruneCurve:
    """Fidelity and parameters for k = 0..L blocks removed in ``by``'s order, on the calibration inputs.

    Each point is the model with the first k blocks of the order removed: their gates give back the skip
    alone (what ``prune`` leaves), the others add their branch scaled by p_l; the injected model itself
    is not changed. Cheaper than L + 1 prunes: one forward (and one backward, for the parameter count)
    per point, on the model as it is. ``progress`` hears of the stage "prune curve", advanced once per point.
    """
    found, inputs, source = _start(model, by, calibration, input_specs)
    if inputs is None:
        raise option_error("--prune-curve", "measures the model on inputs: give --calibration FILE or the model's "
                           "input shape (--input-shape)")
    with progress.stage("prune curve", total=len(found) + 1) as advance:  # order() has one id per gate
        reference = _checked_outputs(model, inputs)[0]
        influence = None
        if by == "influence":
            with progress.stage("measure block influence"):
                influence = block_influence(model, inputs)
        ids = order(model, by, influence)
        curve = PruneCurve(by, source, influence=influence)
        for k in range(len(ids) + 1):
            removed = set(ids[:k])
            with _skipping([g for g in found if g.site_id in removed]):
                out, used = outputs_and_parameters(model, inputs)
            curve.points.append(CurvePoint(k, ids[k - 1] if k else None, used, compare(out, reference)))
            advance()
    return curve


class _skipping:
    """Gates that return their skip alone while inside (forward hooks that replace the output)."""

    def __init__(self, chosen: Sequence[StochasticDepth]) -> None:
        self.chosen = chosen
        self.handles: list = []

    def __enter__(self):
        self.handles = [g.register_forward_hook(lambda gate, args, out: args[0].clone()) for g in self.chosen]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

