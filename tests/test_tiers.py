"""The tier checks of conftest.py (--slow-guard, --check-marks) on generated tests: they pass what they should and fail
what they should, with a message that names the marker to add."""

from pathlib import Path

CONFTEST = (Path(__file__).parent / "conftest.py").read_text()
MARKERS = ("compile", "onnx", "multiprocess", "hf", "slow")

GENERATED = """
import subprocess
import time

import pytest


def busy(seconds):
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def test_slow_unmarked():
    busy(0.4)


@pytest.mark.slow
def test_slow_marked_slow():
    busy(0.4)


@pytest.mark.onnx
def test_slow_marked_otherwise():
    busy(0.4)


def test_sleeping_is_not_slow():
    time.sleep(0.4)


def test_quick_unmarked():
    pass


def test_starts_a_process_unmarked():
    subprocess.run(["true"], check=True)


@pytest.mark.multiprocess
def test_starts_a_process_marked():
    subprocess.run(["true"], check=True)
"""


def _run(pytester, *options):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nmarkers =\n" + "".join(f"    {m}\n" for m in MARKERS))
    pytester.makepyfile(test_generated=GENERATED)
    # without hypothesis's plugin, whose end-of-session summary costs seconds
    return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", *options)


def test_slow_guard_fails_a_slow_unmarked_test_and_names_the_marker(pytester):
    result = _run(pytester, "--slow-guard=0.2")
    result.assert_outcomes(passed=6, failed=1)
    result.stdout.fnmatch_lines(["*test_slow_unmarked: its call took * s of CPU (the fast tier's limit is 0.2 s)*"
                                 "add @pytest.mark.slow*"])


def test_check_marks_fails_an_unmarked_test_that_starts_a_process(pytester):
    result = _run(pytester, "--check-marks", "-k", "not slow")
    result.assert_outcomes(passed=2, failed=1, deselected=4)
    result.stdout.fnmatch_lines(["*test_starts_a_process_unmarked: its call does the work of marker(s) multiprocess "
                                 "without them: add @pytest.mark.multiprocess*"])


def test_without_the_options_nothing_is_checked(pytester):
    _run(pytester, "-k", "not slow").assert_outcomes(passed=3, deselected=4)


def test_check_modules_fails_a_session_that_imported_not_every_module_of_the_package(pytester):
    package = pytester.mkpydir("tierpkg")
    (package / "used.py").write_text("VALUE = 1\n")
    (package / "sub").mkdir()
    (package / "sub" / "__init__.py").write_text("")
    (package / "sub" / "unused.py").write_text("VALUE = 2\n")
    (package / "__main__.py").write_text("raise SystemExit('run only as python -m')\n")
    pytester.syspathinsert()
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_uses="import tierpkg.used\n\ndef test_it():\n    assert tierpkg.used.VALUE == 1\n")
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                          "--check-modules=tierpkg")
    assert result.ret == 1
    result.stdout.fnmatch_lines(["--check-modules: no test of this run imported tierpkg.sub, tierpkg.sub.unused: *"])


def test_openmp_threads_sleep_when_idle_so_the_cpu_guard_measures_work_not_spinning(pytestconfig):
    import os

    # The conftest pytest loaded, not a fresh import of it (tests/ is no package: `from tests import conftest`
    # would run it again, after torch, and read True).
    path = Path(__file__).with_name("conftest.py")
    [conftest] = [plugin for plugin in pytestconfig.pluginmanager.get_plugins()
                  if getattr(plugin, "__file__", None) and Path(plugin.__file__) == path]

    # Set before torch loaded: libgomp reads it once. A plugin or fixture that imports torch first undoes it.
    assert not conftest.TORCH_LOADED_BEFORE_CONFTEST
    assert os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"
