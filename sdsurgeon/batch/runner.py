"""Run batch jobs: worker processes, timeouts, incremental stamps, and the results they report."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .._version import __version__
from ..errors import ConfigError, SurgeonError, first_line
from ..io.files import atomic_write, clean_up_on_signals, on_signal, sweep
from ..options import in_terms
from ..progress import SILENT, Progress
from ..report import JobRecord
from .config import KEY_OF_FLAG, Job, config_key

# --- configuration ----------------------------------------------------------------------------------------


# --- incremental runs ---------------------------------------------------------------------------------------


def written(job: Job, record_outputs: list) -> list[str]:
    """The job's outputs, with the ONNX file's external data where the run that wrote them wrote one (a stamp's
    ``outputs`` name it; by file name, so a moved project still counts)."""
    names = {Path(p).name for p in record_outputs if isinstance(p, str)}
    return job.outputs + ([job.data_path] if job.data_path and Path(job.data_path).name in names else [])


def up_to_date(job: Job) -> bool:
    """Outputs exist, are newer than the inputs, and were made with the same settings."""
    try:
        stamp = json.loads(Path(job.stamp_path).read_text())
        if stamp.get("settings_hash") != job.settings_hash():
            return False
        oldest_output = min(Path(p).stat().st_mtime for p in written(job, stamp.get("outputs") or []))
    except (OSError, ValueError, AttributeError):
        return False
    newest_input = max((_mtime(Path(p)) for p in job.inputs), default=0.0)
    return oldest_output >= newest_input


def _mtime(path: Path) -> float:
    """A file's modification time; a transformers folder's is that of its newest file."""
    if path.is_dir():
        return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=path.stat().st_mtime)
    return path.stat().st_mtime


def _write_stamp(job: Job, record: JobRecord) -> None:
    text = json.dumps({"settings_hash": job.settings_hash(), "outputs": record.outputs, "sdsurgeon": __version__,
                       "record": record.to_dict()})
    atomic_write(job.stamp_path, lambda f: f.write(text.encode()))


def skipped_record(job: Job) -> JobRecord:
    """An up-to-date job's record: the figures of the run that made its outputs, status skipped."""
    record = JobRecord(job.name, "skipped", error="up to date; --force redoes it", outputs=job.outputs)
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        stamp = json.loads(Path(job.stamp_path).read_text())
        record.outputs = written(job, stamp.get("outputs") or [])
        previous = stamp["record"]
        for key in ("sites", "folded", "multiplies", "dropped", "nodes", "max_abs_error", "max_rel_error",
                    "tolerance_used"):
            setattr(record, key, previous.get(key))
    return record


# --- one job ----------------------------------------------------------------------------------------------


def _in_config_terms(exc: SurgeonError) -> str:
    """An error as a batch job says it: a config key where the command line would name an option."""
    if exc.option == "--input-shape" and exc.what == "no input shape":
        return "no input shape: set input_shape (e.g. [1, 3, 32, 32]) or inputs for this model"
    # only a message that reads "{option} {what}" is reworded: other messages say more than the what; flags named
    # inside either are spelled as their keys
    return in_terms(exc, config_key(exc), KEY_OF_FLAG)


def run_job(job: Job, progress: Progress = SILENT) -> JobRecord:
    """load -> inject -> (save) -> fold -> export -> verify. Never raises: failures become the record's error.
    ``progress`` hears of each stage, as the pipeline functions report them."""
    from .. import pipeline
    from ..surgery.recipe import RECIPE_ATTR

    o = job.options
    record = JobRecord(job.name, "failed")
    timings = record.timings
    started = time.perf_counter()
    try:
        Path(job.output_path).parent.mkdir(parents=True, exist_ok=True)
        ref = pipeline.ModelRef(job.checkpoint, job.arch, job.arch_kwargs, weights=job.weights,
                                trust_pickle=o.trust_pickle, arch_folders=job.import_paths)
        with pipeline.stage(timings, "load", progress, "load model"):
            model = ref.load()
        specs = o.specs()
        if getattr(model, RECIPE_ATTR, None) is None:  # a plain model: gate it; an sdsurgeon file is already gated
            with pipeline.stage(timings, "inject", progress, "inject gates"):
                model = pipeline.gate(model, o.surgery(), specs, progress=progress)
            specs = None  # the recipe now holds them, completed from a transformers config where needed
        record.sites = len(getattr(model, RECIPE_ATTR).sites)  # known even if the job fails later
        converted = pipeline.convert(
            model, o.convert(), specs,
            output=Path(job.output_path), name=job.name, save_injected=Path(job.sd_path) if job.sd_path else None,
            timings=timings, progress=progress,
        )
        record.folded, record.multiplies = len(converted.report.folded), len(converted.report.multiplies)
        record.nodes = getattr(converted.exported, "nodes", None)  # ONNX only
        record.dropped = None if converted.pruned is None else len(converted.pruned.dropped)
        record.max_abs_error, record.max_rel_error = converted.checked.max_abs, converted.checked.max_rel
        record.tolerance_used = converted.checked.tolerance_used
        data = getattr(converted.exported, "data_path", None)  # ONNX past 2 GB: the weights beside it
        record.outputs = job.outputs + ([data] if data else [])
        record.status = "ok"
        _write_stamp(job, record)
    except SurgeonError as exc:
        record.error = _in_config_terms(exc)
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


def _worker(conn, threads: int, undo: dict) -> None:
    """A worker process: run the jobs it is sent until it gets None.

    It started with SIGINT ignored (see ``_starting_worker``) and keeps it so: a terminal's Ctrl-C reaches the
    whole process group, and the parent decides what stops (it stops workers with SIGTERM).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # inherited so already, unless the parent could not (a thread)
    _restore_env(undo["env"])  # what the start changed, as the parent has it
    if "cwd" in undo:
        with contextlib.suppress(OSError):
            os.chdir(undo["cwd"])
    clean_up_on_signals()  # stopped by the parent (or a CI cancel): its temp files go with it
    import torch

    torch.set_num_threads(threads)
    import onnx  # noqa: F401  (imported now, not inside the first job's timings)
    import onnxruntime  # noqa: F401

    from ..io.quiet import quiet

    progress = _ToParent(conn)
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        conn.send(("started", None))  # the timeout counts from here, not from the worker's imports
        with quiet():
            record = run_job(job, progress)
        conn.send(("done", record))


class _ToParent(Progress):
    """A worker's reporter: sends the parent the innermost stage its job is in (``("stage", name)``), which the
    parent reports as that job's (see ``_Reporting``)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        self.open: list[tuple[object, str]] = []

    def start(self, name: str, total: int | None = None) -> object:
        handle = object()
        self.open.append((handle, name))
        self._send()
        return handle

    def end(self, handle: object) -> None:
        self.open = [(h, name) for h, name in self.open if h is not handle]
        self._send()

    def _send(self) -> None:
        with contextlib.suppress(OSError, ValueError):  # the parent gone: it stops this worker anyway
            self.conn.send(("stage", self.open[-1][1] if self.open else None))


@contextlib.contextmanager
def _starting_worker(empty_folder: Callable[[], str]) -> Iterator[dict]:
    """Around starting a worker process; yields what the worker puts back once it runs (``_worker``).

    spawn starts ``python -c ...``, which puts the current folder first on sys.path while it imports
    multiprocessing, pickle and more, before the parent's sys.path is restored: a multiprocessing.py there would
    run in every worker. On Python 3.11+ PYTHONSAFEPATH keeps that folder off; 3.10 has no such switch, so the
    worker starts in an empty folder and moves to the parent's once its sys.path is the parent's (jobs carry
    absolute paths anyway). SIGINT is ignored meanwhile, which the worker inherits from its first instruction
    on; a Ctrl-C to the parent in these few milliseconds is lost (pressed again, it stops the batch).

    The first start also starts multiprocessing's resource tracker, which reclaims the semaphores of a worker
    stopped mid-job (tqdm's lock, made inside torch.fx) and would warn about each on stderr: told to keep quiet.
    """
    undo: dict = {"env": {name: os.environ.get(name) for name in ("PYTHONSAFEPATH", "PYTHONWARNINGS")}}
    old_sigint = _ignore_sigint()
    try:
        quiet_tracker = "ignore::UserWarning:multiprocessing.resource_tracker"
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, (undo["env"]["PYTHONWARNINGS"], quiet_tracker)))
        if sys.version_info >= (3, 11):
            os.environ["PYTHONSAFEPATH"] = "1"
        else:
            undo["cwd"] = os.getcwd()
            os.chdir(empty_folder())
        yield undo
    finally:
        _restore_env(undo["env"])
        if "cwd" in undo:
            os.chdir(undo["cwd"])
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)


def _ignore_sigint():
    """Ignore SIGINT; the handler to put back, or None where it cannot be (not the main thread, a C handler)."""
    old = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or old is None:
        return None
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return old


def _restore_env(values: dict[str, str | None]) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def _deferring_ctrl_c() -> Iterator[None]:
    """A second Ctrl-C must not cut short the cleanup of the first (a KeyboardInterrupt goes on after it)."""
    old = _ignore_sigint()
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


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


class _Reporting:
    """A run's events, told to ``on_event`` (starts and ends) and to a progress reporter: the stage "jobs",
    advanced once per job done (skipped ones included), and one stage per running job, named after the job
    and, once its worker reports one, the stage it is in ("resnet: export ONNX")."""

    def __init__(self, progress: Progress, total: int, on_event: Callable[[BatchEvent], None] | None) -> None:
        self.progress, self.on_event = progress, on_event
        self.overall = progress.start("jobs", total=total)
        self.running: dict[str, Any] = {}  # job name -> its stage's handle

    def __call__(self, event: BatchEvent) -> None:
        if event.kind == "start":
            self.stage(event.job, None)
        else:
            self._end(event.job)
            self.progress.advance(self.overall)
        if self.on_event is not None:
            self.on_event(event)

    def stage(self, job: str, doing: str | None) -> None:
        self._end(job)
        self.running[job] = self.progress.start(f"{job}: {doing}" if doing else job)

    def _end(self, job: str) -> None:
        if job in self.running:
            self.progress.end(self.running.pop(job))

    def close(self) -> None:
        for job in list(self.running):
            self._end(job)
        self.progress.end(self.overall)


@dataclass
class BatchResult:
    records: list[JobRecord] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.status != "failed" for r in self.records)


def run_batch(jobs: list[Job], *, workers: int = 1, fail_fast: bool = False, force: bool = False,
              on_event: Callable[[BatchEvent], None] | None = None, allow_trust_pickle: bool = False,
              progress: Progress = SILENT) -> BatchResult:
    """Run jobs in ``workers`` processes (torch threads split between them); results in job order.

    Up-to-date jobs are skipped unless ``force``. A job whose process dies or outlives its timeout is
    reported failed and its worker replaced, so a crash never stops the other jobs and never hangs.
    With ``fail_fast``, jobs not yet started after the first failure are reported skipped. A job with
    ``trust_pickle`` is refused up front unless ``allow_trust_pickle`` (the command line's --trust-pickle).
    Interrupted (Ctrl-C, or any error here), it stops the running jobs, removes their temp files and re-raises.
    ``on_event`` hears of each job's start and end; ``progress`` of the jobs done (stage "jobs") and of each
    running job, named ``NAME`` and then ``NAME: STAGE`` with the pipeline stage its worker is in.
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    trusting = next((j for j in jobs if j.options.trust_pickle), None)
    if trusting is not None and not allow_trust_pickle:  # as load_config: a config never grants itself trust
        at = f"{trusting.where}: " if trusting.where else ""
        raise ConfigError(f"{at}job {trusting.name}: trust_pickle would unpickle code from the checkpoint, which "
                          "a config cannot allow by itself; pass --trust-pickle too")
    emit = _Reporting(progress, len(jobs), on_event)
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
    # A config's architectures are imported by each job from the config's folder, for that run only: a config
    # never writes the user's trust store (a later stranger's file naming the same spec must still be refused).
    ctx = mp.get_context("spawn")  # not fork: torch's thread pools do not survive a fork safely
    slots: list[_Slot] = []
    start_folder: list[str] = []  # Python 3.10: the empty folder workers start in (see _starting_worker)

    def empty_folder() -> str:
        if not start_folder:
            start_folder.append(tempfile.mkdtemp(prefix="sdsurgeon-worker-"))
        return start_folder[0]

    def start_slot() -> _Slot:
        parent, child = ctx.Pipe()
        with _starting_worker(empty_folder) as undo:
            process = ctx.Process(target=_worker, args=(child, threads, undo), daemon=True)
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
                        elif kind == "stage":  # the stage the job is in: a name, not a record
                            emit.stage(slot.job.name, record)
                            record = None
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
            with _deferring_ctrl_c():
                stopped = [s.job for s in slots if s.job]  # interrupted mid-job: Ctrl-C, or an error here
                for slot in slots:
                    if slot.job:
                        slot.process.terminate()  # as for SIGTERM: its handler removes its temp files
                    else:
                        with contextlib.suppress(OSError, BrokenPipeError):
                            slot.conn.send(None)
                for slot in slots:
                    slot.process.join(timeout=5)
                    if slot.process.is_alive():
                        slot.process.kill()
                        slot.process.join()
                for job in stopped:  # what a worker killed outright (or deaf to SIGTERM for 5 s) left behind
                    _remove_leftovers(job)
                if start_folder:
                    shutil.rmtree(start_folder[0], ignore_errors=True)
                emit.close()
    return BatchResult([records[j.name] for j in jobs])
