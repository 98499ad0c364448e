"""A batch YAML config -> typed jobs, every error with its file and line."""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, make_dataclass, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from .._version import __version__
from ..capture.inputs import InputSpec, parse_specs
from ..deploy.export import DATA_SUFFIX
from ..deploy.plain import SUFFIXES
from ..errors import ConfigError, SurgeonError, option_error
from ..io.files import InputSet, companion_of, output_problem
from ..io.trust import load_yaml
from ..options import ConvertOptions, SurgeryOptions, flag_of, flags_to_keys, in_keys, key_of, option, read_value, types_of


@dataclass(frozen=True)
class _JobSettings:
    """The options of a batch job alone: where its inputs and outputs are, and how long it may run."""

    input_shape: tuple[int, ...] | None = option(None, "Shape of a single float32 input, e.g. [1, 3, 32, 32].",
                                                 flag="--input-shape")
    inputs: tuple[str, ...] | None = option(None, "Named inputs NAME:SHAPE[:DTYPE], as for --input.", flag="--input")
    output_dir: str = option("out", "Where the job's outputs go, relative to the config's folder.", flag="")
    trust_pickle: bool = option(False, "Unpickle a full model (with the command line's --trust-pickle only).",
                                flag="")  # not --trust-pickle: that flag lets a config ask for this at all
    save_injected: bool = option(False, "Also write the injected model, <name>.sd.pt.", flag="")
    timeout: float | None = option(None, "Seconds; a job running longer is killed and reported failed.", flag="")


def _job_fields() -> list[tuple[str, Any, Any]]:
    """JobOptions' fields: each option of SurgeryOptions and ConvertOptions a config takes, under its key and with
    its type, default and help (options.py, said once), then the batch job's own."""
    made = []
    for cls in (SurgeryOptions, ConvertOptions, _JobSettings):
        hints = types_of(cls)
        for f in fields(cls):
            key = key_of(cls, f.name)
            if key:
                default = (not f.default) if f.metadata.get("negated") else f.default
                made.append((key, hints[f.name], field(default=default,
                                                       metadata={**f.metadata, "source": (cls, f.name)})))
    return made


def _made_of(cls: type) -> Callable[[Any], Any]:
    """A JobOptions' ``cls`` (SurgeryOptions or ConvertOptions), made by keyword from its keys."""

    def make(self) -> Any:
        values = {}
        for f in fields(self):
            source, name = f.metadata["source"]
            if source is cls:
                value = getattr(self, f.name)
                values[name] = (not value) if f.metadata.get("negated") else value
        return cls(**values)

    make.__doc__ = f"This job's {cls.__name__}: a ConfigError whose field names what is wrong otherwise."
    return make


def _specs(self) -> list[InputSpec] | None:
    """This job's example inputs, read as the command line reads --input-shape and --input."""
    return parse_specs(self.input_shape, self.inputs, shape_option="input_shape")


JobOptions = make_dataclass(
    "JobOptions", _job_fields(), frozen=True,
    namespace={"__doc__": "Every inject/export option a job takes, by its config key; ``defaults:`` sets them, a "
                          "model entry overrides them.",
               "surgery": _made_of(SurgeryOptions), "convert": _made_of(ConvertOptions), "specs": _specs,
               "__module__": __name__},  # workers get jobs pickled: the class must be found here by name
)


def config_key(exc: SurgeonError) -> str | None:
    """The config key an error is about, found once a job runs (a count of blocks the model does not have): that of
    the options field it names, or of the option whose command-line flag it names; None if neither."""
    for f in fields(JobOptions):
        source, name = f.metadata["source"]
        if (exc.field is not None and exc.field == name) or (exc.option and exc.option == flag_of(source, name)):
            return f.name
    return None


_TOP_KEYS = ("defaults", "models")


@dataclass(frozen=True)
class ModelEntry:
    name: str | None
    checkpoint: str | None
    arch: str | None
    arch_kwargs: dict
    weights: str | None
    overrides: dict[str, Any]
    line: int


@dataclass(frozen=True)
class Job:
    """One model to convert, with its effective options and absolute paths."""

    name: str
    checkpoint: str | None  # the file load() reads: a checkpoint, or the weights for an arch
    arch: str | None
    arch_kwargs: dict
    options: JobOptions
    output_path: str  # the ONNX file, safetensors file or save_pretrained folder (options.format)
    sd_path: str | None  # the injected model, when save_injected
    stamp_path: str  # settings hash + outputs, for incremental runs
    import_paths: tuple[str, ...] = ()  # folders the arch may be imported from (the config's)
    where: str = ""  # config file:line of the entry, for messages
    weights: str | None = None  # trained weights loaded into the checkpoint's model (as MODEL --weights W)

    @property
    def inputs(self) -> list[str]:
        return [p for p in (self.checkpoint, self.weights) if p]

    @property
    def outputs(self) -> list[str]:
        return [p for p in (self.output_path, self.sd_path) if p]

    @property
    def data_path(self) -> str | None:
        """Where an ONNX output's weights go past 2 GB (external data), written only then; None for other formats."""
        return str(companion_of(self.output_path, DATA_SUFFIX)) if self.options.format == "onnx" else None

    def settings_hash(self) -> str:
        """Everything that shapes the outputs, so a changed setting re-runs the job."""
        base = self.import_paths[0] if self.import_paths else ""

        def rel(path: str | None) -> str | None:  # relative: moving the project does not redo every job
            return None if path is None else os.path.relpath(path, base or None)

        payload = {"version": __version__, "checkpoint": rel(self.checkpoint), "weights": rel(self.weights),
                   "arch": self.arch,
                   "arch_kwargs": self.arch_kwargs, "options": asdict(self.options),
                   "outputs": [rel(p) for p in self.outputs]}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class BatchConfig:
    path: Path
    defaults: JobOptions
    models: tuple[ModelEntry, ...]


class _Located:
    """Line numbers of a YAML document's keys and list items, by path."""

    def __init__(self, root) -> None:
        self.root = root

    def line(self, *path) -> int:
        node, line = self.root, 1
        for step in path:
            if isinstance(node, yaml.MappingNode):
                found = next(((k, v) for k, v in node.value if k.value == step), None)
                if found is None:
                    break
                line, node = found[0].start_mark.line + 1, found[1]
            elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
                node = node.value[step]
                line = node.start_mark.line + 1
            else:
                break
        return line


def _read(tp: Any, value: Any, *, count: bool = False) -> Any:
    """A YAML value read as the type ``tp`` of the option or entry field ``key``; the message says what it must be."""
    try:
        return read_value(tp, value, count=count)
    except ValueError as exc:
        raise _Expected(f"expected {exc}, got {value!r}") from None


class _Expected(Exception):
    """A value of the wrong type, said as "expected ..."; load_config adds file, line and key."""


def load_config(path: str | os.PathLike, *, allow_trust_pickle: bool = False) -> BatchConfig:
    """Read and validate a batch config; every mistake is a ConfigError naming file, line, key and the valid keys.

    A config is the user's own, like a Makefile, but it never grants itself ``trust_pickle``: a ``true``
    there is refused unless ``allow_trust_pickle`` (the command line's ``--trust-pickle``) says so.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    data, root = load_yaml(text, str(path))  # aliases bounded before anything is built; ConfigError with file:line
    located = _Located(root)

    def fail(where: tuple, message: str):
        raise ConfigError(f"{path}:{located.line(*where)}: {message}")

    def check_trust(opts: dict, where: tuple) -> None:
        if opts.get("trust_pickle") and not allow_trust_pickle:  # a file never vouches for itself
            fail(where + ("trust_pickle",), "trust_pickle: true would unpickle code from the checkpoint, which a "
                                            "config cannot allow by itself; pass --trust-pickle too "
                                            f"(sdsurgeon batch {path} --trust-pickle)")

    if not isinstance(data, dict):
        fail((), f"expected a mapping with keys {', '.join(_TOP_KEYS)} (see `sdsurgeon batch --help`)")
    for key in data:
        if key not in _TOP_KEYS:
            fail((key,), f"unknown key {key!r}; valid top-level keys: {', '.join(_TOP_KEYS)}")
    defaults_raw = data.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        fail(("defaults",), "defaults: expected a mapping of options")
    defaults_opts = _checked_options(defaults_raw, ("defaults",), fail, allow_entry_keys=False)
    check_trust(defaults_opts, ("defaults",))
    defaults = JobOptions(**defaults_opts)
    _check_option_values(defaults, ("defaults",), fail)
    models_raw = data.get("models")
    if models_raw is None:
        fail((), "missing key 'models': a list of {name, checkpoint | arch (+ weights), options...}")
    if not isinstance(models_raw, list) or not models_raw:
        fail(("models",), "models: expected a non-empty list of model entries")
    entries = []
    for i, raw in enumerate(models_raw):
        where = ("models", i)
        if not isinstance(raw, dict):
            fail(where, f"models[{i}]: expected a mapping with name and checkpoint or arch")
        opts = _checked_options(raw, where, fail, allow_entry_keys=True)
        check_trust(opts, where)
        entry = {k: raw.get(k) for k in _ENTRY_TYPES}
        label = f"models[{i}]" + (f" ({entry['name']})" if isinstance(entry["name"], str) else "")
        for key, tp in _ENTRY_TYPES.items():
            try:
                _read(tp | None, entry[key])
            except _Expected as exc:
                fail(where + (key,), f"{label}.{key}: {exc}")
        if entry["weights"] and not entry["arch"] and not entry["checkpoint"]:
            fail(where + ("weights",), f"{label}: 'weights' needs 'arch' (the factory the state_dict belongs to) "
                                       "or 'checkpoint' (the model they are loaded into)")
        if not entry["checkpoint"] and not entry["arch"]:
            fail(where, f"{label}: needs 'checkpoint' (a file or glob) or 'arch' (package.module:factory)")
        name = entry["name"]
        if name is not None and _bad_name(name):
            fail(where + ("name",), f"{label}: name {name!r} {_bad_name(name)}")
        for key in ("checkpoint", "weights"):
            if entry[key] is not None and _bad_path(entry[key]):
                fail(where + (key,), f"{label}.{key}: {entry[key]!r} {_bad_path(entry[key])}")
        if entry["name"] is None and not (entry["checkpoint"] and glob.has_magic(entry["checkpoint"])):
            fail(where, f"{label}: missing key 'name' (only a glob checkpoint names its jobs by file stem)")
        _check_option_values(_effective(defaults, opts), where, fail)
        entries.append(ModelEntry(entry["name"], entry["checkpoint"], entry["arch"], entry["arch_kwargs"] or {},
                                  entry["weights"], opts, located.line(*where)))
    return BatchConfig(path, defaults, tuple(entries))


MAX_NAME_BYTES = 128  # a job name names files: <name>.sdsurgeon.json and its temp file must fit a file name


def _bad_name(name: str) -> str | None:
    """Why a job name cannot name output files, or None."""
    if not name or name.startswith(".") or any(c in name for c in "/\\:"):
        return "must be a plain file name (it names the outputs)"
    if not name.isprintable():
        return "holds a control character (a NUL byte, a newline, ...); it names the outputs"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes; it names the outputs"
    return None


def _bad_path(text: str) -> str | None:
    return "holds a NUL byte, which no path can" if "\0" in text else None


def _checked_options(raw: dict, where: tuple, fail: Callable, *, allow_entry_keys: bool) -> dict[str, Any]:
    known = {f.name: f for f in fields(JobOptions)}
    hints = types_of(JobOptions)
    valid = list(known) + (list(_ENTRY_TYPES) if allow_entry_keys else [])
    opts = {}
    for key, value in raw.items():
        if key in _ENTRY_TYPES and allow_entry_keys:
            continue
        if key not in known:
            section = "a model entry" if allow_entry_keys else "defaults"
            fail(where + (key,), f"unknown key {key!r} in {section}; valid keys: {', '.join(valid)}")
        try:  # typed as the option's field is (options.py)
            opts[key] = _read(hints[key], value, count=known[key].metadata.get("count", False))
        except _Expected as exc:
            fail(where + (key,), f"{key}: {exc}")
    return opts


def _check_option_values(o: JobOptions, where: tuple, fail: Callable) -> None:
    """Values the types allow but the tool does not: said at config time, not mid-run."""
    from ..analysis.schedule import Override

    for make, cls in ((o.surgery, SurgeryOptions), (o.convert, ConvertOptions)):
        try:
            make()  # each option's type, choices and range, as the command line's are checked
        except SurgeonError as exc:
            if exc.field is None:
                raise
            key = key_of(cls, exc.field)
            fail(where + (key,), f"{key}: {in_keys(exc.what, KEY_OF_FLAG)}")
    if o.input_shape is not None and o.inputs is not None:
        fail(where + ("inputs",), "give input_shape or inputs, not both")
    if o.input_shape is not None and any(d <= 0 for d in o.input_shape):
        fail(where + ("input_shape",), f"input_shape: {list(o.input_shape)} must be positive integers, e.g. [1, 3, 32, 32]")
    for key, parse, texts in (("inputs", InputSpec.parse, o.inputs or ()), ("set", Override.parse, o.set)):
        for text in texts:
            try:
                parse(text)
            except SurgeonError as exc:  # about a command-line option: this key stands where it stood
                fail(where + (key,), f"{key}: {exc.what}" if exc.option else str(exc))
    if o.timeout is not None and not (math.isfinite(o.timeout) and o.timeout > 0):  # NaN > 0 is false too
        fail(where + ("timeout",), f"timeout: must be a positive number of seconds (got {o.timeout}); null for none")
    if _bad_path(o.output_dir):
        fail(where + ("output_dir",), f"output_dir: {o.output_dir!r} {_bad_path(o.output_dir)}")
    if o.input_shape is not None:
        try:
            InputSpec(None, o.input_shape)  # bounded: refused now, not when a worker allocates it
        except SurgeonError as exc:
            fail(where + ("input_shape",), f"input_shape: {exc}")


def _effective(defaults: JobOptions, overrides: dict[str, Any]) -> JobOptions:
    """Defaults with an entry's overrides; an entry's input_shape replaces default inputs, and vice versa."""
    overrides = dict(overrides)
    if "inputs" in overrides and "input_shape" not in overrides:
        overrides["input_shape"] = None
    if "input_shape" in overrides and "inputs" not in overrides:
        overrides["inputs"] = None
    return replace(defaults, **overrides)


def _job_name(checkpoint: str) -> str:
    """A glob match's job name: its file name without the extension (or .sd.pt)."""
    name = Path(checkpoint).name
    return name.removesuffix(".sd.pt") if name.endswith(".sd.pt") else Path(name).stem


def plan_jobs(config: BatchConfig) -> list[Job]:
    """The jobs a config asks for: globs expanded (one job per file, named by its stem), paths made absolute."""
    base = config.path.resolve().parent
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for entry in config.models:
        options = _effective(config.defaults, entry.overrides)
        out_dir = (base / options.output_dir).resolve()
        if entry.checkpoint and glob.has_magic(entry.checkpoint):
            matches = sorted(glob.glob(os.path.join(glob.escape(str(base)), entry.checkpoint)))
            if not matches:
                raise ConfigError(f"{config.path}:{entry.line}: checkpoint {entry.checkpoint!r} matches no file "
                                  f"(relative to {base})")
            named = [(_job_name(m), m) for m in matches]
        else:
            source = entry.checkpoint or entry.weights
            named = [(entry.name, str(base / source) if source else None)]
        weights = str(base / entry.weights) if entry.weights and entry.checkpoint else None
        for name, checkpoint in named:
            if _bad_name(name):
                raise ConfigError(f"{config.path}:{entry.line}: job name {name!r} (from {checkpoint}) {_bad_name(name)}")
            if name in seen:
                raise ConfigError(f"{config.path}:{entry.line}: two jobs are named {name!r} (the other at line "
                                  f"{seen[name]}); job names must be unique, they name the outputs")
            seen[name] = entry.line
            jobs.append(Job(
                name=name, checkpoint=checkpoint, arch=entry.arch, arch_kwargs=dict(entry.arch_kwargs),
                options=options, output_path=str(out_dir / f"{name}{SUFFIXES.get(options.format) or '-hf'}"),
                sd_path=str(out_dir / f"{name}.sd.pt") if options.save_injected else None,
                stamp_path=str(out_dir / f"{name}.sdsurgeon.json"), import_paths=(str(base),),
                where=f"{config.path}:{entry.line}", weights=weights,
            ))
    # Any job's output against every job's input: a batch never destroys what it reads. The inputs' identities
    # are worked out once, so this is one pass over inputs and one over outputs, not one over inputs per output.
    inputs = InputSet([config.path] + [p for j in jobs for p in j.inputs])
    for job in jobs:
        for output in job.outputs + [job.stamp_path] + ([job.data_path] if job.data_path else []):
            problem = output_problem(output, inputs, folder=output == job.output_path and job.options.format == "hf")
            if problem:
                raise ConfigError(f"{job.where}: job {job.name}: output {problem}; change output_dir or the name")
    return jobs



# --- shards: one config's jobs split over the machines of a CI matrix ------------------------------------

_SHARD = re.compile(r"([0-9]{1,9})/([0-9]{1,9})")  # ASCII digits only (int() would take any script's)


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (``--shard 2/4``: shard I of N, counted from 1) -> ``(I, N)``; a ConfigError about --shard
    otherwise."""
    match = _SHARD.fullmatch(text)
    if match is None:
        raise option_error("--shard", f"{text!r} is not I/N (this run's shard I of N shards, counted from 1), e.g. 2/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1:
        raise option_error("--shard", f"{text}: N, the number of shards, must be 1 or more")
    if not 1 <= index <= count:
        raise option_error("--shard", f"{text}: I must be from 1 to {count} (shards count from 1)")
    return index, count


def shard_of(name: str, count: int) -> int:
    """The shard (1 to ``count``) that the job named ``name`` belongs to.

    A stable hash of the job's name, modulo ``count``, rather than its position in the config: a job stays in
    its shard when other entries are added, removed or reordered (a new checkpoint matching a glob, say), so a
    CI matrix that caches each shard's outputs (and their up-to-date stamps) keeps its cache. sha256, not
    ``hash()``, which Python salts per process. The price: shards balance only on average (each job picks a
    shard at random, in effect), so a few jobs over many shards can leave some shards empty; jobs differ in
    cost anyway, so equal counts would not mean equal times.
    """
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count + 1


def shard_jobs(jobs: list[Job], index: int, count: int) -> list[Job]:
    """The jobs of shard ``index`` of ``count`` (counted from 1, as ``--shard I/N``), in config order.

    Every job falls in exactly one shard (``shard_of`` its name), the same one on every machine and every run of
    the same config; a shard may hold no job (more shards than jobs, or an unlucky draw), which is no error.
    """
    if isinstance(count, bool) or isinstance(index, bool) or count < 1 or not 1 <= index <= count:
        raise ConfigError(f"shard {index} of {count}: need 1 <= index <= count (shards count from 1)")
    return [job for job in jobs if shard_of(job.name, count) == index]


def check_jobs(jobs: list[Job]) -> None:
    """What can be checked before running: inputs exist."""
    from ..io.hf import is_folder
    for job in jobs:
        if job.checkpoint and not (Path(job.checkpoint).is_file() or is_folder(job.checkpoint)):
            raise ConfigError(f"{job.where}: job {job.name}: {job.checkpoint}: no such file")


_ENTRY_TYPES: dict[str, type] = {"name": str, "checkpoint": str, "arch": str, "arch_kwargs": dict, "weights": str}
# What a message from the library calls by its command-line flag, as a config names it: every option with a key,
# and a model entry's own keys (the command line's model options).
KEY_OF_FLAG = {**flags_to_keys(SurgeryOptions, ConvertOptions, _JobSettings),
               **{f"--{key.replace('_', '-')}": key for key in ("arch", "arch_kwargs", "weights")}}
