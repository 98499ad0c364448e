"""The sdsurgeon command line: parse, call the library, render, exit code (0 ok, 1 user error, 2 usage)."""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
import warnings
from pathlib import Path
from dataclasses import fields, replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Only modules without torch here: --help, COMMAND --help and --version answer without importing it (a few
# seconds). What does the work (pipeline, capture, io.checkpoint, ...) is imported by the command that runs it.
from ._version import __version__
from .analysis.schedule import KINDS, ScheduleSpec
from .errors import ConfigError, SurgeonError, UnscaledSaveWarning, option_error
from .io.files import check_output, clean_up_on_signals
from .io.trust import drop_current_folder
from .options import CALIBRATION_HELP, DROP_BY_HELP, ConvertOptions, CurveOptions, SurgeryOptions, flag_of, \
    help_of, key_of, types_of, without_none
from .progress import SILENT, Progress
from .report import printable

if TYPE_CHECKING:
    from . import pipeline
    from .analysis.plan import Plan
    from .capture.inputs import InputSpec
    from .surgery.fold import FoldReport

app = typer.Typer(
    name="sdsurgeon",
    help=(
        "Stochastic depth for any PyTorch checkpoint, after the fact.\n\n"
        "Finds the residual blocks (x + f(x)) of a model, gates each with a survival probability p_l "
        "for training (a dropped block is not computed), and later folds p_l into the weights.\n\n"
        "Example: sdsurgeon plan --arch sdsurgeon.models:cifar_resnet --arch-kwargs '{\"depth\": 110}' "
        "--pL 0.5 --input-shape 1,3,32,32"
    ),
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish and PowerShell
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"sdsurgeon {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    # No docstring: the app's help above is the one shown. Only options that apply before any command live here.
    pass


class _Console(Console):
    """A rich console that never sends a control character from a file (a tensor name, a path, a message
    quoting either) to the terminal: every string it renders, table cells and titles included, passes
    through ``render_str``, where they are shown escaped (``\\x1b``). Its own styles are added after.

    Strings are plain text, not rich markup (``markup=False``): a name like ``[/x]`` is shown as it is, never
    parsed (a stray closing tag would be a MarkupError); a style is given as a Text, never spelled in a string.
    """

    def render_str(self, text: str, **kwargs) -> Text:
        return super().render_str(printable(text), **kwargs)


out = _Console(highlight=False, soft_wrap=True, markup=False)
err = _Console(stderr=True, highlight=False, soft_wrap=True, markup=False)


def _stderr_is_terminal() -> bool:
    """Whether progress may be drawn on stderr: it is a terminal, or rich's TTY_COMPATIBLE says so (1; 0 says
    not). FORCE_COLOR is not enough: colours in a CI log are welcome, lines redrawn in place are not."""
    said = os.environ.get("TTY_COMPATIBLE", "")
    if said in ("0", "1"):
        return said == "1"
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError, OSError):  # replaced, or closed
        return False


class _StderrProgress(Progress):
    """The library's progress reports drawn on stderr: one line per open stage (a bar where its steps are
    counted), gone once the work ends, before any result is printed."""

    def __init__(self, console: Console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, SpinnerColumn, TextColumn, \
            TimeElapsedColumn
        from rich.progress import Progress as Bars

        class Counted(ProgressColumn):  # a column shown only for stages whose steps are counted
            def __init__(self, column: ProgressColumn) -> None:
                super().__init__()
                self.column = column

            def render(self, task):
                return Text("") if task.total is None else self.column.render(task)

        self.bars = Bars(SpinnerColumn(), TextColumn("{task.description}", markup=False),
                         Counted(BarColumn(bar_width=30)), Counted(MofNCompleteColumn()), TimeElapsedColumn(),
                         console=console, transient=True, redirect_stdout=False, redirect_stderr=True)

    def start(self, name: str, total: int | None = None):
        return self.bars.add_task(printable(name), total=total)

    def advance(self, handle, steps: int = 1) -> None:
        with contextlib.suppress(KeyError):
            self.bars.advance(handle, steps)

    def end(self, handle) -> None:
        with contextlib.suppress(KeyError):
            self.bars.remove_task(handle)


@contextlib.contextmanager
def _progress(quiet: bool, json_: bool = False) -> Iterator[Progress]:
    """What a command's long work reports to: a display on stderr while it runs, where stderr is a terminal;
    nothing with --quiet or --json, or where it is not (a pipe, a file, a CI log). stdout never gets any."""
    if quiet or json_ or not _stderr_is_terminal():
        yield SILENT
        return
    # The stderr of now, held: while an exporter runs, io.quiet points sys.stderr at a buffer for a while.
    console = _Console(file=sys.stderr, force_terminal=True, highlight=False, markup=False)
    if not console.is_interactive:  # TERM=dumb: no redrawing a line in place
        yield SILENT
        return
    reporter = _StderrProgress(console)
    with reporter.bars:
        yield reporter


def user_errors(command: Callable) -> Callable:
    """SurgeonError -> one line on stderr and exit 1; library warnings stay quiet."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return command(*args, **kwargs)
        except SurgeonError as exc:
            err.print(f"error: {exc}", markup=False)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:  # Ctrl-C: the library has cleaned up on its way out (typer would exit 130 mute)
            err.print("error: interrupted (Ctrl-C); no half-written output is left: run the command again",
                      markup=False)
            raise typer.Exit(1) from None

    return run


# Options shared by the commands that read a model.
MODEL_ARG = typer.Argument(
    None, metavar="MODEL", show_default=False,
    help="Checkpoint: a state_dict (.pt/.pth/.safetensors, with --arch), a folder written by a transformers "
    "model's save_pretrained, a pickled nn.Module (with --trust-pickle) or a file written by sdsurgeon. "
    "Optional with --arch (fresh weights).",
)
ARCH = typer.Option(None, "--arch", help="Architecture factory, package.module:factory (a class or function).")
ARCH_KWARGS = typer.Option(None, "--arch-kwargs", help="JSON object of keyword arguments for --arch.")
WEIGHTS_RULE = ("With --arch and no MODEL it is the same as MODEL --arch; with a MODEL that holds a model (a "
                "transformers folder, an sdsurgeon file, a pickled model) they are its trained weights. A MODEL that "
                "holds weights alone and --weights together give the weights twice: an error.")
WEIGHTS_HELP = "Weights (a state_dict .pt/.pth, or .safetensors) loaded into the model before the work. " + WEIGHTS_RULE
TRUST = typer.Option(False, "--trust-pickle", help="Allow unpickling a full model: this runs code from the file.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="Shape of a single float32 input, e.g. 1,3,32,32.")
INPUT = typer.Option([], "--input", help="Named input NAME:SHAPE[:DTYPE], e.g. ids:1,16:int64 (repeatable).")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout instead of text.")
QUIET = typer.Option(False, "--quiet", "-q", help="Show no progress. Progress (the stage running, and counts "
                     "where steps are counted) is drawn on stderr, and only when stderr is a terminal and --json is "
                     "not given; results and errors are printed either way.")


class _Group:
    """Command-line options declared once and handed to each command that takes them as the one value they make:
    the command names ``into`` as a parameter, and ``_takes`` puts ``params`` (typer reads them) in its place."""

    def __init__(self, into: str, params: list[inspect.Parameter], build: Callable[..., Any]) -> None:
        self.into, self.params, self.build = into, params, build


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _takes(*groups: _Group) -> Callable[[Callable], Callable]:
    """Give a command the options of ``groups``: its signature (what typer reads) has their parameters instead of
    the groups' ``into`` names, and it is called with what each group builds from their values."""

    def decorate(command: Callable) -> Callable:
        taken = {g.into for g in groups}
        # The command's annotations are strings (postponed); the taken ones may name what only type checkers
        # import (pipeline.ModelRef), so each kept one is evaluated alone, in the command's module.
        own = [p.replace(annotation=eval(p.annotation, command.__globals__) if isinstance(p.annotation, str)
                         else p.annotation, kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(command).parameters.values() if p.name not in taken]
        params = [p for g in groups for p in g.params] + own
        arguments = [p for p in params if isinstance(p.default, typer.models.ArgumentInfo)]  # positional first
        params = arguments + [p for p in params if p not in arguments]

        @functools.wraps(command)
        def run(**values):
            for g in groups:
                values[g.into] = g.build(**{p.name: values.pop(p.name) for p in g.params})
            return command(**values)

        run.__signature__ = inspect.Signature(params)
        run.__annotations__ = {p.name: p.annotation for p in params}
        del run.__wrapped__  # typer reads the signature above, not the command's own
        return run

    return decorate


def _options(cls: type, into: str, names: tuple[str, ...] | None = None) -> _Group:
    """One command-line option per field of ``cls`` (those in ``names``, or every one with a flag), spelled, typed
    and explained as the field says (options.py); the command gets ``cls`` made of them by keyword."""
    hints = types_of(cls)
    params, negated = [], set()
    for f in fields(cls):
        flag = flag_of(cls, f.name)
        if not flag or (names is not None and f.name not in names):
            continue
        base, nullable = without_none(hints[f.name])
        if getattr(base, "__origin__", None) is tuple:  # repeatable: typer collects a list
            annotation, default = list[base.__args__[0]], []
        else:
            annotation, default = (Optional[base] if nullable else base), f.default
        if f.metadata.get("negated"):
            negated.add(f.name)
            default = not default
        params.append(_param(f.name, annotation, typer.Option(default, flag, help=help_of(cls, f.name))))

    def build(**values) -> Any:
        return cls(**{k: (not v) if k in negated else tuple(v) if isinstance(v, list) else v
                      for k, v in values.items()})

    return _Group(into, params, build)


def _model(remember: bool = True, weights_help: str = WEIGHTS_HELP) -> _Group:
    """MODEL and the options that say how to load it; its --arch is remembered as trusted unless ``remember`` is
    off (plan)."""

    def build(model: Optional[Path], arch: Optional[str], arch_kwargs: Optional[str], weights: Optional[Path],
              trust_pickle: bool) -> pipeline.ModelRef:
        from . import pipeline
        from .io.checkpoint import parse_arch_kwargs

        return pipeline.ModelRef(model, arch, parse_arch_kwargs(arch_kwargs), weights, trust_pickle,
                                 remember_arch=remember)

    return _Group("ref", [_param("model", Optional[Path], MODEL_ARG), _param("arch", Optional[str], ARCH),
                          _param("arch_kwargs", Optional[str], ARCH_KWARGS),
                          _param("weights", Optional[Path], typer.Option(None, "--weights", help=weights_help)),
                          _param("trust_pickle", bool, TRUST)], build)


def _build_specs(input_shape: Optional[str], input_: list[str]) -> list[InputSpec] | None:
    from .capture.inputs import parse_specs

    return parse_specs(input_shape, input_)


# The example inputs: the command gets their specs (or None).
_INPUTS = _Group("specs", [_param("input_shape", Optional[str], INPUT_SHAPE), _param("input_", list[str], INPUT)],
                 _build_specs)


def _schedule_options(kind: Optional[str], theta: float, rule: str, gamma: float, warmup: int,
                      ramp: int) -> dict | None:
    if kind is None:
        for name, value, default in (("--gamma", gamma, 0.001), ("--warmup", warmup, 0), ("--ramp", ramp, 0)):
            if value != default:
                raise option_error(name, "applies to a schedule over training steps: give --schedule too")
        return None
    try:
        return ScheduleSpec(kind, theta, rule, warmup, ramp, gamma).to_dict()
    except ConfigError as exc:
        raise option_error("--schedule", str(exc)) from None


def _fmt_flops(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


_CAPTURES = {"fx": "torch.fx (Python-level graph)", "export": "torch.export (ATen-level graph)"}


def _site_table(title: str, columns: list[tuple[str, str]], rows: list[list[str]], site: int,
                droppable: tuple[int, ...]) -> None:
    """Print a table whose column ``site`` (site ids, which users copy into --set) never wraps. Where the
    table does not fit the terminal it loses its borders first, then the ``droppable`` columns in that order
    (a note names them; --json has them all); the other columns fold."""
    width = out.width
    shown = list(range(len(columns)))
    unbounded = out.options.update_width(10_000)  # a measure within the terminal is clipped to it

    def fits(table: Table) -> bool:
        return out.measure(table, options=unbounded).maximum <= width

    def build(compact: bool) -> Table:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD if compact else box.HEAVY_HEAD,
                      show_edge=not compact, pad_edge=not compact)
        for i in shown:
            col, justify = columns[i]
            if i == site:
                longest = max([len(col), *(len(r[i]) for r in rows)])
                table.add_column(col, justify=justify, no_wrap=True, overflow="ignore", min_width=longest)
            else:
                table.add_column(col, justify=justify, overflow="fold")
        for r in rows:
            table.add_row(*(r[i] for i in shown))
        return table

    table = build(False)
    left_out: list[str] = []
    if not fits(table):
        table = build(True)
        for i in droppable:
            if fits(table):
                break
            shown.remove(i)
            left_out.append(columns[i][0])
            table = build(True)
    out.print(table)
    if left_out:
        out.print(f"(left out at this width: {', '.join(left_out)}; --json has them)")


def _render_plan(p: Plan, name: str) -> None:
    columns = [("#", "right"), ("site", "left"), ("p_l", "right"), ("params", "right"), ("FLOPs", "right"),
               ("share", "right"), ("shortcut", "left")]
    rows = [[str(s.index), s.id, f"{s.p:.4f}" if s.gated else "1 (no gate)", f"{s.params:,}", _fmt_flops(s.flops),
             "-" if s.flops_share is None else f"{100 * s.flops_share:.1f}%", s.shortcut] for s in p.sites]
    if p.sites:
        _site_table(f"residual sites of {name}", columns, rows, site=1, droppable=(6, 5, 4, 3))
    out.print(f"sites: {p.num_sites} found, {p.num_gated} gated ({p.rule} rule, p_L = {p.p_L})")
    out.print(f"expected depth: {p.expected_depth:.2f} of {p.num_sites} blocks")
    if p.expected_train_flops_ratio is None:
        out.print("expected training FLOPs: give --input-shape (or --input) to count them")
    else:
        out.print(f"expected training FLOPs: {p.expected_train_flops_ratio:.3f} of the original "
                  f"({_fmt_flops(p.total_flops)} FLOPs per forward)")
    out.print(f"capture: {_CAPTURES.get(p.capture, p.capture)}")
    if p.rewrites:
        out.print(f"surgery: {_surgery_summary(p.rewrites)}", markup=False)
    if p.drop_paths:
        rates = sorted({d.rate for d in p.drop_paths})
        what = "kept at their rates (--keep-existing)" if p.keep_existing else "switched off: the gates replace them"
        out.print(f"existing drop-path modules: {len(p.drop_paths)} ({p.drop_paths[0].cls}, rates "
                  f"{rates[0]:.4g} to {rates[-1]:.4g}), {what}")
    if p.outputs:
        out.print("outputs: " + "; ".join(_fmt_reach(r) for r in p.outputs), markup=False)
    if p.untraced and p.sites:
        # The partial capture's normal path, not a failure: the modules inside these were captured and searched.
        # Only adds written in these modules' own forward went unsearched; --json keeps each module's reason.
        paths = list(dict.fromkeys(m or "(root)" for m, _ in p.untraced))
        shown = ", ".join(paths[:4]) + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
        out.print(f"captured in parts: {shown} could not be traced whole, so only adds written in their own forward "
                  "were not searched; the modules inside them were (--json gives each reason)", markup=False)
    else:
        for module, reason in p.untraced:
            out.print(f"not traced: {module or '(root)'}: {reason}", markup=False)
    for refused in p.refused:
        out.print(f"not gated: {refused.id}: {refused.reason}", markup=False)


_FORMAT_NAMES = {"onnx": "ONNX", "safetensors": "safetensors", "hf": "hf"}


def _fmt_reach(r) -> str:
    """``ONNX yes``, ``hf no (not a transformers model)``, ``ONNX not checked (give --input-shape ...)``."""
    name = _FORMAT_NAMES.get(r.format, r.format)
    if r.ok:
        return f"{name} yes" + (f" (dynamic {', '.join(r.dynamic)})" if r.dynamic else "")
    return f"{name} {'no' if r.ok is False else 'not checked'} ({r.why})"


def _surgery_summary(rewrites) -> str:
    """One line on where inject puts its gates (analysis.owners)."""
    whole = [r for r in rewrites if r.how == "whole model"]
    if whole:
        where = ", ".join(r.path or "the model" for r in whole)
        return (f"replaces {where} by a GraphModule (an ATen-level capture has no module boundaries to keep): "
                "its class and methods other than forward are gone")
    classes = sorted({r.cls for r in rewrites})
    blocks = [r for r in rewrites if r.how == "block"]
    what = (f"{len(blocks)} block(s) ({', '.join(classes)}) rewritten in place; the rest runs its own code"
            if len(blocks) == len(rewrites) else
            f"in place in {', '.join(r.path or '(root)' for r in rewrites)} ({', '.join(classes)}), which runs "
            "its traced graph; every module keeps its class and methods")
    return what


def _fmt_share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _render_curve(curve) -> None:
    columns = [(col, "left" if col == "site removed last" else "right")
               for col in ("removed", "site removed last", "params used", "rel error", "cosine", "top-1 agreement")]
    rows = [[str(pt.removed), pt.site or "-", f"{pt.params:,}", f"{pt.fidelity.rel_error:.3g}",
             f"{pt.fidelity.cosine:.4f}", _fmt_share(pt.fidelity.top1)] for pt in curve.points]
    _site_table(f"prune curve ({curve.by} order), against the unpruned model on {curve.calibration}", columns, rows,
                site=1, droppable=(2, 5, 4))


# What plan and inject both take; inject adds how the gates draw and scale.
_PLANNED = ("pL", "rule", "overrides", "include", "exclude", "leaves", "capture", "keep_existing")


@app.command("plan")
@user_errors
@_takes(_model(remember=False), _options(SurgeryOptions, "surgery", _PLANNED), _INPUTS)
def plan_cmd(
    ref: pipeline.ModelRef,
    surgery: SurgeryOptions,
    specs: Optional[list[InputSpec]],
    json_: bool = JSON,
    plot: Optional[Path] = typer.Option(
        None, "--plot", help="Also draw the schedule to this image (.png, .svg or .pdf): p_l per site as a line "
        "and, with --input-shape, each site's share of the FLOPs as bars. Needs matplotlib: "
        "pip install matplotlib. Example: --plot schedule.png"),
    prune_curve: bool = typer.Option(False, "--prune-curve", help="Also measure how far the gated model can be "
                                     "pruned: for k = 0..L blocks removed (in --drop-by order), the output's relative "
                                     "error, cosine similarity and top-1 agreement against the unpruned model. "
                                     "--plot then draws this curve."),
    drop_by: str = typer.Option("schedule", "--drop-by", help=DROP_BY_HELP),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help=CALIBRATION_HELP),
    quiet: bool = QUIET,
) -> None:
    """Show the residual sites found and the survival probability each would get; --plot draws it.

    Example: sdsurgeon plan model.pt --arch mymodels:resnet110 --pL 0.5 --input-shape 1,3,32,32 --plot schedule.png

    Example: sdsurgeon plan --arch mymodels:resnet110 --weights model.pt   (the same model, as export and batch spell it)

    Example: sdsurgeon plan ./bert-small --input input_ids:1,16:int64   (a save_pretrained folder)

    Example: sdsurgeon plan trained.sd.pt --prune-curve --calibration batch.pt --plot curve.png
    """
    from . import pipeline

    if not prune_curve and (calibration is not None or drop_by != "schedule"):
        raise ConfigError(f"{'--calibration' if calibration is not None else '--drop-by'} is for --prune-curve in plan; "
                          "add --prune-curve")
    curve = CurveOptions(drop_by=drop_by, calibration=calibration) if prune_curve else None
    with _progress(quiet, json_) as progress:
        result = pipeline.plan(ref, surgery, specs, plot=plot, curve=curve, progress=progress)
    if json_:  # the plot is written before any output, so a failed write leaves stdout empty
        print(json.dumps(result.to_dict()))
    else:
        _render_plan(result.plan, result.name)
        if result.curve is not None:
            _render_curve(result.curve)
        if plot is not None:
            out.print(f"wrote {plot}", markup=False)


@app.command("inject")
@user_errors
@_takes(_model(), _options(SurgeryOptions, "surgery"), _INPUTS)
def inject_cmd(
    ref: pipeline.ModelRef,
    surgery: SurgeryOptions,
    specs: Optional[list[InputSpec]],
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: <stem>.sd.pt beside MODEL)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help=f"Record how p_L moves over training steps, "
                                           f"{' | '.join(KINDS)}: fixed (the rule at --pL throughout), warmup (no "
                                           "drops for --warmup steps, then a linear ramp to --theta over --ramp "
                                           "steps), pld (Progressive Layer Dropping: theta(t) = (1 - theta) "
                                           "e^(-gamma t) + theta). Step it with sdsurgeon.schedules.schedule(model)."),
    theta: Optional[float] = typer.Option(None, "--theta", help="The schedule's final p_L (default: --pL)."),
    gamma: float = typer.Option(0.001, "--gamma", help="pld: how fast theta(t) falls towards --theta per step."),
    warmup: int = typer.Option(0, "--warmup", help="warmup: steps without drops."),
    ramp: int = typer.Option(0, "--ramp", help="warmup: steps of the linear ramp after them."),
    json_: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Gate every residual block with stochastic depth and write a model to train.

    The output keeps the input's state_dict keys. Load it with sdsurgeon.load(path) and train as usual:
    model.train() draws gates, model.eval() scales each branch by its p_l.

    Example: sdsurgeon inject model.pt --arch mymodels:resnet110 --pL 0.5 -o model.sd.pt

    Example: sdsurgeon inject --arch mymodels:resnet110 --weights model.pt --pL 0.5   (the same model)

    Example: sdsurgeon inject model.pt --arch mymodels:resnet110 --schedule pld --theta 0.5 --gamma 0.001
    """
    from . import pipeline

    pL, rule = surgery.pL, surgery.rule
    surgery = replace(surgery, schedule=_schedule_options(schedule, pL if theta is None else theta, rule, gamma,
                                                          warmup, ramp))
    with _progress(quiet, json_) as progress, warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always", UnscaledSaveWarning)  # the one library warning inject's user must read
        result = pipeline.inject(ref, surgery, specs, output=output, progress=progress)
    for warning in said:  # on stderr: --json keeps stdout one JSON object
        if issubclass(warning.category, UnscaledSaveWarning):
            err.print(f"note: {warning.message}", markup=False)
    record = result.to_dict()
    if json_:
        print(json.dumps(record))
        return
    out.print(f"gated {record['num_gated']} residual blocks ({rule} rule, p_L = {pL}, {surgery.mode} mode, "
              f"{record['scaling']} scaling)")
    out.print(f"expected gated blocks active per step: {record['expected_depth']:.2f} of {record['num_gated']}")
    if result.recipe.replaced:
        out.print(f"switched off {len(result.recipe.replaced)} drop-path modules the model had (the gates replace them; "
                  "--keep-existing keeps them)")
    trust = "" if record["weights_only"] else " (holds a pickled model: load it with --trust-pickle)"
    out.print(f"wrote {result.output}{trust}", markup=False)


def _fmt_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _render_fold(report: FoldReport, fold: bool) -> None:
    n = len(report.sites)
    if not n:
        out.print("no gates: the model is exported as it is")
        return
    if report.folded:
        out.print(f"folded {len(report.folded)} of {n} gates into their branch's weights")
    unscaled = [s for s in report.sites if s.how == "none"]
    if unscaled:
        out.print(f"removed {len(unscaled)} gates that need no scale (inverted scaling or p = 1)")
    if report.multiplies and not fold:
        out.print(f"kept {len(report.multiplies)} gates as explicit multiplies (--no-fold)")
    elif report.multiplies:
        out.print(f"kept {len(report.multiplies)} as an explicit multiply:")
        for s in report.multiplies:
            out.print(f"  {s.id} (p = {s.p:.4g}): {s.reason}", markup=False)


def _render_pruned(pruned, nodes_before: int | None = None, nodes_after: int | None = None) -> None:
    from .surgery.prune import LAYER_RULES

    layers = pruned.layers
    if layers is not None and layers.by in LAYER_RULES:
        rule = f"per layer, {LAYER_RULES[layers.by]} first"
    else:
        rule = {"schedule": "lowest p_l first", "influence": "lowest block influence first",
                "sites": "--drop-sites"}[pruned.by]
    total = len(pruned.dropped) + len(pruned.kept)
    out.print(f"pruned: {len(pruned.dropped)} of {total} blocks removed ({rule}): "
              f"{', '.join(pruned.dropped) or 'none'}", markup=False)
    if layers is not None:
        out.print(f"removed {len(layers.removed)} of {layers.total} layers (indices "
                  f"{', '.join(map(str, layers.removed)) or 'none'}) of {layers.path}", markup=False)
    sizes = [] if nodes_before is None else [f"ONNX nodes {nodes_before} -> {nodes_after}"]
    if pruned.params_before is not None:
        sizes.insert(0, f"parameters used {pruned.params_before:,} -> {pruned.params_after:,}")
    if sizes:
        out.print(", ".join(sizes))
    f = pruned.fidelity
    if f is None:
        out.print("fidelity: not measured (no inputs: give --calibration or --input-shape)")
    else:
        top1 = "" if f.top1 is None else f", top-1 agreement {100 * f.top1:.1f}%"
        out.print(f"against the unpruned model on {pruned.calibration}: relative error {f.rel_error:.3g}, "
                  f"cosine {f.cosine:.4f}{top1}", markup=False)


@app.command("export")
@user_errors
@_takes(_model(weights_help="Trained weights (a state_dict of the injected model or of the original architecture: "
                            "same keys) loaded before folding. " + WEIGHTS_RULE),
        _options(ConvertOptions, "options"), _INPUTS)
def export_cmd(
    ref: pipeline.ModelRef,
    options: ConvertOptions,
    specs: Optional[list[InputSpec]],
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="ONNX file to write (default: <stem>.onnx beside MODEL)."),
    json_: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Fold the gates into the weights and export a deterministic ONNX graph, verified with onnxruntime.

    onnxruntime runs the file on three fresh random inputs (the last with another batch size) and is
    compared with the injected model in eval mode, so the check covers the fold as well as the export.
    A miss beyond --rtol/--atol is a failure (exit 1) and leaves no ONNX file. The input shape given at
    inject is remembered, so a file written by `sdsurgeon inject --input-shape ...` needs none here.

    With --drop (or --drop-sites) the export is pruned: the chosen blocks go, the others fold, and the
    report says which went, the parameters and ONNX nodes before and after, and how far the output moved
    from the unpruned model's on the calibration inputs (onnxruntime is then checked against the pruned model).

    Example: sdsurgeon export model.sd.pt --weights trained_state.pt -o model.onnx

    Example: sdsurgeon export model.sd.pt --weights trained_state.pt --drop 25% --drop-by influence --calibration batch.pt

    Example: sdsurgeon export model.sd.pt --weights trained_state.pt --format safetensors -o plain.safetensors

    Example: sdsurgeon export llm.sd.pt --drop-layers 25% --drop-by angular --format hf -o llm-pruned
    """
    from . import pipeline

    if not options.prunes and options.drop_by != "schedule":  # --calibration: refused by ConvertOptions itself
        raise ConfigError("--drop-by is for pruning: add --drop N, --drop-layers N or --drop-sites REGEX")
    with _progress(quiet or options.verbose, json_) as progress:  # --verbose: the exporter's own output, undrawn over
        result = pipeline.convert(ref, options, specs, output=output, progress=progress)
    record = result.to_dict()
    if json_:
        print(json.dumps(record))
        return
    if record["format"] != "onnx":
        _render_plain(result)
        return
    report, exported, checked = result.report, result.exported, result.checked
    _render_fold(report, options.fold)
    if result.pruned is not None:
        _render_pruned(result.pruned, result.unpruned_nodes, exported.nodes)
    compared = (f" ({exported.scale_nodes} from kept multiplies)" if result.original_nodes is None
                else f" (the architecture without gates: {result.original_nodes})")
    if any(a for axes in exported.dynamic_axes.values() for a in axes[1:]):  # more than a batch axis
        batch = "dynamic axes " + ", ".join(f"{name} [{', '.join(a or str(i) for i, a in enumerate(axes))}]"
                                            for name, axes in exported.dynamic_axes.items())
    else:
        batch = f"dynamic batch ({', '.join(exported.dynamic_inputs)})" if exported.dynamic_inputs else "static batch"
    out.print(f"ONNX: {exported.nodes} nodes{compared}, opset {exported.opset}, {batch}, {_fmt_bytes(exported.file_bytes)}")
    if exported.upcast_from:
        out.print(f"ONNX in float32: the model is {exported.upcast_from}, and onnxruntime's CPU provider lacks most "
                  f"{exported.upcast_from} kernels")
    if exported.experts:
        out.print(f"experts exported as {', '.join(exported.experts)} (the ONNX exporter has no translation for the "
                  "fused one; same numbers)")
    sizes = ", ".join(str(b) for b in checked.batch_sizes)
    if checked.sequence_lengths:
        sizes += "; sequence " + ", ".join(str(n) for n in checked.sequence_lengths)
    against = "the pruned model" if result.pruned else "the injected model" if report.sites else "the model"
    out.print(f"onnxruntime vs {against} in eval, {len(checked.batch_sizes)} random inputs (batch {sizes}): "
              f"max abs error {checked.max_abs:.2g}, {100 * checked.tolerance_used:.2g}% of the tolerance "
              f"({_tolerances(checked)})")
    weights = (f" and its weights {exported.data_path} ({_fmt_bytes(exported.data_bytes)}: ONNX external data, "
               "keep the two files together)" if exported.data_bytes is not None else "")
    out.print(f"wrote {result.output}{weights} in {record['seconds']:.1f} s", markup=False)


def _tolerances(checked) -> str:
    fitted = f", fitted to {checked.precision}" if checked.precision else ""
    return f"rtol {checked.rtol:.2g}, atol {checked.atol:.2g}{fitted}"


def _render_plain(result) -> None:
    report, written, checked = result.report, result.exported, result.checked
    out.print(f"folded {len(report.folded)} of {len(report.sites)} gates into the weights: the model is its own "
              "architecture again")
    if result.pruned is not None:
        _render_pruned(result.pruned)
    what = "save_pretrained folder" if written.format == "hf" else "safetensors state_dict"
    out.print(f"{what}: {written.tensors} tensors, {_fmt_bytes(written.file_bytes)}")
    sizes = ", ".join(str(b) for b in checked.batch_sizes)
    against = "the pruned model" if result.pruned is not None else "the injected model"
    out.print(f"loaded back into a fresh {written.format} model vs {against} in eval, "
              f"{len(checked.batch_sizes)} random inputs (batch {sizes}): max abs error {checked.max_abs:.2g}, "
              f"{100 * checked.tolerance_used:.2g}% of the tolerance ({_tolerances(checked)})")
    out.print(f"wrote {result.output} in {result.seconds:.1f} s", markup=False)


@app.command("draft")
@user_errors
@_takes(_model(remember=False), _INPUTS)
def draft_cmd(
    ref: pipeline.ModelRef,
    specs: Optional[list[InputSpec]],
    calibration: Optional[Path] = typer.Option(
        None, "--calibration", help="Token ids to measure on: a file saved with torch.save holding an integer tensor "
        "(batch, positions), or a dict with input_ids and optionally attention_mask (positions whose mask is 0 are not "
        "counted); read weights-only. Default: random tokens of --input (or 1x16), which say little about text."),
    draft_tokens: int = typer.Option(20, "--draft-tokens", help="Tokens drafted per round in the speed-up model "
                                     "(transformers' default num_assistant_tokens for assisted generation: 20)."),
    json_: bool = JSON,
    quiet: bool = QUIET,
) -> None:
    """Measure each layer of a causal LM as the exit of self-speculative decoding: how often its greedy token (the
    model's own final norm and LM head on the layer's output) is the full model's, and the speed-up of
    generate(assistant_early_exit=layer + 1) that share predicts (Leviathan et al. 2023; a model, not a timing).

    Example: sdsurgeon draft ./llm --calibration tokens.pt

    Example: sdsurgeon draft llm.sd.pt --calibration tokens.pt --json   (an injected model, inject --early-exit)
    """
    from . import pipeline

    with _progress(quiet, json_) as progress:
        result = pipeline.draft(ref, specs, calibration=calibration, draft_tokens=draft_tokens, progress=progress)
    if json_:
        print(json.dumps(result.to_dict()))
        return
    r = result.report
    columns = [("layer", "right"), ("assistant_early_exit", "right"), ("agreement", "right"),
               ("draft cost", "right"), ("speed-up", "right")]
    rows = [[str(e.layer), str(e.assistant_early_exit), f"{100 * e.agreement:.1f}%", f"{e.cost:.3f}",
             f"{e.speedup:.2f}x"] for e in r.exits]
    _site_table(f"exits of {result.name} ({r.layer_list}, {r.n_layers} layers; head {r.head}, final norm "
                f"{r.norm or '(none)'})", columns, rows, site=0, droppable=(3, 1))
    best = r.best()
    out.print(f"measured on {result.calibration}: {r.positions} positions", markup=False)
    if best is None:
        out.print(f"no exit before the last layer predicts a speed-up (draft of {r.draft_tokens} tokens a round)")
    else:
        out.print(f"best predicted exit: layer {best.layer} (generate(assistant_early_exit="
                  f"{best.assistant_early_exit})), {best.speedup:.2f}x; draft of {r.draft_tokens} tokens a round")
    out.print("speed-up = (1 - a^(g+1)) / ((1 - a)(g c + 1)) (Leviathan et al. 2023), a = agreement, g = draft tokens, "
              "c = draft cost (layers run / L): a model of the speed-up, not a measurement")


class _BatchDisplay:
    """Each job's outcome on stdout: one plain line per finished job, or, on a terminal, a table of them all once
    the run is over. While it runs, progress is on stderr (``_progress``): a live table on stdout would fight it for
    the terminal, and stdout carries results only."""

    def __init__(self, names: list[str], table: bool, enabled: bool) -> None:
        self.status = {n: "queued" for n in names}
        self.notes: dict[str, str] = {}
        self.enabled = enabled
        self.table = enabled and table

    def _table(self) -> Table:
        table = Table(title="sdsurgeon batch", title_justify="left")
        for col in ("job", "status", "note"):
            table.add_column(col)
        colour = {"ok": "green", "failed": "red", "skipped": "dim", "running": "yellow", "queued": "dim"}
        for name, status in self.status.items():
            table.add_row(name, Text(status, style=colour[status]), self.notes.get(name, ""))
        return table

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if self.table and exc_type is None:  # an interrupted run prints its error line alone
            out.print(self._table())

    def __call__(self, event) -> None:
        if event.kind == "start":
            self.status[event.job] = "running"
        else:
            r = event.record
            self.status[event.job] = r.status
            self.notes[event.job] = r.error or (
                f"{r.folded}/{r.sites} folded, {f'{r.dropped} dropped, ' if r.dropped else ''}{r.nodes} nodes, "
                f"max abs error {r.max_abs_error:.2g}, "
                f"{r.timings.get('total', 0):.1f} s"
            )
            if self.enabled and not self.table:
                out.print(f"[{event.done}/{event.total}] {r.name}: {r.status} ({self.notes[event.job]})", markup=False)


@app.command("batch")
@user_errors
def batch_cmd(
    config: Path = typer.Argument(..., metavar="CONFIG", show_default=False,
                                  help="YAML config: defaults (any inject/export option) and models."),
    jobs: int = typer.Option(1, "--jobs", "-j", help="Jobs run at once, each in its own process; torch threads are split between them."),
    fail_fast: bool = typer.Option(False, "--fail-fast", help="Start no new job after a failure (the rest are reported skipped)."),
    force: bool = typer.Option(False, "--force", help="Redo jobs whose outputs are up to date."),
    check: bool = typer.Option(False, "--check", help="Validate the config and list the jobs; run nothing."),
    report_dir: Path = typer.Option(Path("sdsurgeon-report"), "--report-dir", help="Where report.json, junit.xml and summary.md go."),
    json_: bool = typer.Option(False, "--json", help="Print report.json on stdout instead of progress and a summary."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Let jobs whose config sets trust_pickle: true "
                                      "unpickle a full model, which runs code from the file. The config is your own, "
                                      "like a Makefile, but unpickling code needs the command line's word: without "
                                      "this flag such a config is refused."),
    shard: Optional[str] = typer.Option(None, "--shard", metavar="I/N", help="Run only shard I of N (counted from "
                                        "1), one machine of a CI matrix: a job's shard is a hash of its name, so the N "
                                        "machines running the same config with I = 1..N share its jobs out, each job "
                                        "in exactly one shard, and a job keeps its shard when entries are added. A "
                                        "shard may get no job (exit 0, a report of zero jobs). The reports say which "
                                        "shard they are; `sdsurgeon batch-report` joins them. With --check: lists the "
                                        "shard's jobs."),
    quiet: bool = QUIET,
) -> None:
    """Inject, fold, export and verify many models in one run, as CI does; writes reports CI systems read.

    Each job: load -> inject -> (save the injected model) -> fold -> export ONNX -> verify with onnxruntime,
    writing <output_dir>/<name>.onnx (and <name>.sd.pt with save_injected). A failing job never stops the
    others; a job whose outputs are newer than its inputs and whose settings are unchanged is skipped. Exit 0
    when every job is ok or skipped, 1 when any failed. Paths in the config are relative to its folder.

    Config keys: defaults takes {option_keys}, input_shape or inputs, output_dir, trust_pickle (with
    --trust-pickle only), save_injected, timeout. Each entry of
    models takes name and checkpoint (a file or a glob: one job per match, named by file stem) or arch
    (package.module:factory, with arch_kwargs and weights), plus any of those options.

    Example: sdsurgeon batch examples/ci/sdsurgeon.yaml --jobs 2

    Example, a CI matrix of 4 machines: machine I (1 to 4) runs sdsurgeon batch models.yaml --shard I/4
    --report-dir reports-I and uploads its folder; one last job downloads them all and runs sdsurgeon
    batch-report reports-* -o reports (examples/ci/github-workflow.yml does this on GitHub Actions).
    """
    from .batch.config import check_jobs, load_config, parse_shard, plan_jobs, shard_jobs
    from .batch.runner import run_batch
    from .report import REPORT_FILES, to_json, write_reports

    if jobs < 1:
        raise ConfigError("--jobs must be 1 or more")
    part = parse_shard(shard) if shard is not None else None
    if report_dir.exists() and not report_dir.is_dir():
        raise ConfigError(f"--report-dir {report_dir} is a file; give a folder (it is created if missing)")
    cfg = load_config(config, allow_trust_pickle=trust_pickle)
    all_jobs = plan_jobs(cfg)
    job_list = shard_jobs(all_jobs, *part) if part else all_jobs
    check_jobs(job_list)  # this shard's inputs: the others' are their machines' business
    for name in REPORT_FILES:
        check_output(report_dir / name, config, *(j.checkpoint for j in job_list), option="--report-dir")
    lead = ""
    if part:
        lead = f"shard {part[0]}/{part[1]}: " + ("" if job_list else
                                                 f"no jobs (the config's {len(all_jobs)} all fall in other shards); ")
    if check:
        if json_:
            print(json.dumps({"config": str(config), "shard": list(part) if part else None,
                              "jobs": [{"name": j.name, "checkpoint": j.checkpoint, "arch": j.arch,
                                        "outputs": j.outputs} for j in job_list]}))
        elif part:
            out.print(f"{config}: valid, shard {part[0]}/{part[1]}: {len(job_list)} of {len(all_jobs)} jobs"
                      + (f": {', '.join(j.name for j in job_list)}" if job_list else
                         " (the other shards hold them all; this one would report zero jobs)"), markup=False)
        else:
            out.print(f"{config}: valid, {len(job_list)} jobs: {', '.join(j.name for j in job_list)}", markup=False)
        return
    display = _BatchDisplay([j.name for j in job_list], table=out.is_terminal and bool(job_list), enabled=not json_)
    with display, _progress(quiet, json_) as progress:  # the progress is gone before the table is printed
        result = run_batch(job_list, workers=jobs, fail_fast=fail_fast, force=force, on_event=display,
                           allow_trust_pickle=trust_pickle, progress=progress)
    written = write_reports(result.records, report_dir, shard=part)
    _report_outcome(result.records, report_dir, written, to_json(result.records, shard=part) if json_ else None, lead)


def _report_outcome(records, folder: Path, written, json_text: str | None, lead: str = "") -> None:
    """What batch and batch-report print once the reports are written (report.json itself with --json), and
    exit 1 with one error line when any job failed."""
    if json_text is not None:
        print(json_text)
    else:
        counts = {s: sum(r.status == s for r in records) for s in ("ok", "failed", "skipped")}
        out.print(f"{lead}{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped; "
                  f"reports in {folder}: {', '.join(written)}", markup=False)
    failed = [r.name for r in records if r.status == "failed"]
    if failed:
        err.print(f"error: {len(failed)} of {len(records)} jobs failed ({', '.join(failed)}); "
                  f"see {folder / 'summary.md'}", markup=False)
        raise typer.Exit(1)


# The options' keys as options.py declares them: a new option is listed with no edit here.
batch_cmd.__doc__ = batch_cmd.__doc__.replace("{option_keys}", ", ".join(
    key_of(cls, f.name) for cls in (SurgeryOptions, ConvertOptions) for f in fields(cls) if key_of(cls, f.name)))


@app.command("batch-report")
@user_errors
def batch_report_cmd(
    folders: list[Path] = typer.Argument(..., metavar="DIR", show_default=False,
                                         help="Report folders that `sdsurgeon batch --report-dir` wrote: every shard's "
                                         "of one --shard I/N run (or whole runs)."),
    output: Path = typer.Option(Path("sdsurgeon-report"), "--output", "-o",
                                help="Where the merged report.json, junit.xml and summary.md go (created if missing)."),
    json_: bool = typer.Option(False, "--json", help="Print the merged report.json on stdout instead of a summary."),
) -> None:
    """Join the reports of a batch's shards into one report: report.json, junit.xml and summary.md.

    Each folder's report.json is read and checked; the merged one lists every shard's jobs in shard order.
    Refused, with one line: a missing or damaged report.json, reports of different sdsurgeon versions,
    shards of different N, a shard given twice or missing, a job in two reports. Exit 1 when any merged
    job failed (as batch), 0 otherwise.

    Example, a CI matrix of 4 machines: machine I (1 to 4) runs sdsurgeon batch models.yaml --shard I/4
    --report-dir reports-I and uploads reports-I; the last job downloads the four folders and runs
    sdsurgeon batch-report reports-* -o reports (see examples/ci/github-workflow.yml).
    """
    from .report import REPORT_FILES, merge_reports, read_reports, to_json, write_reports

    if output.exists() and not output.is_dir():
        raise ConfigError(f"-o {output} is a file; give a folder (it is created if missing)")
    reports = read_reports(folders)
    merged = merge_reports(reports)
    for name in REPORT_FILES:  # never over a report it reads (-o one of the DIRs)
        check_output(output / name, *(folder / "report.json" for folder in folders), option="-o")
    written = write_reports(merged.records, output, merged=merged.merged, version=merged.version)
    json_text = to_json(merged.records, merged=merged.merged, version=merged.version) if json_ else None
    shards = f"{len(reports)} shards" if reports[0].shard else f"{len(reports)} reports"
    _report_outcome(merged.records, output, written, json_text, f"merged {shards}: ")


trust_app = typer.Typer(
    help="The architecture factories you trust: a weights-only file that records one of them (or a built-in "
    "one) rebuilds with it; any other is refused before anything is imported. inject and export add what "
    "--arch names once it has built a model; plan and batch configs add nothing.",
    no_args_is_help=True,
)
app.add_typer(trust_app, name="trust")


@trust_app.command("list")
@user_errors
def trust_list_cmd(json_out: bool = JSON) -> None:
    """List the trust store: each factory and the folder it is imported from; built-ins are always trusted."""
    from .io.trust import BUILTIN_FACTORIES, store_path, stored_factories

    stored = stored_factories()
    if json_out:
        out.print_json(json.dumps({"store": str(store_path()), "factories": stored,
                                   "builtin": sorted(BUILTIN_FACTORIES)}))
        return
    out.print(f"trust store: {store_path()}", markup=False)
    for spec, root in sorted(stored.items()):
        out.print(f"  {spec}  (from {root or 'the installed packages'})", markup=False)
    if not stored:
        out.print("  (empty: trust a factory by naming it with --arch to inject or export)")
    out.print(f"built in: {', '.join(sorted(BUILTIN_FACTORIES))}", markup=False)


@trust_app.command("forget")
@user_errors
def trust_forget_cmd(spec: str = typer.Argument(..., metavar="SPEC", help="package.module:factory, as listed.")) -> None:
    """Stop trusting SPEC: files that record it are refused again until --arch names it."""
    from .io.trust import forget, parse_factory, store_path

    parse_factory(spec)
    if not forget(spec):
        raise ConfigError(f"{spec} is not in the trust store {store_path()}; `sdsurgeon trust list` shows what is")
    out.print(f"forgot {spec}", markup=False)


def _reflow(doc: str) -> str:
    """Docstring paragraphs as single lines, so help wraps to the terminal instead of at source line ends."""
    return "\n\n".join(" ".join(p.split()) for p in inspect.cleandoc(doc).split("\n\n"))


for _info in app.registered_commands + trust_app.registered_commands:
    _info.help = _reflow(_info.callback.__doc__ or "")


def main() -> None:
    drop_current_folder()  # a console script's own folder, or what `python -m` added: never ahead of packages
    clean_up_on_signals()  # SIGTERM (a CI cancel) leaves no temp file behind
    app()
