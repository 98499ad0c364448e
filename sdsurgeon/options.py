"""The typed options of plan, inject and export (CLI, batch, library): each one's name, default, range and help, once."""

from __future__ import annotations

import contextvars
import functools
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .choices import CAPTURES, DROP_RULES, EXIT_CURRICULA, EXIT_SCALES, FORMATS, MODES, RULE_NAMES, SCALING_CHOICES
from .errors import ConfigError, SurgeonError, option_error


def option(default: Any, help: str, *, flag: str | None = None, key: str | None = None, python: str | None = None,
           choices: tuple = (), check: Callable[[Any], str | None] | None = None, negated: bool = False,
           count: bool = False) -> Any:
    """A dataclass field with what every front end needs to spell, explain and check it.

    ``flag``: the command line's spelling (default ``--name`` with dashes; "" for an option it does not take);
    ``key``: a batch config's (default: the field name; "" for none); ``python``: the keyword the public functions
    take it as (default: the field name; "" for none). ``negated``: the flag and key say the opposite
    of the field (``--static-batch`` sets ``dynamic_batch`` false). ``choices``: the values it may take; ``check``:
    why a value is refused (a phrase, or None). ``count``: a string that a batch config may give as an integer.
    """
    meta = {"help": help, "flag": flag, "key": key, "python": python, "choices": choices, "check": check,
            "negated": negated, "count": count}
    if isinstance(default, (list, tuple)):
        return field(default=tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls``."""
    spelled = fields_of(cls)[name].metadata.get("flag")
    return ("--" + name.replace("_", "-")) if spelled is None else spelled


def key_of(cls: type, name: str) -> str:
    """The batch config key of field ``name`` of ``cls`` ("" when a config does not take it)."""
    spelled = fields_of(cls)[name].metadata.get("key")
    return name if spelled is None else spelled


def python_of(cls: type, name: str) -> str:
    """The keyword a Python caller gives field ``name`` of ``cls`` as ("" when no public function takes it)."""
    spelled = fields_of(cls)[name].metadata.get("python")
    return name if spelled is None else spelled


def help_of(cls: type, name: str) -> str:
    return fields_of(cls)[name].metadata["help"]


def fields_of(cls: type) -> dict[str, Any]:
    return {f.name: f for f in fields(cls)}


@functools.lru_cache(maxsize=None)  # read on every construction: the strings are evaluated once per class
def types_of(cls: type) -> dict[str, Any]:
    """Field name -> its type, resolved (the annotations are strings here)."""
    return typing.get_type_hints(cls)


def field_error(cls: type, name: str, what: str) -> ConfigError:
    """``{flag} {what}``, the command line's wording, with the field kept so that other fronts word it their way."""
    return option_error(flag_of(cls, name), what, field=name)


# --- types: one reading of a field's type, for checking a value made anywhere and reading a YAML one ------------

_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string", dict: "a mapping",
          Path: "a path (a string)"}


def without_none(tp: Any) -> tuple[Any, bool]:
    """``tp`` without ``None``, and whether None is allowed."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def words_for(tp: Any, *, count: bool = False) -> str:
    """How a message names what a value of type ``tp`` must be."""
    tp, _ = without_none(tp)
    if count:
        return "a count or a share such as '25%'"
    if typing.get_origin(tp) is tuple:
        return f"a list of {_WORDS[typing.get_args(tp)[0]].split(' ', 1)[1]}s"
    return _WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _is(value: Any, tp: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is Path:
        return isinstance(value, (str, Path))
    return isinstance(value, tp)


def read_value(tp: Any, value: Any, *, count: bool = False) -> Any:
    """A value as written in a config file (YAML: lists, ints for floats) -> the field's type; ValueError with
    what was expected otherwise."""
    base, nullable = without_none(tp)
    if value is None and nullable:
        return None
    if count and (isinstance(value, str) or _is(value, int)):
        return str(value)
    if typing.get_origin(base) is tuple:
        item = typing.get_args(base)[0]
        if isinstance(value, list) and (value or item is not int) and all(_is(v, item) for v in value):
            return tuple(value)
    elif _is(value, base):
        return float(value) if base is float else Path(value) if base is Path else value
    raise ValueError(words_for(tp, count=count))


@functools.lru_cache(maxsize=None)  # every construction reads them: a batch of 2000 jobs makes 4000 options
def _field_types(cls: type) -> tuple:
    """Per field of ``cls``: the field, its type without None, whether None is allowed, and whether it is a tuple."""
    hints = types_of(cls)
    return tuple((f, *without_none(hints[f.name]), typing.get_origin(without_none(hints[f.name])[0]) is tuple)
                 for f in fields(cls))


def _checked(obj: Any) -> None:
    """Each field of ``obj`` of its type (sequences made tuples), within its choices and range: a ConfigError names
    the field otherwise."""
    cls = type(obj)
    for f, base, nullable, is_tuple in _field_types(cls):
        value, meta = getattr(obj, f.name), f.metadata
        if value is None and nullable:
            continue
        if is_tuple:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise field_error(cls, f.name, f"expected {words_for(base)}, got {value!r}")
            object.__setattr__(obj, f.name, tuple(value))  # frozen, but a list given is ours to make a tuple
        elif base is not Any and not _is(value, base):
            raise field_error(cls, f.name, f"expected {words_for(base)}, got {value!r}")
        elif base is float:
            object.__setattr__(obj, f.name, float(value))  # 1 and 1.0 are one setting: records and hashes agree
        if meta.get("choices") and value not in meta["choices"]:
            flag, listed = flag_of(cls, f.name), ", ".join(meta["choices"])
            raise ConfigError(f"unknown {flag} {value!r}; use one of: {listed}",
                              what=f"{value!r} is not one of {listed}", option=flag, field=f.name)
        problem = meta["check"](value) if meta.get("check") else None
        if problem:
            raise field_error(cls, f.name, problem)


def _probability(p: float) -> str | None:
    return None if 0 < p <= 1 else f"{p} is outside (0, 1]; 1 keeps a block always on"  # NaN too


def _positive(value: float) -> str | None:
    return None if math.isfinite(value) and value > 0 else f"must be a finite number above zero (got {value!r})"


def _at_least_one(value: int) -> str | None:
    return None if value >= 1 else f"must be 1 or more (got {value!r})"


def _not_negative(value: int) -> str | None:
    return None if value >= 0 else f"must be 0 or more (got {value!r})"


def _layer_indices(values: tuple) -> str | None:
    bad = [v for v in values if v < 0]
    return f"layers are counted from 0 (got {bad[0]})" if bad else None


def _tolerance(value: float) -> str | None:
    # NaN compares false with everything: `value < 0` would let it through to onnxruntime.
    return None if math.isfinite(value) and value >= 0 else f"must be a finite number, zero or more (got {value!r})"


def read_count(text: Any, total: int | None = None, counted: str = "gated blocks") -> tuple[str, float]:
    """``("count", n)`` or ``("share", percent)`` of a drop option's value: a whole count >= 0 (at most ``total``,
    when known) or a share from 0% to 100%; ValueError with what was expected otherwise."""
    text = str(text).strip()
    most = "" if total is None else f" to {total} (the model's {counted})"
    problem = f"{text!r}: expected a count from 0{most} or a share from 0% to 100%, e.g. 13 or 25%"
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0.0 <= share <= 100.0:  # NaN too
                raise ValueError
            return "share", share
        count = int(text)
    except ValueError:
        raise ValueError(problem) from None
    if count < 0 or (total is not None and count > total):
        raise ValueError(problem)
    return "count", count


def _count(value: str) -> str | None:
    try:
        read_count(value)
    except ValueError as exc:
        return str(exc)
    return None


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is not a regular expression, or None."""
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"{pattern!r} is not a valid regular expression: {exc}"
    return None


def gives(drop: Any) -> bool:
    """Whether a drop count was given: None, "" and 0 remove nothing, so they name no choice."""
    return drop is not None and str(drop).strip() not in ("0", "")


def pruning_conflict(drop: Any, sites: str | None, layers: Any) -> tuple[str, str] | None:
    """(field, why) when more than one way of choosing what to remove is given, else None: the one rule the options
    and ``surgery.prune`` both keep."""
    if layers is not None and (sites is not None or gives(drop)):
        other = "drop_sites" if sites is not None else "drop"
        return "drop_layers", f"counts whole layers and {flag_of(ConvertOptions, other)} chooses blocks: give one of them"
    if sites is not None and gives(drop):
        return "drop_sites", f"names the blocks itself: give it or {flag_of(ConvertOptions, 'drop')}, not both"
    return None


def flags_to_keys(*classes: type) -> dict[str, str]:
    """Each command-line flag of ``classes``' fields -> its batch config key (fields without either are left out)."""
    spelled = {}
    for cls in classes:
        for f in fields(cls):
            flag, key = flag_of(cls, f.name), key_of(cls, f.name)
            if key and flag.startswith("--") and "/" not in flag:
                spelled[flag] = key
    return spelled


# What follows a flag as its value in a message ("--drop N", "--arch package.module:factory", "--pL 2.0", "'x'"):
# a spelling "name=" takes it without the space between.
_VALUE = r"""['"\d]|[A-Z]|[^\s,;)]*[.:|%]"""


def in_keys(text: str, spelled: dict[str, str]) -> str:
    """``text`` with each flag of ``spelled`` written as its config key, for a message a config reader shows
    (``--drop-sites`` -> ``drop_sites``), or as a Python keyword (``--drop-sites REGEX`` -> ``sites=REGEX``: a
    spelling that ends in "=" takes the value after it); other flags stay. Text already spelled so is left as is."""
    if not spelled:
        return text
    flags = sorted(spelled, key=len, reverse=True)  # --drop-sites before --drop
    # a flag with a choice ("--capture fx") is not one in "--capture fx|export"
    found = "|".join(re.escape(f) + (r"(?![\w|-])" if " " in f else r"(?![\w-])") for f in flags)

    def spell(m: re.Match) -> str:
        said = spelled[m.group(1)]
        return said + ("" if said.endswith("=") else m.group(2) or "")

    return re.sub(f"({found})( (?={_VALUE}))?", spell, text)


def in_terms(exc: SurgeonError, name: str | None, spelled: dict[str, str]) -> str:
    """The message of ``exc`` as a front end says it: ``{name}: {what}`` where it reads ``{option} {what}`` (its
    option is ``name`` there), and each flag of ``spelled`` in the text spelled its way (``in_keys``)."""
    said = f"{name}: {exc.what}" if name and exc.what and str(exc) == f"{exc.option} {exc.what}" else str(exc)
    return in_keys(said, spelled)


# --- the options ----------------------------------------------------------------------------------------------

DROP_BY_HELP = ("Which blocks go first: schedule (lowest p_l first, the deepest first among equals) or influence (the "
                "lowest block influence on the calibration inputs first: 1 - cos(skip, block output), ShortGPT's "
                "measure). With --drop-layers, per layer: the mean p_l of its blocks, their summed influence, or "
                "angular (the angular distance arccos(cos)/pi between the layer's input and output hidden states, "
                "averaged over tokens: Gromov et al.).")
CALIBRATION_HELP = ("Inputs to measure pruning on: a file saved with torch.save holding a tensor (one positional "
                    "input), a tuple of tensors, or a dict of tensors named as the forward's arguments (read "
                    "weights-only). Default: 16 random samples of the input shape.")


@dataclass(frozen=True)
class SurgeryOptions:
    """How sites are chosen and gated: the options plan and inject share (inject's own ones are ignored by plan)."""

    pL: float = option(0.5, "Survival probability of the last block, in (0, 1].", python="p_L", check=_probability)
    rule: str = option("linear", f"Schedule: {' | '.join(RULE_NAMES)}. linear: p_l = 1 - l/L (1 - p_L). "
                       "exponential (LayerSkip's): p_l = 1 - (1 - p_L)(2^(l/(L-1)) - 1), l = 0..L-1.",
                       choices=RULE_NAMES)
    overrides: tuple[str, ...] = option((), "Override PATTERN=P for sites whose id matches the regex (re.search).",
                                        flag="--set", key="set")
    include: tuple[str, ...] = option((), "Gate only sites whose id matches this regex (repeatable).")
    exclude: tuple[str, ...] = option((), "Leave sites whose id matches this regex without a gate.")
    leaves: tuple[str, ...] = option((), "Module class (name or module.Class) that tracing must not enter.",
                                     flag="--leaf", key="leaf")
    capture: str = option("auto", "How to read the model's graph: fx (torch.fx, Python level), export (torch.export "
                          "on the example inputs, ATen level: transformers models), or auto (fx if it traces the whole "
                          "model, else export).", choices=CAPTURES)
    keep_existing: bool = option(False, "Leave drop-path modules the model already has (timm, transformers) dropping "
                                 "at their own rates; by default they are switched off and the gates, at the "
                                 "schedule's rates, replace them.")
    mode: str = option("batch", f"{' | '.join(MODES)}: one draw per step (skips compute) or per sample.",
                       choices=MODES)
    scaling: str = option("auto", f"{' | '.join(SCALING_CHOICES)}: paper scales each branch by p at inference "
                          "(export folds p into the weights); inverted by 1/p in training, so the trained weights are "
                          "the inference model. auto: inverted for a model with its own save_pretrained "
                          "(transformers: what Trainer.save_model writes then loads right in plain transformers), "
                          "paper otherwise.", choices=SCALING_CHOICES)  # the recipe records what auto became
    seed: int | None = option(None, "Seed the gates' draws for reproducible runs.")
    sync_ranks: bool = option(True, "Under torch.distributed, let each rank draw its own gates (default: all ranks "
                              "skip the same blocks, so none straggles).", flag="--per-rank-draws", key="",
                              negated=True)
    # p_L over training steps, recorded in the recipe (analysis.schedule.ScheduleSpec as a dict); the command line
    # builds it from --schedule, --theta, --gamma, --warmup and --ramp
    schedule: dict | None = option(None, "How p_L moves over training steps.", flag="", key="")
    # LayerSkip's early-exit loss (surgery.early_exit): recorded in the recipe, so sdsurgeon.load restores it
    early_exit: bool = option(False, "Transformers causal LMs: in training, a forward with labels= returns the task "
                              "loss and the early-exit losses (the model's own final norm and LM head on chosen "
                              "layers' outputs), weighted as LayerSkip (--exit-scale-type, --exit-scale) under a "
                              "curriculum (--exit-curriculum); in eval the model is the plain model.")
    exit_layers: tuple[int, ...] = option((), "With --early-exit: a layer (0-based) whose output gets an exit loss "
                                          "(repeatable; default: every layer but the last, whose loss is the task "
                                          "loss).", flag="--exit-layer", check=_layer_indices)
    exit_scale: float = option(1.0, "With --early-exit: e_scale, the factor of every exit's weight before the "
                               "weights are normalised to sum to 1 with the last layer's (torchtune).",
                               check=_positive)
    exit_scale_type: str = option("sum_l", f"With --early-exit: {' | '.join(EXIT_SCALES)}: an exit at layer l weighs "
                                  "1, l+1, the running sum of l+1 over the layers in order, 1/(l+1), sqrt(l+1) or "
                                  "1/sqrt(l+1), times --exit-scale (torchtune's early_exit_loss).",
                                  choices=EXIT_SCALES)
    exit_curriculum: str = option("none", f"With --early-exit: {' | '.join(EXIT_CURRICULA)}: every exit at every "
                                  "step; rotational: at step t the exits l with l % R == t % R (--exit-rotation R); "
                                  "gradual: exits switched on from the last layer towards the first, all on after "
                                  "--exit-ramp steps. The step is the optimizer step sdsurgeon.schedules.schedule "
                                  "or callbacks.schedule_callback() counts.", choices=EXIT_CURRICULA)
    exit_rotation: int = option(2, "With --exit-curriculum rotational: R.", check=_at_least_one)
    exit_ramp: int = option(0, "With --exit-curriculum gradual: the step from which every exit is on (layer l of L "
                            "switches on at step ramp (L - l) / L).", check=_not_negative)

    def __post_init__(self) -> None:
        _checked(self)
        if not self.early_exit:
            given = [f.name for f in fields(self) if f.name.startswith("exit_") and getattr(self, f.name) != f.default]
            if given:
                raise field_error(SurgeryOptions, given[0], "applies to the early-exit loss: give --early-exit too")
        if self.exit_curriculum == "gradual" and self.exit_ramp == 0:
            raise field_error(SurgeryOptions, "exit_ramp", "must be a step count from 1 with --exit-curriculum "
                              "gradual (the step from which every exit is on)")


@dataclass(frozen=True)
class ConvertOptions:
    """How the gated model becomes a verified ONNX file (or its plain architecture's weights)."""

    fold: bool = option(True, "Fold each p_l into its branch's weights, or keep an explicit constant multiply per "
                        "gate (same numbers; for comparison).", flag="--fold/--no-fold", python="into_weights")
    opset: int | None = option(None, "ONNX opset (default: the exporter's).")
    dynamic_batch: bool = option(True, "Fix the batch axis to the example's size (default: dynamic).",
                                 flag="--static-batch", key="static_batch", negated=True)
    rtol: float = option(1e-4, "Relative tolerance of the onnxruntime check (widened to the dtype's precision for a "
                         "bf16/fp16 model, and said).", check=_tolerance)
    atol: float = option(1e-5, "Absolute tolerance of the onnxruntime check (widened likewise).", check=_tolerance)
    compare: bool = option(False, "Also export the architecture without gates and report its node count.", key="",
                           python="")
    verbose: bool = option(False, "Show the ONNX exporter's own log and warnings.", key="")
    drop: str | None = option(None, "Prune: remove this many gated blocks (a count, or a share such as 25%) before "
                              "folding the rest; a removed block keeps its skip (and a projection shortcut its "
                              "projection). See --drop-by; `plan --prune-curve` shows what each count costs.",
                              count=True, check=_count)
    drop_by: str = option("schedule", DROP_BY_HELP, python="by", choices=DROP_RULES)  # see surgery.prune
    drop_sites: str | None = option(None, "Prune the blocks whose site id matches this regex (re.search) instead of "
                                    "a count; `plan` lists the ids.", python="sites", check=regex_problem)
    calibration: Path | None = option(None, CALIBRATION_HELP, key="")  # default: random inputs
    format: str = option("onnx", "What to write: onnx (a graph, verified with onnxruntime), safetensors (the original "
                         "architecture's state_dict with p_l in the weights: load it with safetensors.torch.load_model "
                         "into the plain model) or hf (a save_pretrained folder that plain transformers' "
                         "from_pretrained loads). safetensors and hf need every gate folded into weights; they are "
                         "checked by loading them back into a fresh model. hf takes pruning that removes whole layers "
                         "(--drop-layers, or sites that make up whole layers): they are deleted, with "
                         "num_hidden_layers and the per-layer config lists.", python="", choices=FORMATS)
    drop_layers: str | None = option(None, "Prune whole layers instead: remove this many (a count, or a share such "
                                     "as 25%) of the model's layer list (the nn.ModuleList whose every element holds "
                                     "gated blocks), every block of each, ranked per layer by --drop-by. With --format "
                                     "hf the layers are deleted from the folder and its config.", count=True,
                                     python="layers", check=_count)

    def __post_init__(self) -> None:
        # Checked when made, so export's options and a batch config's keys (both built into this) are refused
        # before any work.
        _checked(self)
        conflict = pruning_conflict(self.drop, self.drop_sites, self.drop_layers)
        if conflict:
            raise field_error(ConvertOptions, *conflict)
        if self.format != "onnx" and not self.fold:
            raise field_error(ConvertOptions, "format", f"{self.format} writes the original architecture with scaled "
                              "weights; without the fold each gate keeps a multiply, which that architecture does not "
                              f"compute: use {flag_of(ConvertOptions, 'format')} onnx")
        if self.format == "safetensors" and self.prunes:
            # hf prunes: whole layers go from the folder and its config (pipeline); a state_dict has no config
            raise field_error(ConvertOptions, "format", "safetensors writes the original architecture with scaled "
                              f"weights, which a pruned model is not: use {flag_of(ConvertOptions, 'format')} onnx, or hf to "
                              f"delete whole layers ({flag_of(ConvertOptions, 'drop_layers')})")
        if self.calibration is not None and not self.prunes:
            raise field_error(ConvertOptions, "calibration", "measures a pruned model: give it with --drop N, "
                              "--drop-layers N or --drop-sites REGEX")

    @property
    def prunes(self) -> bool:
        return self.drop is not None or self.drop_sites is not None or self.drop_layers is not None


@dataclass(frozen=True)
class CurveOptions:
    """``plan --prune-curve``: fidelity against blocks removed, in ``drop_by``'s order, measured on ``calibration``."""

    drop_by: str = option("schedule", DROP_BY_HELP, python="by", choices=DROP_RULES)
    calibration: Path | None = option(None, CALIBRATION_HELP)

    def __post_init__(self) -> None:
        _checked(self)


# --- the Python front end: an error raised in a public function names that function's keywords ----------------

# The command line's model and input options, as the public functions' keywords (several: the first one that the
# function called takes). Python takes example inputs as tensors or InputSpecs where the command line reads text.
MODEL_KEYWORDS: dict[str, tuple[str, ...]] = {
    "--arch": ("arch=", "spec="),  # trust(spec)
    "--arch-kwargs": ("arch_kwargs=",), "--trust-pickle": ("trust_pickle=True",),
    "--weights": ("path=",),  # load_weights(model, path)
    "--input": ("inputs=", "input_specs=", "example_inputs="),
    "--input-shape": ("example_inputs=", "input_specs=", "inputs="),
}


def flags_to_python(*classes: type) -> dict[str, tuple[str, ...]]:
    """Each command-line flag of ``classes``' fields -> how a Python call says it: ``name=`` before a value,
    ``name=True``/``name=False`` for a switch (``--static-batch`` -> ``dynamic_batch=False``), ``name='value'`` for a
    flag and one of its choices (``--capture export``). Fields without a keyword or a flag are left out."""
    spelled: dict[str, tuple[str, ...]] = {}
    for cls in classes:
        hints = types_of(cls)
        for f in fields(cls):
            name, flag = python_of(cls, f.name), flag_of(cls, f.name)
            if not (name and flag.startswith("--")):
                continue
            if hints[f.name] is bool:
                on, *off = flag.split("/")  # --fold/--no-fold: the second says the opposite
                said = not f.metadata.get("negated")
                spelled[on] = (f"{name}={said}",)
                spelled.update({other: (f"{name}={not said}",) for other in off})
                continue
            spelled[flag] = (f"{name}=",)
            spelled.update({f"{flag} {choice}": (f"{name}={choice!r}",) for choice in f.metadata.get("choices", ())})
    return spelled


@functools.lru_cache(maxsize=None)
def python_table() -> dict[str, tuple[str, ...]]:
    """Every flag a library message may name that a public function takes as a keyword -> its spellings."""
    return {**flags_to_python(SurgeryOptions, ConvertOptions, CurveOptions), **MODEL_KEYWORDS}


def python_spelling(keywords: frozenset[str]) -> dict[str, str]:
    """``python_table`` for a function taking ``keywords``: per flag, the first spelling it takes, else the first."""
    return {flag: next((s for s in said if s.split("=")[0] in keywords), said[0])
            for flag, said in python_table().items()}


_IN_PUBLIC_CALL = contextvars.ContextVar("sdsurgeon_in_public_call", default=False)


def in_python(fn: Callable) -> Callable:
    """``fn`` as ``sdsurgeon.<name>`` hands it to a Python caller: a SurgeonError raised inside names ``fn``'s
    keywords where its message names command-line flags (``--pL`` -> ``p_L``, ``--arch X`` -> ``arch=X``), its
    ``option`` the keyword; the same exception, with its type, other fields and traceback. Only the outermost public
    call re-spells. The command line and batch call the functions themselves, and keep their own words."""
    keywords = frozenset(inspect.signature(fn).parameters)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        if _IN_PUBLIC_CALL.get():
            return fn(*args, **kwargs)
        token = _IN_PUBLIC_CALL.set(True)
        try:
            return fn(*args, **kwargs)
        except SurgeonError as exc:
            spelled = python_spelling(keywords)
            said = spelled.get(exc.option or "")
            name = said.split("=")[0] if said else None
            exc.args = (in_terms(exc, name, spelled), *exc.args[1:])
            exc.option = name or exc.option
            raise
        finally:
            _IN_PUBLIC_CALL.reset(token)

    return call


__all__ = ["MODEL_KEYWORDS", "ConvertOptions", "CurveOptions", "SurgeryOptions", "field_error", "flag_of",
           "flags_to_keys", "flags_to_python", "gives", "help_of", "in_keys", "in_python", "in_terms", "key_of",
           "option", "pruning_conflict", "python_of", "python_spelling", "python_table", "read_count", "read_value",
           "regex_problem", "types_of", "without_none", "words_for"]
