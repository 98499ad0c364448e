"""Many models in one run: a YAML config -> typed jobs -> results, in parallel worker processes."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from . import __version__
from .capture import InputSpec
from .errors import ConfigError, SurgeonError, first_line
from .files import atomic_write, clean_up_on_signals, on_signal, output_problem, sweep
from .report import JobRecord
from .trust import load_yaml, trust

# --- configuration ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobOptions:
    """Every inject/export option a job takes; ``defaults:`` sets them, a model entry overrides them."""

    pL: float = 0.5
    rule: str = "linear"
    mode: str = "batch"
    scaling: str = "paper"
    seed: int | None = None
    set: tuple[str, ...] = ()
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    leaf: tuple[str, ...] = ()
    fold: bool = True
    input_shape: tuple[int, ...] | None = None
    inputs: tuple[str, ...] | None = None  # NAME:SHAPE[:DTYPE], as for --input
    opset: int | None = None
    static_batch: bool = False
    rtol: float = 1e-4
    atol: float = 1e-5
    output_dir: str = "out"
    trust_pickle: bool = False
    save_injected: bool = False
    timeout: float | None = None  # seconds; a job running longer is killed and reported failed
    capture: str = "auto"  # auto | fx | export, as for --capture
    keep_existing: bool = False  # as --keep-existing: leave the model's own drop-path modules on


# key -> (kind, choices); kinds: number, int, bool, str, list[str], list[int]; every option may be null
# where its default is None.
_OPTION_KINDS: dict[str, str] = {
    "pL": "number", "rule": "str", "mode": "str", "scaling": "str", "seed": "int", "set": "list[str]",
    "include": "list[str]", "exclude": "list[str]", "leaf": "list[str]", "fold": "bool", "input_shape": "list[int]",
    "inputs": "list[str]", "opset": "int", "static_batch": "bool", "rtol": "number", "atol": "number",
    "output_dir": "str", "trust_pickle": "bool", "save_injected": "bool", "timeout": "number",
    "capture": "str", "keep_existing": "bool",
}
_ENTRY_KINDS: dict[str, str] = {"name": "str", "checkpoint": "str", "arch": "str", "arch_kwargs": "dict",
                                "weights": "str"}
_NULLABLE = {f.name for f in fields(JobOptions) if f.default is None}
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
    onnx_path: str
    sd_path: str | None  # the injected model, when save_injected
    stamp_path: str  # settings hash + outputs, for incremental runs
    import_paths: tuple[str, ...] = ()  # folders the arch may be imported from (the config's)
    where: str = ""  # config file:line of the entry, for messages

    @property
    def outputs(self) -> list[str]:
        return [p for p in (self.onnx_path, self.sd_path) if p]

    def settings_hash(self) -> str:
        """Everything that shapes the outputs, so a changed setting re-runs the job."""
        base = self.import_paths[0] if self.import_paths else ""

        def rel(path: str | None) -> str | None:  # relative: moving the project does not redo every job
            return None if path is None else os.path.relpath(path, base or None)

        payload = {"version": __version__, "checkpoint": rel(self.checkpoint), "arch": self.arch,
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


def _kind_ok(value, kind: str) -> bool:
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    if kind == "list[str]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "list[int]":
        return isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    raise AssertionError(kind)


_KIND_WORDS = {"number": "a number", "int": "an integer", "bool": "true or false", "str": "a string",
               "dict": "a mapping", "list[str]": "a list of strings", "list[int]": "a list of integers"}


def _option_value(key: str, value):
    """YAML value -> JobOptions field value (lists become tuples)."""
    if value is None:
        return None
    if key == "pL" or key in ("rtol", "atol", "timeout"):
        return float(value)
    return tuple(value) if isinstance(value, list) else value


def load_config(path: str | os.PathLike) -> BatchConfig:
    """Read and validate a batch config; every mistake is a ConfigError naming file, line, key and the valid keys."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it ({exc})") from None
    try:
        data, root = load_yaml(text, str(path))  # aliases bounded before anything is built
        located = _Located(root)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{where}: not valid YAML ({problem})") from None

    def fail(where: tuple, message: str):
        raise ConfigError(f"{path}:{located.line(*where)}: {message}")

    if not isinstance(data, dict):
        fail((), f"expected a mapping with keys {', '.join(_TOP_KEYS)} (see `sdsurgeon batch --help`)")
    for key in data:
        if key not in _TOP_KEYS:
            fail((key,), f"unknown key {key!r}; valid top-level keys: {', '.join(_TOP_KEYS)}")
    defaults_raw = data.get("defaults") or {}
    if not isinstance(defaults_raw, dict):
        fail(("defaults",), "defaults: expected a mapping of options")
    defaults = JobOptions(**_checked_options(defaults_raw, ("defaults",), fail, allow_entry_keys=False))
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
        entry = {k: raw.get(k) for k in _ENTRY_KINDS}
        label = f"models[{i}]" + (f" ({entry['name']})" if isinstance(entry["name"], str) else "")
        for key, kind in _ENTRY_KINDS.items():
            if entry[key] is not None and not _kind_ok(entry[key], kind):
                fail(where + (key,), f"{label}.{key}: expected {_KIND_WORDS[kind]}, got {entry[key]!r}")
        if entry["weights"] and not entry["arch"]:
            fail(where + ("weights",), f"{label}: 'weights' needs 'arch' (the factory the state_dict belongs to)")
        if not entry["checkpoint"] and not entry["arch"]:
            fail(where, f"{label}: needs 'checkpoint' (a file or glob) or 'arch' (package.module:factory)")
        name = entry["name"]
        if name is not None and _bad_name(name):
            fail(where + ("name",), f"{label}: name {name!r} {_bad_name(name)}")
        for key in ("checkpoint", "weights"):
            if entry[key] is not None and _bad_path(entry[key]):
                fail(where + (key,), f"{label}.{key}: {entry[key]!r} {_bad_path(entry[key])}")
        if entry["weights"] and entry["checkpoint"]:
            fail(where + ("weights",), f"{label}: give 'checkpoint' or 'weights', not both")
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
    valid = list(_OPTION_KINDS) + (list(_ENTRY_KINDS) if allow_entry_keys else [])
    opts = {}
    for key, value in raw.items():
        if key in _ENTRY_KINDS and allow_entry_keys:
            continue
        if key not in _OPTION_KINDS:
            section = "a model entry" if allow_entry_keys else "defaults"
            fail(where + (key,), f"unknown key {key!r} in {section}; valid keys: {', '.join(valid)}")
        kind = _OPTION_KINDS[key]
        if value is None and key in _NULLABLE:
            opts[key] = None
            continue
        if not _kind_ok(value, kind):
            fail(where + (key,), f"{key}: expected {_KIND_WORDS[kind]}, got {value!r}")
        opts[key] = _option_value(key, value)
    return opts


def _check_option_values(o: JobOptions, where: tuple, fail: Callable) -> None:
    """Values the types allow but the tool does not: said at config time, not mid-run."""
    from .capture import CAPTURE_METHODS
    from .gate import MODES, SCALINGS
    from .schedule import RULES, Override

    if not 0 < o.pL <= 1:
        fail(where + ("pL",), f"pL: {o.pL} is outside (0, 1]")
    for key, value, choices in (("rule", o.rule, RULES), ("mode", o.mode, MODES), ("scaling", o.scaling, SCALINGS),
                                ("capture", o.capture, CAPTURE_METHODS)):
        if value not in choices:
            fail(where + (key,), f"{key}: {value!r} is not one of {', '.join(choices)}")
    if o.input_shape is not None and o.inputs is not None:
        fail(where + ("inputs",), "give input_shape or inputs, not both")
    if o.input_shape is not None and any(d <= 0 for d in o.input_shape):
        fail(where + ("input_shape",), f"input_shape: {list(o.input_shape)} must be positive integers, e.g. [1, 3, 32, 32]")
    try:
        for text in o.inputs or ():
            InputSpec.parse(text)
        for text in o.set:
            Override.parse(text)
    except SurgeonError as exc:
        fail(where + ("inputs" if o.inputs else "set",), str(exc).replace("--input ", "inputs: ").replace("--set ", "set: "))
    if o.rtol < 0 or o.atol < 0:
        fail(where, "rtol and atol must be zero or positive")
    if o.timeout is not None and o.timeout <= 0:
        fail(where + ("timeout",), "timeout: must be a positive number of seconds")
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
        for name, checkpoint in named:
            if _bad_name(name):
                raise ConfigError(f"{config.path}:{entry.line}: job name {name!r} (from {checkpoint}) {_bad_name(name)}")
            if name in seen:
                raise ConfigError(f"{config.path}:{entry.line}: two jobs are named {name!r} (the other at line "
                                  f"{seen[name]}); job names must be unique, they name the outputs")
            seen[name] = entry.line
            jobs.append(Job(
                name=name, checkpoint=checkpoint, arch=entry.arch, arch_kwargs=dict(entry.arch_kwargs),
                options=options, onnx_path=str(out_dir / f"{name}.onnx"),
                sd_path=str(out_dir / f"{name}.sd.pt") if options.save_injected else None,
                stamp_path=str(out_dir / f"{name}.sdsurgeon.json"), import_paths=(str(base),),
                where=f"{config.path}:{entry.line}",
            ))
    inputs = [config.path] + [j.checkpoint for j in jobs]
    for job in jobs:  # any job's output against every job's input: a batch never destroys what it reads
        for output in job.outputs + [job.stamp_path]:
            problem = output_problem(output, inputs)
            if problem:
                raise ConfigError(f"{job.where}: job {job.name}: output {problem}; change output_dir or the name")
    return jobs


def check_jobs(jobs: list[Job]) -> None:
    """What can be checked before running: inputs exist."""
    from .hf import is_folder
    for job in jobs:
        if job.checkpoint and not (Path(job.checkpoint).is_file() or is_folder(job.checkpoint)):
            raise ConfigError(f"{job.where}: job {job.name}: {job.checkpoint}: no such file")


# --- incremental runs ---------------------------------------------------------------------------------------


def up_to_date(job: Job) -> bool:
    """Outputs exist, are newer than the inputs, and were made with the same settings."""
    try:
        stamp = json.loads(Path(job.stamp_path).read_text())
        if stamp.get("settings_hash") != job.settings_hash():
            return False
        oldest_output = min(Path(p).stat().st_mtime for p in job.outputs)
    except (OSError, ValueError, AttributeError):
        return False
    newest_input = _mtime(Path(job.checkpoint)) if job.checkpoint else 0.0
    return oldest_output >= newest_input


def _mtime(path: Path) -> float:
    """A file's modification time; a transformers folder's is that of its newest file."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


def _write_stamp(job: Job, record: JobRecord) -> None:
    text = json.dumps({"settings_hash": job.settings_hash(), "outputs": job.outputs, "sdsurgeon": __version__,
                       "record": record.to_dict()})
    atomic_write(job.stamp_path, lambda f: f.write(text.encode()))


def skipped_record(job: Job) -> JobRecord:
    """An up-to-date job's record: the figures of the run that made its outputs, status skipped."""
    record = JobRecord(job.name, "skipped", error="up to date; --force redoes it", outputs=job.outputs)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        previous = json.loads(Path(job.stamp_path).read_text())["record"]
        for key in ("sites", "folded", "multiplies", "nodes", "max_abs_error", "max_rel_error", "tolerance_used"):
            setattr(record, key, previous.get(key))
    return record


# --- one job ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = round(time.perf_counter() - started, 3)


def run_job(job: Job) -> JobRecord:
    """load -> inject -> (save) -> fold -> export -> verify. Never raises: failures become the record's error."""
    from .capture import make_example_inputs, parse_shape
    from .export import verify, write_onnx
    from .files import staged
    from .fold import fold_with_report
    from .hf import complete_specs
    from .inject import RECIPE_ATTR, inject
    from .load import load, save

    o = job.options
    record = JobRecord(job.name, "failed")
    timings = record.timings
    started = time.perf_counter()
    try:
        Path(job.onnx_path).parent.mkdir(parents=True, exist_ok=True)
        with _stage(timings, "load"):
            model = load(job.checkpoint, trust_pickle=o.trust_pickle, arch=job.arch, arch_kwargs=job.arch_kwargs,
                         arch_folders=job.import_paths)
        specs = None
        if o.input_shape is not None:
            specs = [InputSpec(None, parse_shape(",".join(map(str, o.input_shape)), "input_shape"))]
        elif o.inputs is not None:
            specs = [InputSpec.parse(text) for text in o.inputs]
        recipe = getattr(model, RECIPE_ATTR, None)
        if recipe is None:  # a plain model: gate it; an sdsurgeon file is already gated
            specs = complete_specs(model, specs)
            with _stage(timings, "inject"):
                model = inject(
                    model, o.pL, rule=o.rule, mode=o.mode, scaling=o.scaling, seed=o.seed, overrides=o.set,
                    include=o.include, exclude=o.exclude, leaves=o.leaf, inputs=specs,
                    example_inputs=None if specs is None else make_example_inputs(specs),
                    capture=o.capture, keep_existing=o.keep_existing,
                )
            recipe = getattr(model, RECIPE_ATTR)
        specs = specs or recipe.inputs
        if not specs:
            raise ConfigError("no input shape: set input_shape (e.g. [1, 3, 32, 32]) or inputs for this model")
        record.sites = len(recipe.sites)
        example = make_example_inputs(specs)
        with contextlib.ExitStack() as outputs:  # every output appears together, or none does
            onnx_tmp = outputs.enter_context(staged(job.onnx_path))
            if job.sd_path:
                sd_tmp = outputs.enter_context(staged(job.sd_path))
                with _stage(timings, "save"):
                    save(model, sd_tmp)
            with _stage(timings, "fold"):
                folded, report = fold_with_report(model, into_weights=o.fold)
            with _stage(timings, "export"):
                exported = write_onnx(folded, example, onnx_tmp, opset=o.opset, dynamic_batch=not o.static_batch)
            with _stage(timings, "verify"):
                checked = verify(model, onnx_tmp, example, rtol=o.rtol, atol=o.atol)
        record.folded, record.multiplies = len(report.folded), len(report.multiplies)
        record.nodes = exported.nodes
        record.max_abs_error, record.max_rel_error = checked.max_abs, checked.max_rel
        record.tolerance_used = checked.tolerance_used
        record.outputs = job.outputs
        record.status = "ok"
        _write_stamp(job, record)
    except SurgeonError as exc:
        record.error = str(exc)
    except Exception as exc:  # a bug, or something unforeseen in a user's model: keep the traceback
        record.error = first_line(exc)
        record.traceback = traceback.format_exc()
    if record.status == "failed":
        with contextlib.suppress(OSError):
            os.unlink(job.stamp_path)  # old outputs stay, but no longer count as up to date
    timings["total"] = round(time.perf_counter() - started, 3)
    return record


def _exit_reason(code: int | None) -> str:
    if code is not None and code < 0:
        import signal

        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _remove_leftovers(job: Job) -> None:
    """What a killed job's process could not clean up: its staged temp files (its owner is gone), and its stamp."""
    for folder in {str(Path(output).parent) for output in job.outputs}:
        sweep(folder)
    with contextlib.suppress(OSError):
        os.unlink(job.stamp_path)


# --- many jobs ----------------------------------------------------------------------------------------------


def _worker(conn, threads: int) -> None:
    """A worker process: run the jobs it is sent until it gets None."""
    clean_up_on_signals()  # stopped by the parent (or a CI cancel): its temp files go with it
    import torch

    torch.set_num_threads(threads)
    import onnx  # noqa: F401  (imported now, not inside the first job's timings)
    import onnxruntime  # noqa: F401

    from .export import quiet

    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(("started", None))  # the timeout counts from here, not from the worker's imports
        with quiet():
            record = run_job(job)
        conn.send(("done", record))


@dataclass
class _Slot:
    process: Any
    conn: Any
    job: Job | None = None
    started: float = 0.0


@dataclass
class BatchEvent:
    """Progress of a run, for a display: a job started or finished."""

    kind: str  # "start" | "done"
    job: str
    record: JobRecord | None = None
    done: int = 0
    total: int = 0


@dataclass
class BatchResult:
    records: list[JobRecord] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.records)


def run_batch(jobs: list[Job], *, workers: int = 1, fail_fast: bool = False, force: bool = False,
              on_event: Callable[[BatchEvent], None] | None = None) -> BatchResult:
    """Run jobs in ``workers`` processes (torch threads split between them); results in job order.

    Up-to-date jobs are skipped unless ``force``. A job whose process dies or outlives its timeout is
    reported failed and its worker replaced, so a crash never stops the other jobs and never hangs.
    With ``fail_fast``, jobs not yet started after the first failure are reported skipped.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    emit = on_event or (lambda _e: None)
    records: dict[str, JobRecord] = {}
    todo: deque[Job] = deque()
    for job in jobs:
        if not force and up_to_date(job):
            records[job.name] = skipped_record(job)
            emit(BatchEvent("done", job.name, records[job.name], len(records), len(jobs)))
        else:
            todo.append(job)
    workers = max(1, min(workers, len(todo) or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    for job in todo:  # the config's architectures are the user's: trusted once here, not by racing workers
        if job.arch:
            with contextlib.suppress(SurgeonError):  # not findable: the job's own load says why
                trust(job.arch, folder=job.import_paths[0] if job.import_paths else None)
    ctx = mp.get_context("spawn")  # not fork: torch's thread pools do not survive a fork safely
    slots: list[_Slot] = []

    def start_slot() -> _Slot:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker, args=(child, threads), daemon=True)
        process.start()
        child.close()
        return _Slot(process, parent)

    def finish(slot: _Slot, record: JobRecord) -> None:
        records[slot.job.name] = record
        slot.job = None
        emit(BatchEvent("done", record.name, record, len(records), len(jobs)))

    def stop_workers() -> None:  # a SIGTERM to the batch reaches its workers, whose handlers remove their temp files
        for slot in slots:
            slot.process.terminate()

    failed = False
    with on_signal(stop_workers):
        try:
            while todo or any(s.job for s in slots):
                if fail_fast and failed:
                    while todo:
                        job = todo.popleft()
                        records[job.name] = JobRecord(job.name, "skipped", error="not run: --fail-fast after a failure")
                        emit(BatchEvent("done", job.name, records[job.name], len(records), len(jobs)))
                while todo and (len(slots) < workers or any(s.job is None for s in slots)):
                    slot = next((s for s in slots if s.job is None), None) or start_slot()
                    if slot not in slots:
                        slots.append(slot)
                    slot.job, slot.started = todo.popleft(), time.monotonic()
                    slot.conn.send(slot.job)
                    emit(BatchEvent("start", slot.job.name, None, len(records), len(jobs)))
                busy = [s for s in slots if s.job]
                if not busy:
                    continue
                ready = wait([s.conn for s in busy] + [s.process.sentinel for s in busy], timeout=0.5)
                for slot in busy:
                    record = None
                    if slot.conn in ready:
                        try:
                            kind, record = slot.conn.recv()
                        except (EOFError, OSError):
                            kind, record = "died", None
                        if kind == "started":
                            slot.started = time.monotonic()
                    if record is not None:
                        finish(slot, record)
                        failed |= record.status == "failed"
                        continue
                    timeout = slot.job.options.timeout
                    died = slot.process.sentinel in ready or not slot.process.is_alive()
                    late = timeout is not None and time.monotonic() - slot.started > timeout
                    if died or late:
                        slot.process.kill()
                        slot.process.join()
                        elapsed = round(time.monotonic() - slot.started, 3)
                        why = (f"job timed out after {timeout:g} s and was stopped" if late and not died else
                               f"job's process died ({_exit_reason(slot.process.exitcode)}) before reporting")
                        _remove_leftovers(slot.job)
                        finish(slot, JobRecord(slot.job.name, "failed", error=f"the {why}", timings={"total": elapsed}))
                        failed = True
                        slots.remove(slot)
        finally:
            for slot in slots:
                with contextlib.suppress(OSError, BrokenPipeError):
                    slot.conn.send(None)
            for slot in slots:
                slot.process.join(timeout=5)
                if slot.process.is_alive():
                    slot.process.kill()
    return BatchResult([records[j.name] for j in jobs])
