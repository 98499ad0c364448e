"""Rewrite residual sites with stochastic-depth gates: detected sites + probabilities -> trainable model."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch.fx as fx
from torch import nn

from ..analysis.detect import ResidualSite
from ..analysis.locate import locate
from ..analysis.owners import WHOLE, rewrites, written_in_place
from ..analysis.schedule import Override, ScheduleSpec, assign
from ..capture.drop_path import find_drop_paths, switch_off
from ..distributed import watch_units
from . import early_exit as early_exit_mod
from . import install as in_place
from ..capture.fx import Capture
from ..capture.hf_inputs import complete_specs
from ..capture.inputs import InputSpec, make_example_inputs, normalize_inputs, specs_of
from ..capture.torch_nn import call_children_always
from ..choices import SCALING_CHOICES
from ..errors import NoResidualSitesError, RecipeMismatchError, UnscaledSaveWarning, option_error
from ..gate import GateSpec, StochasticDepth, draw, gates  # noqa: F401  (gates: re-exported)
from ..io.hf import carry_recipe
from ..io.source import tag
from ..options import SurgeryOptions
from ..progress import SILENT, Progress
from .fold import FoldReport, SiteRecord, copied, fold_parts
from .recipe import RECIPE_ATTR, Recipe


def inject(
    model: nn.Module,
    p_L: float | SurgeryOptions = 0.5,
    *,
    rule: str = "linear",
    mode: str = "batch",
    scaling: str = "auto",
    seed: int | None = None,
    overrides: Sequence[Override | str] = (),
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    leaves: Sequence[str] = (),
    example_inputs=None,
    inputs: Sequence[InputSpec] | None = None,
    sync_ranks: bool = True,
    capture: str = "auto",
    keep_existing: bool = False,
    schedule: ScheduleSpec | dict | None = None,
    early_exit: bool = False,
    exit_layers: Sequence[int] = (),
    exit_scale: float = 1.0,
    exit_scale_type: str = "sum_l",
    exit_curriculum: str = "none",
    exit_rotation: int = 2,
    exit_ramp: int = 0,
    progress: Progress = SILENT,
    in_place: bool = False,
) -> nn.Module:
    """A copy of ``model`` whose residual blocks are gated by stochastic depth. ``model`` is unchanged.

    The copy is of ``model``'s own class: only the modules owning a gated add run a gated graph as
    their forward, keeping their class (see analysis.owners and surgery.install); an ATen-level
    torch.export capture is the exception, returned as a GraphModule. The result has exactly the
    state_dict keys and tensors of ``model``; it carries its recipe as
    ``result.sdsurgeon_recipe`` so it can be saved weights-only and rebuilt. ``example_inputs`` (a
    tensor, tuple, dict or ``(args, kwargs)``) lets detection check shapes; the input specs (given
    as ``inputs`` or read off ``example_inputs``) are remembered in the recipe for later export.
    Under torch.distributed the gates draw alike on every rank unless ``sync_ranks=False``.
    ``capture`` picks the front-end (``auto``, ``fx``, ``export``: see capture.capture; export needs
    example inputs). Drop-path modules the model
    already has are switched off (the gates replace them) unless ``keep_existing``. ``schedule``
    (``ScheduleSpec`` or its dict) is recorded in the recipe for ``sdsurgeon.schedules.schedule(model)``,
    which steps p_l over training; the gates get the rule's p_l at ``p_L`` until then.
    ``early_exit`` (a causal LM): LayerSkip's early-exit loss is added in training (surgery.early_exit; the
    ``exit_*`` keywords are SurgeryOptions' fields of those names), and recorded in the recipe; the final norm is
    found on one forward of the example inputs (drawn from ``inputs`` if not given).
    ``progress`` hears of each stage (capture, FLOPs count, detection, rewriting the blocks).
    ``scaling`` ``auto`` is ``inverted`` for a model with its own save path, else ``paper`` (resolve_scaling).
    ``in_place=True`` rewrites ``model`` itself instead of a copy (for a caller that owns it, as the CLI owns
    the model it loaded: no second copy of the weights); ``model`` is then the result, unless an ATen capture
    replaced its root, and is left partly rewritten if this raises.
    ``p_L`` may be the whole SurgeryOptions instead (what the pipeline passes); the keywords are then unused.
    Raises NoResidualSitesError if nothing is gated.
    """
    o = p_L if isinstance(p_L, SurgeryOptions) else SurgeryOptions(
        pL=p_L, rule=rule, mode=mode, scaling=scaling, seed=seed, overrides=overrides, include=include,
        exclude=exclude, leaves=leaves, sync_ranks=sync_ranks, capture=capture, keep_existing=keep_existing,
        schedule=schedule.to_dict() if isinstance(schedule, ScheduleSpec) else schedule, early_exit=early_exit,
        exit_layers=exit_layers, exit_scale=exit_scale, exit_scale_type=exit_scale_type,
        exit_curriculum=exit_curriculum, exit_rotation=exit_rotation, exit_ramp=exit_ramp)  # checked there, once
    scaling = resolve_scaling(o.scaling, model)
    _check_gate_options(o.mode, scaling)
    schedule = None if o.schedule is None else ScheduleSpec.from_dict(o.schedule)
    overrides = [x if isinstance(x, Override) else Override.parse(x) for x in o.overrides]
    work = model if in_place else copy.deepcopy(model)
    if example_inputs is None and inputs is not None:
        example_inputs = make_example_inputs(inputs)
    replaced = [] if o.keep_existing else switch_off(work)
    cap, sites = locate(work, o.leaves, example_inputs, method=o.capture, progress=progress)
    if inputs is None and example_inputs is not None:
        inputs = complete_specs(model, specs_of(normalize_inputs(example_inputs)))
    ps = assign([s.id for s in sites], o.pL, rule=o.rule, overrides=overrides, include=o.include, exclude=o.exclude)
    chosen = [(s, p) for s, p in zip(sites, ps) if p is not None]
    if not chosen:
        what = "no residual block" if not sites else f"none of its {len(sites)} residual sites selected"
        # where parts could not be captured, the reason is what the user needs, not the empty result
        why = f" in what could be captured ({'; '.join(_failures(cap))})" if cap.untraced and not sites else ""
        if why and any(not d.is_module and d.rate for d in find_drop_paths(work)):
            why += "; its own LayerDrop draws in Python, which no capture can follow: leave out --keep-existing"
        raise NoResidualSitesError(
            f"{type(model).__name__} has {what}{why}: nothing to inject (run `sdsurgeon plan` to see what was found)"
        )
    recipe = Recipe(
        sites=[(s.id, p) for s, p in chosen], mode=o.mode, scaling=scaling, seed=o.seed, p_L=o.pL, rule=o.rule,
        leaves=list(o.leaves), inputs=None if inputs is None else list(inputs), sync_ranks=o.sync_ranks,
        capture=cap.method, keep_existing=o.keep_existing, replaced=[[d.path, d.rate] for d in replaced if d.rate],
        schedule=None if schedule is None else schedule.to_dict(),
    )
    with progress.stage("rewrite the blocks"):  # on the capture's inputs: one draw per job
        result = _apply(work, cap, chosen, recipe, example_inputs)
    if o.early_exit:
        settings = dict(layers=list(o.exit_layers), scale=o.exit_scale, scale_type=o.exit_scale_type,
                        curriculum=o.exit_curriculum, rotation=o.exit_rotation, ramp=o.exit_ramp)
        examples = example_inputs if example_inputs is not None else _examples_for(recipe, None, always=True)
        recipe.early_exit = early_exit_mod.resolve(result, settings, examples)
        early_exit_mod.install(result, recipe.early_exit)
        carry_recipe(result, recipe.to_dict())
    return result


def _failures(cap: Capture, most: int = 2) -> list[str]:
    return [f"{u.path or 'the model'}: {u.reason}" for u in cap.untraced[:most]]


def apply_recipe(model: nn.Module, recipe: Recipe, *, in_place: bool = False, examples=None) -> nn.Module:
    """Redo a recorded surgery on ``model`` (a fresh instance of the same architecture); copies it, unless
    ``in_place`` (a model the caller owns, as a loader owns what it built). ``examples``: the job's example
    inputs for the recipe's specs (drawn here where the capture needs them and none are given)."""
    work = model if in_place else copy.deepcopy(model)
    examples = _examples_for(recipe, examples)
    cap, chosen = _located(work, recipe, examples)
    return _apply(work, cap, chosen, recipe, examples)


def fold_recipe(model: nn.Module, recipe: Recipe, *, examples=None, into_weights: bool = True, scale: bool = True,
                reference: bool = False) -> tuple[nn.Module, FoldReport, nn.Module | None]:
    """``fold_with_report(apply_recipe(model, recipe))`` without a gate: what ``export --fold`` of a recorded
    surgery runs. Changes ``model`` (the caller's: a fresh instance of the architecture holding the trained
    weights, as a loader builds it) and returns it folded, with the fold's report.

    The recipe's sites are found again and each owner traced as inject did (``record_recipe``); each site becomes
    a record of its branch and p in the owner's graph (``gate_sites(records=True)``) and ``surgery.fold`` folds
    the records by the very rules it folds gates by. An owner whose sites all went into its own weights runs its
    own code, with scaled weights: no graph is installed on it at any point.

    ``reference``: also a copy of the model, weights as they were, that computes the recipe in eval,
    ``x + p f(x)``, with one explicit multiply per site and no weight scaled (what the fold is checked against);
    else None. ``examples``: the job's example inputs (drawn from the recipe's specs if needed and not given).
    ``scale=False``: p is dropped, the architecture without gates (as ``surgery.fold.remove_gates``)."""
    records = record_recipe(model, recipe, examples=examples)
    twin = records.reference() if reference else None
    folded, report = records.fold(into_weights=into_weights, scale=scale)
    return folded, report, twin


@dataclass
class SiteRecords:
    """A recorded surgery's sites found again in ``model`` and recorded in its owners' graphs (``parts``: path,
    graph over the model's modules; ``whole``: the paths captured whole), no gate built and nothing installed:
    ``fold_recipe`` in two steps, for a caller that takes the reference's outputs before the fold changes the
    weights (``pipeline.convert`` of a plain format: one copy of the weights held, see ``reference``)."""

    model: nn.Module
    parts: list[tuple[str, fx.GraphModule]]
    whole: set[str]
    examples: Any

    def reference(self, *, share_weights: bool = False) -> nn.Module:
        """A copy of the model and of the graphs over it, their modules shared as here, that computes the recipe
        in eval, ``x + p f(x)``, with one explicit multiply per site and no weight scaled. ``share_weights``: the
        copy holds the model's own parameters and buffers (its module tree and graphs alone are copied): no
        weight is copied, and it computes the recipe only until ``fold`` scales those weights."""
        twin_model, twin_parts = copied((self.model, self.parts),
                                        sharing=[self.model, *(gm for _, gm in self.parts)] if share_weights else ())
        return _placed(fold_parts(twin_model, twin_parts, into_weights=False, examples=self.examples,
                                  whole=self.whole)[0], self.model)

    def fold(self, *, into_weights: bool = True, scale: bool = True) -> tuple[nn.Module, FoldReport]:
        """The model folded in place from its records (``fold_recipe``), with the fold's report."""
        folded, report = fold_parts(self.model, self.parts, into_weights=into_weights, scale=scale,
                                    examples=self.examples, whole=self.whole)
        return _placed(folded, self.model), report


def record_recipe(model: nn.Module, recipe: Recipe, *, examples=None) -> SiteRecords:
    """The recipe's sites found again in ``model`` and each owner traced as inject did (``_located``,
    ``rewrites``), each site a ``SiteRecord`` of its branch and p in its owner's graph: fold's input, no gate."""
    examples = _examples_for(recipe, examples)
    cap, chosen = _located(model, recipe, examples)
    p_of = {s.id: p for s, p in chosen}
    parts, whole = [], set()
    for rewrite in rewrites(model, cap, [s for s, _ in chosen], recipe.leaves, examples):
        gate_sites(rewrite.gm, [(s, p_of[s.id]) for s in rewrite.sites], scaling=recipe.scaling,
                   copy_skip=rewrite.copy_skip, records=True)
        parts.append((rewrite.path, rewrite.gm))
        if rewrite.how == WHOLE:
            whole.add(rewrite.path)
    return SiteRecords(model, parts, whole, examples)


def _examples_for(recipe: Recipe, examples, always: bool = False):
    """The job's example inputs, or, where the capture or the owners' trace needs them (or ``always``), a draw from
    the recipe."""
    if examples is None and recipe.inputs and (always or recipe.capture != "fx"):
        return make_example_inputs(recipe.inputs)
    return examples


def _located(work: nn.Module, recipe: Recipe, examples) -> tuple[Capture, list[tuple[ResidualSite, float]]]:
    """The recipe's sites found again in ``work``: its drop paths switched off as inject did, captured by the same
    front-end and detected; each with its recorded p."""
    _check_gate_options(recipe.mode, recipe.scaling)
    if not recipe.keep_existing:
        switch_off(work)
    # fx sites never needed inputs to match (as before export capture existed)
    cap, sites = locate(work, recipe.leaves, None if recipe.capture == "fx" else examples, method=recipe.capture)
    by_id = {s.id: s for s in sites}
    missing = [sid for sid, _ in recipe.sites if sid not in by_id]
    if missing:
        raise RecipeMismatchError(
            f"the recipe names {len(missing)} site(s) this architecture does not have (first: {missing[0]!r}); "
            "was it saved from a different architecture or with other --leaf settings?"
        )
    return cap, [(by_id[sid], p) for sid, p in recipe.sites]


def _placed(result: nn.Module, work: nn.Module) -> nn.Module:
    """``result`` (``work``, or the graph that replaced it whole) with what ``work`` records of its source, and every
    module around an installed graph calling it (none may bypass its forward)."""
    for path, _ in in_place.rewritten(result):
        names = path.split(".")
        for depth in range(len(names)):
            call_children_always(result.get_submodule(".".join(names[:depth])))
    for name in ("sdsurgeon_source",):
        if hasattr(work, name) and result is not work:
            tag(result, name, getattr(work, name))
    return result


def resolve_scaling(scaling: str, model: nn.Module) -> str:
    """``auto``: ``inverted`` when the model brings its own save path (``save_pretrained``: transformers, diffusers,
    PEFT), else ``paper`` (the fold then puts p_l into the weights); any other value is returned as it is.

    Why: such a model is saved by that path (``Trainer.save_model``, the user's own call) and loaded by code
    without sdsurgeon. Its weights are the inference model only if the branches need no scale at inference,
    which is inverted scaling (train: ``x + b*f(x)/p``, inference: ``x + f(x)``), as the drop paths of
    transformers and timm scale. With paper scaling that folder would load unscaled and wrong, silently.
    """
    if scaling not in SCALING_CHOICES:
        raise option_error("--scaling", f"must be one of {', '.join(SCALING_CHOICES)} (got {scaling!r})")
    own_save = callable(getattr(model, "save_pretrained", None))
    if scaling == "paper" and own_save:
        warnings.warn(UnscaledSaveWarning(
            f"paper scaling on {type(model).__name__}: what its own save_pretrained writes (Trainer.save_model too) "
            "holds the training weights, which plain loading runs unscaled; ship it with `sdsurgeon export "
            "--format hf`, or inject with the default scaling (inverted for such a model)"), stacklevel=3)
    if scaling != "auto":
        return scaling
    return "inverted" if own_save else "paper"


def _check_gate_options(mode: str, scaling: str) -> None:
    # Checked up front so a bad option fails before any copying or tracing (a gate's spec, no gate built).
    GateSpec(1.0, mode=mode, scaling=scaling)


def _apply(work: nn.Module, cap: Capture, chosen: list[tuple[ResidualSite, float]], recipe: Recipe,
           examples=None) -> nn.Module:
    """Gate each rewrite's sites and put it in place: a block or a captured part keeps its class and runs
    its gated graph (``surgery.install``); an ATen capture is replaced by its GraphModule. ``examples``: the
    capture's inputs (the owners inside an ATen capture are traced on the calls they receive there)."""
    p_of = {s.id: p for s, p in chosen}
    result = work
    for rewrite in rewrites(work, cap, [s for s, _ in chosen], recipe.leaves, examples):
        gate_sites(rewrite.gm, [(s, p_of[s.id]) for s in rewrite.sites], mode=recipe.mode, scaling=recipe.scaling,
                   seed=recipe.seed, sync_ranks=recipe.sync_ranks, copy_skip=rewrite.copy_skip)
        if rewrite.how == WHOLE:
            result = in_place.replace(result, rewrite.path, rewrite.gm)
        else:
            in_place.install(work.get_submodule(rewrite.path), rewrite.gm, routes=rewrite.routes)
    if in_place.rewritten(result):
        watch_units(result)  # FSDP2 units whose gates all drop are then not called at all
    if recipe.early_exit is not None:  # a recorded one (apply_recipe); inject adds its own after finding the parts
        early_exit_mod.install(result, recipe.early_exit)
    tag(result, RECIPE_ATTR, recipe)
    carry_recipe(result, recipe.to_dict())  # save_pretrained writes it to config.json: sdsurgeon.load regates
    return _placed(result, work)


def gate_sites(
    gm: fx.GraphModule,
    sites: Sequence[tuple[ResidualSite, float]],
    *,
    mode: str = "batch",
    scaling: str = "paper",
    seed: int | None = None,
    sync_ranks: bool = True,
    copy_skip: Mapping[str, bool] = MappingProxyType({}),
    records: bool = False,
) -> fx.GraphModule:
    """Pass: replace each site's add and branch with a call to a StochasticDepth gate (with ``records``, to a
    ``SiteRecord`` of the branch and p, for fold alone: no gate, no draw; see ``fold_recipe``).

    Mutates and returns ``gm``. ``copy_skip`` (site id -> bool) says where a caller outside ``gm``
    writes the block's output in place, so a dropped gate must return a copy of its skip. Sites must come from ``find_residuals(gm)`` and be in depth order:
    inner blocks of nested residuals are gated first and the outer branch then calls the inner gate.
    The branch's modules stay where they are (state_dict keys unchanged); each gate runs its branch
    through a GraphModule that shares those modules.
    """
    graph = gm.graph
    nodes = {n.name: n for n in graph.nodes}
    replaced: dict[str, fx.Node] = {}  # add node name -> gate node that now stands for it
    removed: set[fx.Node] = set()  # nodes moved into a gate's branch (an inner gate too: three levels deep)
    companions: dict[fx.Node, list[fx.Node]] = {}  # gate node -> the nodes that draw its decision

    def node(name: str) -> fx.Node:
        return replaced.get(name) or nodes[name]

    for site, p in sites:
        add = nodes[site.add]
        region = []
        for n in site.branch_nodes:  # an inner gate moves into the outer branch with its draw
            if node(n) not in removed:
                region += companions.get(node(n), []) + [node(n)]
        inputs = [node(n) for n in site.branch_inputs]
        output = node(site.branch_output)

        branch_graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {i: branch_graph.placeholder(i.name) for i in inputs}
        for n in region:
            env[n] = branch_graph.node_copy(n, env.__getitem__)
        branch_graph.output(env[output])
        branch = fx.GraphModule(gm, branch_graph, class_name="Branch")

        name = f"sd_gate_{site.index}"
        copies = copy_skip.get(site.id, False) or written_in_place(gm, add)
        if records:
            gm.add_submodule(name, SiteRecord(p, branch, scaling=scaling, site_id=site.id, index=site.index,
                                              copy_skip=copies))
            with graph.inserting_before(add):
                gate_node = graph.create_node("call_module", name, (node(site.skip), *inputs), name=name)
            companions[gate_node] = []
        else:
            gm.add_submodule(name, StochasticDepth(
                p, branch, mode=mode, scaling=scaling, seed=seed, site_id=site.id, index=site.index,
                copy_skip=copies, sync_ranks=sync_ranks,
                # model attributes (weights read by an ATen graph, layer-scale gammas) are never per-sample
                sample_inputs=tuple(i.op != "get_attr" for i in inputs),
            ))
            with graph.inserting_before(add):
                gate_ref = graph.create_node("get_attr", name, name=f"{name}_module")
                decision = graph.create_node("call_function", draw, (gate_ref, node(site.skip)), name=f"{name}_draw")
                gate_node = graph.create_node("call_module", name, (node(site.skip), *inputs), {"decision": decision},
                                              name=name)
            companions[gate_node] = [gate_ref, decision]
        gate_node.meta = {k: v for k, v in add.meta.items() if k == "nn_module_stack"}
        add.replace_all_uses_with(gate_node)
        graph.erase_node(add)
        for n in reversed(region):
            if not n.users:  # shapes read outside too stay (detection lets only those escape)
                graph.erase_node(n)
                removed.add(n)
        replaced[site.add] = gate_node
    graph.lint()
    gm.recompile()
    return gm
