"""Fixtures shared by the test modules; every test runs with its own sdsurgeon trust store."""

from __future__ import annotations

import contextlib

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]  # tests/test_tiers.py runs the tier checks below on generated tests

# OpenMP threads that wait for work sleep instead of spinning. A spinning thread that the OS keeps off the CPU
# (2 cores, other jobs) burns CPU time doing nothing: on this machine a schedule test took 0.5 s of CPU alone
# and 1.3-10 s with three busy loops beside it, failing the fast tier's CPU guard for no fault of its own;
# sleeping, it took 0.5-0.7 s both ways, and the suite's wall time is the same. libgomp reads the variable
# when it loads, so it is set before anything imports torch (test_tiers checks that nothing did).
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
TORCH_LOADED_BEFORE_CONFTEST = "torch" in sys.modules

# Tests never write the real ~/.config/sdsurgeon: a store for the session, set before anything (module
# fixtures, spawned batch workers, subprocesses) can trust a factory.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="sdsurgeon-home-"))
os.environ["SDSURGEON_HOME"] = str(_SESSION_HOME)


def pytest_unconfigure(config) -> None:
    shutil.rmtree(_SESSION_HOME, ignore_errors=True)


@pytest.fixture(autouse=True)
def trust_store(tmp_path_factory, monkeypatch) -> Path:
    """This test's trust store (``$SDSURGEON_HOME``, beside its tmp_path, not in it): what module fixtures
    trusted so far, and nothing a test trusts reaches another test."""
    home = tmp_path_factory.mktemp("sdsurgeon-home")
    if (_SESSION_HOME / "trusted.json").exists():
        shutil.copy(_SESSION_HOME / "trusted.json", home / "trusted.json")
    monkeypatch.setenv("SDSURGEON_HOME", str(home))
    return home / "trusted.json"


@pytest.fixture
def work(tmp_path, monkeypatch) -> Path:
    """An empty folder that is also the current directory (where a default output would land)."""
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    return folder


# --- test tiers: markers, and the checks that keep them true --------------------------------------------
#
# `make test-fast` deselects TIER_MARKERS and runs with --check-marks and --slow-guard: a test that runs
# torch.compile, exports ONNX, starts a process or builds a transformers model without the marker saying
# so fails, and so does an unmarked test over the guard's CPU seconds. Only the fast tier turns these on
# (see the Makefile): every unmarked test runs there, so the full run would check nothing more, and a
# timing check on the full run could fail on a loaded machine for no fault of the test.

TIER_MARKERS = ("compile", "onnx", "multiprocess", "hf", "slow")

# Fixtures whose setup does a marker's work: every test using one is marked so (a module fixture runs once,
# but whichever of its tests runs first, alone or not, pays for it).
FIXTURE_MARKS = {
    "mixed": ("multiprocess", "onnx"),  # test_batch: a batch run (spawned workers exporting ONNX)
    "glob_runs": ("multiprocess", "onnx"),
    "crashes": ("multiprocess", "onnx"),
    "default_export": ("onnx",),  # test_export_cli: an export through the CLI
    "zoo": ("hf",),  # test_hf: the HF zoo's transformers models, saved
    "trained": ("hf", "onnx"),  # test_hf: the HF zoo trained, folded and exported
    "quick_run": ("multiprocess", "slow"),  # test_replication: the replication script in a subprocess
}


def pytest_addoption(parser) -> None:
    group = parser.getgroup("sdsurgeon tiers")
    group.addoption("--check-marks", action="store_true",
                    help="fail a test that runs torch.compile, exports ONNX, starts a process or builds a "
                         "transformers model without the compile/onnx/multiprocess/hf marker")
    group.addoption("--check-modules", metavar="PACKAGE",
                    help="fail the session unless it imported every module of PACKAGE (its __main__ aside)")
    group.addoption("--slow-guard", type=float, default=0.0, metavar="SECONDS",
                    help="fail a test with none of the tier markers whose setup or call took more CPU seconds (0: off)")


# Entries of tests/zoo.py whose every test takes seconds (a real 20-layer network): their parameters are slow.
SLOW_ZOO_ENTRIES = {"cifar_resnet20"}


def pytest_collection_modifyitems(config, items) -> None:
    here = Path(__file__).parent
    for item in items:
        for name in FIXTURE_MARKS.keys() & set(getattr(item, "fixturenames", ())):
            for marker in FIXTURE_MARKS[name]:
                item.add_marker(marker)
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.path.parent == here and any(getattr(v, "name", None) in SLOW_ZOO_ENTRIES for v in params.values()):
            item.add_marker("slow")


def _tier_markers(item) -> set[str]:
    return {m.name for m in item.iter_markers() if m.name in TIER_MARKERS}


# What each running test (its setup included) did of the markers' work, innermost last: a pytester run inside a
# checked run records into its own test's set, not into the outer test's.
_running: list[set[str]] = []


def _watch(owner, name: str, what: str) -> None:
    original = getattr(owner, name)
    if hasattr(original, "_tier_running"):
        return

    def wrapper(*args, **kwargs):
        if wrapper._tier_running:
            wrapper._tier_running[-1].add(what)
        return original(*args, **kwargs)

    wrapper._tier_running = _running
    setattr(owner, name, wrapper)


def _watch_all() -> None:
    """Wrap what does a marker's work, for the rest of the session (idempotent; lazily imported modules once loaded)."""
    global _running
    import multiprocessing.process
    import subprocess

    import torch
    import torch.onnx

    _running = getattr(torch.compile, "_tier_running", _running)  # this session's, or the outer one's
    if "matplotlib.font_manager" not in sys.modules:
        # On a fresh machine matplotlib builds its font cache on first import by running fc-list (a
        # subprocess): done here, before the watch, so no plot test is charged with starting a process.
        with contextlib.suppress(ImportError):
            import matplotlib.font_manager  # noqa: F401
    _watch(torch, "compile", "compile")
    _watch(torch.onnx, "export", "onnx")
    _watch(subprocess.Popen, "__init__", "multiprocess")
    _watch(multiprocessing.process.BaseProcess, "start", "multiprocess")
    if "onnxruntime" in sys.modules:
        _watch(sys.modules["onnxruntime"].InferenceSession, "__init__", "onnx")
    if "transformers.modeling_utils" in sys.modules:
        _watch(sys.modules["transformers.modeling_utils"].PreTrainedModel, "__init__", "hf")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _running
    if not item.config.getoption("--check-marks"):
        outer = getattr(sys.modules.get("torch"), "compile", None)
        if not hasattr(outer, "_tier_running"):
            yield
            return
        _running = outer._tier_running  # a pytester run inside a checked run: record into nobody's set
    else:
        _watch_all()
    item._tier_hf_loaded = "transformers.modeling_utils" in sys.modules
    item._tier_work = set()
    _running.append(item._tier_work)
    try:
        yield
    finally:
        _running.pop()  # this item's: nested runs pop their own first


def _work_of(item) -> set[str]:
    work = set(getattr(item, "_tier_work", ()))
    if not getattr(item, "_tier_hf_loaded", True) and "transformers.modeling_utils" in sys.modules:
        work.add("hf")  # the session's first transformers model, built before the watch could be set
    return work


def _cpu_timed(item, when: str):
    start = time.process_time()
    yield
    item._tier_cpu = {**getattr(item, "_tier_cpu", {}), when: time.process_time() - start}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _cpu_timed(item, "setup")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _cpu_timed(item, "call")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when not in ("setup", "call") or not report.passed:
        return
    marked = _tier_markers(item)
    problems = []
    if item.config.getoption("--check-marks"):
        unmarked_work = sorted(_work_of(item) - marked)
        if unmarked_work:
            problems.append(f"its {call.when} does the work of marker(s) {', '.join(unmarked_work)} without them: add "
                            + " ".join(f"@pytest.mark.{m}" for m in unmarked_work))
    # This process's CPU seconds (its threads', not its children's), not the wall clock's: a test that took 2 s
    # alone took 7 s on this machine when other jobs loaded it, and the guard must not fail it for that.
    limit = item.config.getoption("--slow-guard")
    cpu = getattr(item, "_tier_cpu", {}).get(call.when, 0.0)
    if limit and not marked and cpu > limit:
        problems.append(f"its {call.when} took {cpu:.1f} s of CPU (the fast tier's limit is {limit:g} s) and "
                        f"it has none of the markers {', '.join(TIER_MARKERS)}: add @pytest.mark.slow, or the "
                        "marker of what makes it slow")
    if problems:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: " + "; ".join(problems)


def pytest_sessionfinish(session, exitstatus) -> None:
    """With --check-modules: every module of the package (files found now: wherever they move) was imported by this
    session's tests or collection. A ``__main__`` runs only as ``python -m`` in a subprocess, and counts as its package."""
    package = session.config.getoption("--check-modules")
    if not package or exitstatus != pytest.ExitCode.OK:
        return
    import importlib.util

    root = Path(importlib.util.find_spec(package).origin).parent
    names = {".".join((package, *path.relative_to(root).with_suffix("").parts)) for path in root.rglob("*.py")}
    names = {name.removesuffix(".__init__").removesuffix(".__main__") for name in names}
    missing = sorted(name for name in names if name not in sys.modules)
    if missing:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(
            f"\n--check-modules: no test of this run imported {', '.join(missing)}: test it in this tier", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
