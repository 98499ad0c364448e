"""The sdsurgeon command line: parse, call the library, render, exit code (0 ok, 1 user error, 2 usage)."""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import capture as capture_mod
from .capture import InputSpec, make_example_inputs
from .errors import SurgeonError
from .inject import inject as inject_model
from .layers import MODES, SCALINGS
from .load import check_output, default_output, load, parse_arch_kwargs, save
from .plan import Plan, plan as plan_model
from .schedule import RULES

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
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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

    return run


# Options shared by the commands that read a model.
MODEL_ARG = typer.Argument(
    None, metavar="MODEL", show_default=False,
    help="Checkpoint: a state_dict (.pt/.pth/.safetensors, with --arch), a pickled nn.Module "
    "(with --trust-pickle) or a file written by sdsurgeon. Optional with --arch (fresh weights).",
)
ARCH = typer.Option(None, "--arch", help="Architecture factory, package.module:factory (a class or function).")
ARCH_KWARGS = typer.Option(None, "--arch-kwargs", help="JSON object of keyword arguments for --arch.")
TRUST = typer.Option(False, "--trust-pickle", help="Allow unpickling a full model: this runs code from the file.")
PL = typer.Option(0.5, "--pL", help="Survival probability of the last block, in (0, 1].")
RULE = typer.Option("linear", "--rule", help=f"Schedule: {' | '.join(RULES)}. linear: p_l = 1 - l/L (1 - p_L).")
SET = typer.Option([], "--set", help="Override PATTERN=P for sites whose id matches the regex (re.search).")
INCLUDE = typer.Option([], "--include", help="Gate only sites whose id matches this regex (repeatable).")
EXCLUDE = typer.Option([], "--exclude", help="Leave sites whose id matches this regex without a gate.")
LEAF = typer.Option([], "--leaf", help="Module class (name or module.Class) that tracing must not enter.")
INPUT_SHAPE = typer.Option(None, "--input-shape", help="Shape of a single float32 input, e.g. 1,3,32,32.")
INPUT = typer.Option([], "--input", help="Named input NAME:SHAPE[:DTYPE], e.g. ids:1,16:int64 (repeatable).")
JSON = typer.Option(False, "--json", help="Print one JSON object on stdout instead of text.")


def _input_specs(input_shape: Optional[str], inputs: list[str]) -> list[InputSpec] | None:
    specs = [InputSpec(None, capture_mod.parse_shape(input_shape))] if input_shape else []
    specs += [InputSpec.parse(text) for text in inputs]
    return specs or None


def _load(model: Optional[Path], arch: Optional[str], arch_kwargs: Optional[str], trust: bool):
    return load(model, trust_pickle=trust, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs))


def _fmt_flops(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _render_plan(p: Plan, name: str) -> None:
    table = Table(title=f"residual sites of {name}", title_justify="left")
    for col, justify in (("#", "right"), ("site", "left"), ("p_l", "right"), ("params", "right"),
                         ("FLOPs", "right"), ("share", "right"), ("shortcut", "left")):
        table.add_column(col, justify=justify)
    for s in p.sites:
        share = "-" if s.flops_share is None else f"{100 * s.flops_share:.1f}%"
        table.add_row(str(s.index), s.id, f"{s.p:.4f}" if s.gated else "1 (no gate)", f"{s.params:,}",
                      _fmt_flops(s.flops), share, s.shortcut)
    if p.sites:
        out.print(table)
    out.print(f"sites: {p.num_sites} found, {p.num_gated} gated ({p.rule} rule, p_L = {p.p_L})")
    out.print(f"expected depth: {p.expected_depth:.2f} of {p.num_sites} blocks")
    if p.expected_train_flops_ratio is None:
        out.print("expected training FLOPs: give --input-shape (or --input) to count them")
    else:
        out.print(f"expected training FLOPs: {p.expected_train_flops_ratio:.3f} of the original "
                  f"({_fmt_flops(p.total_flops)} FLOPs per forward)")
    for module, reason in p.untraced:
        out.print(f"not traced: {module or '(root)'}: {reason}", markup=False)


@app.command("plan")
@user_errors
def plan_cmd(
    model: Optional[Path] = MODEL_ARG,
    pL: float = PL,
    rule: str = RULE,
    set_: list[str] = SET,
    include: list[str] = INCLUDE,
    exclude: list[str] = EXCLUDE,
    arch: Optional[str] = ARCH,
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    trust_pickle: bool = TRUST,
    leaf: list[str] = LEAF,
    input_shape: Optional[str] = INPUT_SHAPE,
    input_: list[str] = INPUT,
    json_: bool = JSON,
) -> None:
    """Show the residual sites found and the survival probability each would get.

    Example: sdsurgeon plan model.pt --arch mymodels:resnet110 --pL 0.5 --input-shape 1,3,32,32
    """
    specs = _input_specs(input_shape, input_)
    m = _load(model, arch, arch_kwargs, trust_pickle)
    p = plan_model(
        m, pL, rule=rule, overrides=set_, include=include, exclude=exclude, leaves=leaf,
        example_inputs=None if specs is None else make_example_inputs(specs),
    )
    name = str(model) if model else str(arch)
    if json_:
        print(json.dumps({"model": name, **p.to_dict()}))
    else:
        _render_plan(p, name)


@app.command("inject")
@user_errors
def inject_cmd(
    model: Optional[Path] = MODEL_ARG,
    pL: float = PL,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where to write (default: <stem>.sd.pt beside MODEL)."),
    rule: str = RULE,
    mode: str = typer.Option("batch", "--mode", help=f"{' | '.join(MODES)}: one draw per step (skips compute) or per sample."),
    scaling: str = typer.Option("paper", "--scaling", help=f"{' | '.join(SCALINGS)}: scale by p at inference, or by 1/p in training."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed the gates' draws for reproducible runs."),
    set_: list[str] = SET,
    include: list[str] = INCLUDE,
    exclude: list[str] = EXCLUDE,
    arch: Optional[str] = ARCH,
    arch_kwargs: Optional[str] = ARCH_KWARGS,
    trust_pickle: bool = TRUST,
    leaf: list[str] = LEAF,
    input_shape: Optional[str] = INPUT_SHAPE,
    input_: list[str] = INPUT,
    json_: bool = JSON,
) -> None:
    """Gate every residual block with stochastic depth and write a model to train.

    The output keeps the input's state_dict keys. Load it with sdsurgeon.load(path) and train as usual:
    model.train() draws gates, model.eval() scales each branch by its p_l.

    Example: sdsurgeon inject model.pt --arch mymodels:resnet110 --pL 0.5 -o model.sd.pt
    """
    started = time.perf_counter()
    specs = _input_specs(input_shape, input_)
    target = output or default_output(model, arch=arch)
    check_output(target, model)
    m = _load(model, arch, arch_kwargs, trust_pickle)
    injected = inject_model(
        m, pL, rule=rule, mode=mode, scaling=scaling, seed=seed, overrides=set_, include=include,
        exclude=exclude, leaves=leaf, inputs=specs,
        example_inputs=None if specs is None else make_example_inputs(specs),
    )
    save(injected, target)
    recipe = injected.sdsurgeon_recipe
    record = {
        "model": str(model) if model else str(arch),
        "output": str(target),
        "num_gated": len(recipe.sites),
        "expected_depth": round(sum(p for _, p in recipe.sites), 4),
        "rule": rule, "p_L": pL, "mode": mode, "scaling": scaling, "seed": seed,
        "weights_only": injected.sdsurgeon_source.kind == "arch",
        "sites": [{"id": s, "p": round(p, 4)} for s, p in recipe.sites],
        "seconds": round(time.perf_counter() - started, 3),
    }
    if json_:
        print(json.dumps(record))
        return
    out.print(f"gated {record['num_gated']} residual blocks ({rule} rule, p_L = {pL}, {mode} mode, {scaling} scaling)")
    out.print(f"expected gated blocks active per step: {record['expected_depth']:.2f} of {record['num_gated']}")
    trust = "" if record["weights_only"] else " (holds a pickled model: load it with --trust-pickle)"
    out.print(f"wrote {target}{trust}", markup=False)


def main() -> None:
    app()
