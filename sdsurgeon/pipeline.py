"""The jobs on model files that the CLI and batch both run: plan, inject, convert (= fold -> export -> verify)."""

from __future__ import annotations

import contextlib
import copy
import gc
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.fx import GraphModule

from .analysis.draft import DRAFT_TOKENS, DraftReport, exit_agreement
from .analysis.layers import find_layers
from .analysis.plan import Plan
from .analysis.plan import plan as plan_model
from .surgery import install as in_place
from .capture.hf_inputs import complete_specs
from .capture.inputs import InputSpec, copy_inputs, make_example_inputs
from .deploy.export import DATA_SUFFIX, OnnxExport, export_onnx, write_onnx
from .deploy.plain import SUFFIXES, PlainExport, delete_layers, load_plain, refuse_unless_plain, \
    write_pretrained, write_safetensors
from .deploy.verify import Reference, Verification, reference_outputs, verify, verify_module
from .errors import ConfigError, LayerError, option_error
from .gate import gates
from .io import hf
from .io.checkpoint import holds_weights_only, load_weights, read_calibration, take_dtypes
from .io.files import check_output, companion_of, staged, staged_folder, staged_pair
from .io.source import SOURCE_ATTR
from .options import ConvertOptions, CurveOptions, SurgeryOptions  # here too: the names pipeline always offered
from .progress import SILENT, Progress
from .sdfile import architecture_of, default_output, load_recorded, rebuild_architecture, save
from .surgery.fold import FoldReport, fold_with_report, remove_gates
from .surgery.inject import apply_recipe, fold_recipe, record_recipe
from .surgery.inject import inject as inject_model
from .surgery.prune import LayerRemoval, PruneCurve, PruneReport, prune, prune_curve
from .surgery.recipe import RECIPE_ATTR, Recipe

# --- inputs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """Which model: a file (``path``), an architecture factory (``arch``), or both, and weights to load into it.

    The forms are one thing spelled three ways: ``path`` a state_dict with ``arch``; ``arch`` with
    ``weights`` a state_dict (the same model); ``path`` a model (a folder, an sdsurgeon file, a pickled
    model) with ``weights`` (its trained weights). A ``path`` that holds weights alone and ``weights``
    together give the weights twice: refused.
    """

    path: Path | None = None
    arch: str | None = None
    arch_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weights: Path | None = None
    trust_pickle: bool = False
    arch_folders: tuple[str, ...] | None = None  # where ``arch`` may be imported from (default: the current folder)
    remember_arch: bool = False  # trust ``arch`` from then on (the command line's inject/export): see sdfile.load

    @property
    def name(self) -> str:
        """What records and messages call the model."""
        return str(self.path) if self.path else str(self.arch)

    @property
    def inputs(self) -> tuple[Path, ...]:
        """The files it reads, which no output may be."""
        return tuple(Path(p) for p in (self.path, self.weights) if p is not None)

    def default_output(self, suffix: str = ".sd.pt") -> Path:
        return default_output(self.path, suffix, self.arch)

    def load(self, examples=None) -> nn.Module:
        """The model, with ``weights`` loaded into it (a recorded surgery redone, on ``examples`` where given)."""
        model, recipe = self.load_recorded()
        return model if recipe is None else apply_recipe(model, recipe, in_place=True, examples=examples)

    def load_recorded(self) -> tuple[nn.Module, Recipe | None]:
        """The model with ``weights`` loaded into it, a recorded surgery not redone, and its recipe (see
        sdfile.load_recorded)."""
        if self.weights is not None and self.path is not None and self.arch and holds_weights_only(self.path):
            raise ConfigError(
                f"{self.path} holds weights alone and --weights {self.weights} gives weights too; give them once: "
                f"MODEL --arch {self.arch}, or --arch {self.arch} --weights FILE",
                what="weights given twice", where=str(self.path), option="--weights",
            )
        model, recipe = load_recorded(self.path, trust_pickle=self.trust_pickle, arch=self.arch,
                                      arch_kwargs=dict(self.arch_kwargs), arch_folders=self.arch_folders,
                                      remember_arch=self.remember_arch)
        if self.weights is not None:  # an injected model has its original's keys: they fit before the surgery
            load_weights(model, self.weights)
        return model, recipe


def _prune(options: ConvertOptions, model: nn.Module, calibration, specs, *,
           into_weights: bool) -> tuple[nn.Module, PruneReport]:
    """surgery.prune with ``options``' choice of blocks."""
    return prune(model, options.drop or 0, by=options.drop_by, sites=options.drop_sites, layers=options.drop_layers,
                 calibration=calibration, into_weights=into_weights, input_specs=specs)


Specs = Sequence[InputSpec] | None


def _examples(model: nn.Module, specs: Specs) -> tuple[list[InputSpec] | None, Any]:
    """Input specs (a transformers model's completed from its config) and example tensors for them."""
    specs = complete_specs(model, list(specs) if specs else None)
    return specs, None if specs is None else make_example_inputs(specs)


@contextlib.contextmanager
def stage(timings: dict[str, float] | None, name: str, progress: Progress = SILENT,
          label: str | None = None) -> Iterator[None]:
    """Time a block into ``timings[name]`` (seconds), when timings are kept; ``progress`` hears of it as
    ``label`` (default: ``name``)."""
    started = time.perf_counter()
    try:
        with progress.stage(label or name):
            yield
    finally:
        if timings is not None:
            timings[name] = round(time.perf_counter() - started, 3)


# --- plan -----------------------------------------------------------------------------------------------


@dataclass
class PlanResult:
    name: str
    plan: Plan
    plot: Path | None = None
    curve: PruneCurve | None = None

    def to_dict(self) -> dict:
        return {"model": self.name, **self.plan.to_dict(), **({"plot": str(self.plot)} if self.plot else {}),
                **({"prune_curve": self.curve.to_dict()} if self.curve else {})}


def plan(ref: ModelRef, options: SurgeryOptions = SurgeryOptions(), inputs: Specs = None, *,
         plot: Path | None = None, curve: CurveOptions | None = None, progress: Progress = SILENT) -> PlanResult:
    """The residual sites of a model file and the p_l each would get; ``plot`` also draws the schedule there.

    ``curve``: also the prune curve of the model gated as planned (of a gated model file: as it is);
    ``plot`` then draws the curve instead of the schedule. ``progress`` hears of each stage: loading, those of
    analysis.plan, and with ``curve`` gating and the curve (advanced once per point), then the plot.
    """
    from .plot import image_format, plot_prune_curve, plot_schedule

    extra = (curve.calibration,) if curve is not None and curve.calibration else ()
    if plot is not None:  # fail before loading: matplotlib missing, a suffix it cannot write, the input itself
        image_format(check_output(plot, *ref.inputs, *extra, option="--plot"))
    calibration = read_calibration(extra[0]) if extra else None
    with progress.stage("load model"):
        model = ref.load()
    specs, example = _examples(model, inputs)
    p = plan_model(model, options, example_inputs=example, progress=progress)
    measured = None
    if curve is not None:
        if gates(model):
            gated = model
        else:
            with progress.stage("inject gates for the prune curve"):
                gated = gate(model, options, specs, progress=progress)
        measured = prune_curve(gated, by=curve.drop_by, calibration=calibration, input_specs=specs,
                               progress=progress)
    if plot is not None:
        with progress.stage("draw the plot"):
            if measured is not None:
                plot_prune_curve(measured, plot, title=ref.name)
            else:
                plot_schedule(p, plot, title=ref.name)
    return PlanResult(ref.name, p, plot, measured)


# --- draft ----------------------------------------------------------------------------------------------


@dataclass
class DraftResult:
    name: str
    report: DraftReport
    calibration: str  # what the figures were measured on

    def to_dict(self) -> dict:
        return {"model": self.name, "calibration": self.calibration, **self.report.to_dict()}


def draft(ref: ModelRef, inputs: Specs = None, *, calibration: Path | None = None, draft_tokens: int = DRAFT_TOKENS,
          progress: Progress = SILENT) -> DraftResult:
    """Per exit layer of a causal LM file (a transformers folder, an injected .sd.pt): how often the exit's greedy
    token is the full model's on ``calibration`` (token ids saved with torch.save, read weights-only; else random
    tokens of ``inputs``' specs), and the self-speculative speed-up that predicts (analysis.draft)."""
    if draft_tokens < 1:
        raise option_error("--draft-tokens", f"must be 1 or more (got {draft_tokens})")
    data = read_calibration(calibration) if calibration is not None else None
    with progress.stage("load model"):
        model = ref.load()
    if data is None:
        specs, data = _examples(model, inputs)
        if data is None:
            raise ConfigError("draft measures on token ids: give --calibration FILE (token ids saved with torch.save) "
                              "or --input input_ids:1,64:int64", option="--calibration")
        source = "random tokens of " + ", ".join(f"{s.name or 'input'} {'x'.join(map(str, s.shape))}" for s in specs)
    else:
        source = str(calibration)
    with progress.stage("measure the exits"):
        report = exit_agreement(model, data, draft_tokens=draft_tokens,
                                option="--calibration" if calibration is not None else "--input")
    return DraftResult(ref.name, report, source)


# --- inject ---------------------------------------------------------------------------------------------


def gate(model: nn.Module, options: SurgeryOptions, inputs: Specs = None, *, progress: Progress = SILENT,
         in_place: bool = False) -> nn.Module:
    """Inject gates into a loaded model (inputs, a transformers model's completed, are recorded in its recipe);
    ``progress`` hears of surgery.inject's stages. ``in_place``: into ``model`` itself (one the caller loaded and
    needs no more as it was), so its weights are not copied."""
    specs, example = _examples(model, inputs)
    return inject_model(model, options, inputs=specs, example_inputs=example, progress=progress, in_place=in_place)


@dataclass
class InjectResult:
    name: str
    output: Path
    options: SurgeryOptions
    recipe: Recipe
    weights_only: bool  # the file loads without --trust-pickle
    seconds: float

    def to_dict(self) -> dict:
        o, recipe = self.options, self.recipe
        return {
            "model": self.name,
            "output": str(self.output),
            "num_gated": len(recipe.sites),
            "expected_depth": round(sum(p for _, p in recipe.sites), 4),
            "rule": o.rule, "p_L": o.pL, "mode": o.mode, "scaling": recipe.scaling, "seed": o.seed,
            "weights_only": self.weights_only,
            "capture": recipe.capture,
            "replaced_drop_paths": [{"module": path, "rate": round(rate, 6)} for path, rate in recipe.replaced],
            "sites": [{"id": s, "p": round(p, 4)} for s, p in recipe.sites],
            "seconds": round(self.seconds, 3),
        }


def inject(ref: ModelRef, options: SurgeryOptions = SurgeryOptions(), inputs: Specs = None, *,
           output: Path | None = None, progress: Progress = SILENT) -> InjectResult:
    """Gate every residual block of a model file and write the model to train (default: <stem>.sd.pt);
    ``progress`` hears of each stage (load, those of surgery.inject, write)."""
    started = time.perf_counter()
    target = Path(output) if output else ref.default_output()
    check_output(target, *ref.inputs)
    with progress.stage("load model"):
        model = ref.load()
    injected = gate(model, options, inputs, progress=progress, in_place=True)  # loaded here: nobody else holds it
    with progress.stage("write the injected model"):
        save(injected, target)
    source = getattr(injected, SOURCE_ATTR, None)
    return InjectResult(ref.name, target, options, getattr(injected, RECIPE_ATTR),
                        source is not None and source.kind in ("arch", "hf"), time.perf_counter() - started)


# --- convert: fold -> export -> verify ------------------------------------------------------------------


NO_INPUT_SHAPE = ("export needs the model's input shape: give --input-shape 1,3,224,224 for one tensor input, or "
                  "--input NAME:SHAPE[:DTYPE] per forward argument (inject remembers them when given there)")


@dataclass
class ConvertResult:
    name: str
    output: Path
    options: ConvertOptions
    report: FoldReport
    exported: OnnxExport | PlainExport
    checked: Verification
    original_nodes: int | None
    seconds: float
    pruned: PruneReport | None = None
    unpruned_nodes: int | None = None  # ONNX nodes of the same model folded without pruning

    def to_dict(self) -> dict:
        report, exported, checked = self.report, self.exported, self.checked
        if isinstance(exported, PlainExport):
            return {"model": self.name, "output": str(self.output), "format": exported.format, "fold": self.options.fold,
                    "gates": len(report.sites), "folded": len(report.folded), "sites": [s.to_dict() for s in report.sites],
                    "tensors": exported.tensors, "file_bytes": exported.file_bytes,
                    "max_abs_error": checked.max_abs, "max_rel_error": checked.max_rel,
                    "tolerance_used": checked.tolerance_used, "verify": checked.to_dict(),
                    "seconds": round(self.seconds, 3), **({} if self.pruned is None else self.pruned.to_dict())}
        return {
            "model": self.name,
            "format": "onnx",
            "output": str(self.output),
            "fold": self.options.fold,
            "gates": len(report.sites),
            "folded": len(report.folded),
            "multiplies": [{"id": s.id, "p": round(s.p, 6), "reason": s.reason} for s in report.multiplies],
            "sites": [s.to_dict() for s in report.sites],
            "nodes": exported.nodes,
            "scale_nodes": exported.scale_nodes,
            "original_nodes": self.original_nodes,
            "op_types": exported.op_types,
            "opset": exported.opset,
            "dynamic_inputs": exported.dynamic_inputs,
            "dynamic_axes": exported.dynamic_axes,
            "experts": exported.experts,
            "upcast_from": exported.upcast_from,
            "file_bytes": exported.file_bytes,
            "external_data": exported.external_data(),
            "max_abs_error": checked.max_abs,
            "max_rel_error": checked.max_rel,
            "tolerance_used": checked.tolerance_used,
            "verify": checked.to_dict(),
            "export_seconds": round(exported.seconds, 3),
            "seconds": round(self.seconds, 3),
            **({} if self.pruned is None else
               {**self.pruned.to_dict(), "nodes_before": self.unpruned_nodes, "nodes_after": exported.nodes}),
        }


def convert(source: ModelRef | nn.Module, options: ConvertOptions = ConvertOptions(), inputs: Specs = None, *,
            output: Path | None = None, name: str | None = None, save_injected: Path | None = None,
            timings: dict[str, float] | None = None, progress: Progress = SILENT) -> ConvertResult:
    """Fold the gates into the weights, export ONNX and verify it with onnxruntime against the gated model;
    or (``options.format``) write the folded model as its plain architecture, checked by loading it back.

    ``source``: a model file (loaded here) or a model already loaded (batch, after inject). Input specs
    default to those its recipe remembers. Every output (the ONNX file, and the gated model at
    ``save_injected``) appears together only once verified, or none does. ``timings`` gets seconds per stage,
    and ``progress`` hears of each (load, save, fold, export, verify, and the extra exports that count nodes).
    """
    started = time.perf_counter()
    fmt = options.format  # checked with the rest of the options when they were made (options.py)
    calibration = None if options.calibration is None else read_calibration(options.calibration)
    ref = source if isinstance(source, ModelRef) else None
    # Loaded here, a recorded surgery is folded from its records (surgery.inject.record_recipe: no gate built), in
    # every format. Pruning stays on the gated path: it executes drop decisions on gates (surgery.prune measures
    # the gated model on calibration data, then folds the chosen gates with p = 0); save_injected writes the
    # gated model itself.
    by_records = not options.prunes and not save_injected
    if ref is not None:
        target = Path(output) if output else ref.default_output(SUFFIXES[fmt] or "-hf")
        if fmt != "hf" and target.suffix != SUFFIXES[fmt]:
            raise ConfigError(f"-o {target}: a {fmt} file name must end in {SUFFIXES[fmt]}")
        reads = [*ref.inputs, *([options.calibration] if options.calibration else [])]
        check_output(target, *reads, folder=fmt == "hf")
        if fmt == "onnx":  # past 2 GB the weights go beside it, and an old one is replaced or removed
            check_output(companion_of(target, DATA_SUFFIX), *reads)
        with stage(timings, "load", progress, "load model"):
            # exported folded, a recorded surgery is folded from its records (fold_recipe): no gate is built
            model, recorded = ref.load_recorded() if by_records else (ref.load(), None)
        name = name or ref.name
    else:
        model, target, recorded = source, Path(output), None
    recipe = recorded if recorded is not None else getattr(model, RECIPE_ATTR, None)
    specs = list(inputs) if inputs else (recipe.inputs if recipe is not None and recipe.inputs else None)
    specs = complete_specs(model, specs)
    if specs is None:
        raise ConfigError(NO_INPUT_SHAPE, what="no input shape", option="--input-shape")
    drawn = make_example_inputs(specs)  # the job's one draw: each stage runs on a copy of its own (copy_inputs)
    example = copy_inputs(drawn)  # the export's and verify's (neither writes into it)
    if fmt != "onnx":
        held = [model]  # loaded here (ref): _convert_plain lets it go before loading back what it wrote
        del model
        return _convert_plain(held, fmt, target, example, options, name, save_injected, timings, started, progress,
                              owned=ref is not None, calibration=calibration, specs=specs, recorded=recorded)
    with contextlib.ExitStack() as outputs:  # every output appears together, or none does
        onnx_tmp = outputs.enter_context(staged_pair(target, DATA_SUFFIX))
        if save_injected:
            sd_tmp = outputs.enter_context(staged(save_injected))
            with stage(timings, "save", progress, "save the injected model"):
                save(model, sd_tmp)
        pruned = None
        with stage(timings, "fold", progress, "prune and fold" if options.prunes else "fold the gates"):
            if recorded is not None:  # the loaded model itself is folded; the reference computes x + p f(x)
                folded, report, reference = fold_recipe(model, recorded, examples=copy_inputs(drawn),
                                                        into_weights=options.fold, reference=options.fold)
                model = None  # it is ``folded`` now
            elif options.prunes:
                folded, pruned = _prune(options, model, calibration, specs, into_weights=options.fold)
                report = pruned.fold
            else:
                folded, report = fold_with_report(model, into_weights=options.fold, examples=copy_inputs(drawn))
        with stage(timings, "export", progress, "export ONNX"):
            exported = write_onnx(folded, example, onnx_tmp, opset=options.opset, dynamic_batch=options.dynamic_batch,
                                  verbose=options.verbose)
        with stage(timings, "verify", progress, "verify with onnxruntime"):
            # against the gated model (the check covers the fold as well as the export); a pruned one is
            # another function, checked against itself in PyTorch (the report measures how far it moved); folded
            # from records, against the recipe computed with a multiply per site (no weight scaled), else (kept as
            # multiplies, --no-fold) the folded model itself, which is that
            if recorded is None:
                reference = folded if pruned else model
            elif reference is None:
                reference = folded
            folded = None  # its weights (a copy) are not needed now: freed before onnxruntime loads its own
            gc.collect()
            checked = verify(reference, onnx_tmp, example, rtol=options.rtol, atol=options.atol)
            reference = None
        unpruned_nodes = unpruned_report = None
        if pruned is not None:  # before the outputs appear: a failure here leaves none
            with tempfile.TemporaryDirectory() as tmp, progress.stage("export the unpruned model (node count)"):
                unpruned, unpruned_report = fold_with_report(model, into_weights=options.fold,
                                                             examples=copy_inputs(drawn))
                unpruned_nodes = export_onnx(unpruned, example, Path(tmp) / "unpruned.onnx", opset=options.opset,
                                             dynamic_batch=options.dynamic_batch, verbose=options.verbose).nodes
                unpruned = None  # a copy of the weights: let go before anything else runs
    exported.path = str(target)
    original_nodes = None
    if options.compare and (report if unpruned_report is None else unpruned_report).ungated_ops:
        # the model folded (unpruned) runs the ungated architecture's ops, op for op: its export's count is the
        # original's, so --compare reuses that export instead of removing the gates and exporting once more
        original_nodes = exported.nodes if pruned is None else unpruned_nodes
    elif options.compare:  # a multiply or a copied weight stayed: the ungated model is exported for its count
        with tempfile.TemporaryDirectory() as tmp, progress.stage("export the model without gates (--compare)"):
            if recorded is not None:  # the recorded architecture again, its sites folded with no scale (no gate)
                original = fold_recipe(ref.load_recorded()[0], recorded, examples=copy_inputs(drawn), scale=False)[0]
            else:
                original = remove_gates(model) if report.sites else model
            original_nodes = export_onnx(original, example, Path(tmp) / "original.onnx", opset=options.opset,
                                         dynamic_batch=options.dynamic_batch, verbose=options.verbose).nodes
    return ConvertResult(name or "", target, options, report, exported, checked, original_nodes,
                         time.perf_counter() - started, pruned, unpruned_nodes)


def _convert_plain(held: list[nn.Module], fmt: str, target: Path, example, options: ConvertOptions, name: str | None,
                   save_injected: Path | None, timings: dict[str, float] | None, started: float,
                   progress: Progress = SILENT, *, owned: bool = False, calibration=None,
                   specs: Specs = None, recorded: Recipe | None = None) -> ConvertResult:
    """Fold, and write the folded model as its plain architecture (safetensors or a save_pretrained folder);
    then load what was written into a fresh instance of that architecture, as a user without sdsurgeon
    would, and check it against the gated model in eval.

    Pruned (hf only): the chosen blocks must make up whole layers of the model's layer list, which are deleted
    from the folded model and its config (deploy.plain.delete_layers); the model with those layers deleted is
    checked against the pruned model (every block of them folded with p = 0), in memory and loaded back.

    ``held``: the gated model, alone in a list. ``owned``: it was loaded for this call, so it is folded in place
    and let go before the written model is loaded back (its outputs are recorded first): one model's weights
    are in memory at a time, not three (gated, folded copy, loaded back). ``recorded``: ``held`` is the model
    loaded without its recorded surgery redone (``ModelRef.load_recorded``, owned, not pruned), folded from
    that recipe's site records with no gate built (``_fold_records``)."""
    model = held.pop()
    source = getattr(model, SOURCE_ATTR, None)
    if fmt == "hf" and not (source is not None and source.kind == "hf"):
        raise ConfigError(f"--format hf writes a transformers save_pretrained folder, but {type(model).__name__} did not "
                          "come from transformers; use --format safetensors", option="--format")
    with contextlib.ExitStack() as outputs:  # every output appears together, or none does
        tmp = outputs.enter_context(staged_folder(target, marker="config.json") if fmt == "hf" else staged(target))
        if save_injected:
            sd_tmp = outputs.enter_context(staged(save_injected))
            with stage(timings, "save", progress, "save the injected model"):
                save(model, sd_tmp)
        pruned = reference = None
        if options.prunes:
            with stage(timings, "prune", progress, "choose the layers to remove"):
                reference, pruned = _prune(options, model, calibration, specs, into_weights=True)
                pruned.layers = _whole_layers(model, pruned)
        with stage(timings, "fold", progress, "fold the gates"):
            if recorded is not None:  # from its records, verify's reference recorded first (no pruning: see convert)
                folded, report, reference = _fold_records(model, recorded, example)
            else:
                if reference is None:  # the gated model's outputs, recorded before an in-place fold changes it
                    reference = reference_outputs(model, example) if owned else model
                folded, report = fold_with_report(model, own=owned)
        refuse_unless_plain(report, fmt)
        plain = _plain_architecture(folded, model)
        if pruned is not None:
            with stage(timings, "delete", progress, "delete the layers"):
                plain = _deleted(plain, pruned.layers, reference, example, options)
        with stage(timings, "export", progress, f"write {'the save_pretrained folder' if fmt == 'hf' else fmt}"):
            written = write_safetensors(plain, tmp) if fmt == "safetensors" else write_pretrained(plain, tmp)
        with stage(timings, "verify", progress, "load it back and verify"):
            fresh = None
            if fmt == "hf":  # from_pretrained builds its own instance: the class is all it takes
                fresh = hf.model_class(source.arch)
            elif source is None or source.kind not in ("arch", "hf"):
                fresh = _poisoned(copy.deepcopy(plain))  # from a pickle: its own class, every tensor poisoned first
            if owned:  # nothing else holds them: their memory goes before the load back
                del model, folded, plain
                gc.collect()  # a block rewritten in place and its graph refer to each other: a cycle only gc frees
            loaded = load_plain(fmt, tmp, fresh if fresh is not None else architecture_of(source))
            checked = verify_module(reference, loaded, example, what=f"the {fmt} model loaded back",
                                    kept="nothing was written", rtol=options.rtol, atol=options.atol)
    written.path = str(target)
    return ConvertResult(name or "", target, options, report, written, checked, None, time.perf_counter() - started,
                         pruned)


def _fold_records(model: nn.Module, recipe: Recipe, example) -> tuple[nn.Module, FoldReport, Reference]:
    """``model`` (loaded for this job, its recorded surgery not redone) folded in place from its site records (no
    gate built), and verify's reference, recorded before the fold scales the weights: the recipe computed in eval
    with an explicit multiply per site by a twin that holds the model's own weights (its module tree and graphs
    copied, no weight: one copy of the weights in memory, as on the gated path), dropped before the fold; or,
    where the fold scales nothing (inverted scaling, p = 1 everywhere), the model's own outputs."""
    records = record_recipe(model, recipe, examples=copy_inputs(example))
    if recipe.scales:
        reference = reference_outputs(records.reference(share_weights=True), example)
    else:
        reference = reference_outputs(model, example)
    folded, report = records.fold()
    return folded, report, reference


def _whole_layers(model: nn.Module, pruned: PruneReport) -> LayerRemoval:
    """The layers the pruned sites make up whole; a site that is part of a layer (or outside the layer list) is
    refused in one line, as a folder of the architecture can lose a layer but not half of one."""
    listed = find_layers(model)
    whole, partial = listed.covering(pruned.dropped)
    if partial:
        layer_of = listed.layer_of()
        shown = ", ".join(partial[:4]) + (f" and {len(partial) - 4} more" if len(partial) > 4 else "")
        where = sorted({layer_of[s] for s in partial if s in layer_of})
        part = f" (part of layer{'s' if len(where) > 1 else ''} {', '.join(map(str, where))} of {listed.path})" \
            if where else f" (outside the layers of {listed.path})"
        raise LayerError(f"--format hf deletes whole layers, but {len(partial)} dropped site(s) make up no whole "
                         f"layer{part}: {shown}; choose whole layers with --drop-layers N, or use --format onnx",
                         what="part of a layer dropped", where=listed.path, option="--format")
    if pruned.layers is not None:
        return pruned.layers
    return LayerRemoval(listed.path, listed.count, whole, "sites")


def _deleted(plain: nn.Module, layers: LayerRemoval, reference: nn.Module, example, options: ConvertOptions) -> nn.Module:
    """``plain`` with ``layers`` deleted, once it computes what ``reference`` (the pruned model) does: a layer whose
    every block is removed must be the identity (a norm after its adds, post-norm, would stay)."""
    if not layers.removed:
        return plain
    deleted = delete_layers(plain, layers.path, layers.removed)
    same = verify_module(reference, deleted, example, what="the model with its layers deleted", kept="",
                         rtol=options.rtol, atol=options.atol, check=False)
    if not same.ok:
        raise LayerError(f"deleting layers {', '.join(map(str, layers.removed))} of {layers.path} does not give the "
                         f"pruned model (max abs error {same.max_abs:.2g}): without their blocks those layers still "
                         "compute something (a norm after the residual add, as in post-norm layers); use --format onnx",
                         what="layers are not the identity without their blocks", where=layers.path, option="--format")
    return deleted


def _plain_architecture(folded: nn.Module, model: nn.Module) -> nn.Module:
    """The folded model as its own architecture: itself where it runs its own code (surgery in place), else a
    fresh instance of the recorded architecture holding its weights (the state_dict keys are the original's)."""
    if not isinstance(folded, GraphModule) and not in_place.rewritten(folded):
        return folded
    fresh = rebuild_architecture(model)
    if fresh is None:
        raise ConfigError(f"{type(folded).__name__} was captured whole (torch.export) from a pickled model, so no "
                          "plain architecture is left to hold its weights: give its state_dict with --arch "
                          "package.module:factory, or use --format onnx", option="--format")
    state = folded.state_dict()
    take_dtypes(fresh, state)
    fresh.load_state_dict(state)
    return fresh.eval()


def _poisoned(model: nn.Module) -> nn.Module:
    """NaN in every floating tensor: whatever loading leaves out shows in the outputs."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.fill_(float("nan"))
    return model


__all__ = ["ConvertOptions", "ConvertResult", "CurveOptions", "InjectResult", "ModelRef", "PlanResult",
           "SurgeryOptions", "convert", "gate", "inject", "plan"]
