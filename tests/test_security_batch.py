"""Issue 25, batch and configs: duplicate YAML keys, non-finite numbers, `--check` in linear time, Ctrl-C, a hostile
current folder in the workers, and `trust_pickle` only on the command line's word.

Each failure is one `error: ...` line and exit 1. Where the behaviour depends on the process (signals, the
current folder of spawned workers) the real command runs in a subprocess; elsewhere through typer's CliRunner.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon.batch.config import load_config, plan_jobs
from sdsurgeon.batch.runner import run_batch
from sdsurgeon.errors import ConfigError
from sdsurgeon.io.trust import load_yaml
from sdsurgeon.pipeline import ConvertOptions

RESNET8 = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8, "width": 4}']
ENTRY = "{name: a, arch: 'sdsurgeon.models:cifar_resnet', arch_kwargs: {depth: 8, width: 4}}"
TEMP = re.compile(r"\.sdsurgeon-.*\.tmp$")


def write(folder: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


# --- 1. a key given twice in a YAML mapping ------------------------------------------------------------


@pytest.mark.parametrize("text, at, key, first", [
    # trust_pickle twice: the last (false) would win without a word
    ("defaults:\n  trust_pickle: true\n  pL: 0.5\n  trust_pickle: false\nmodels:\n  - " + ENTRY + "\n",
     4, "trust_pickle", 2),
    ("defaults: {pL: 0.5}\nmodels:\n  - " + ENTRY + "\ndefaults: {pL: 0.9}\n", 4, "defaults", 1),
    ("models:\n  - {name: a, arch: 'sdsurgeon.models:cifar_resnet', arch_kwargs: {depth: 8, depth: 20}}\n",
     2, "depth", 2),  # in a flow mapping, inside a list, two levels down
    ("models:\n  - name: a\n    arch: 'sdsurgeon.models:cifar_resnet'\n    pL: 0.5\n    pL: 0.7\n", 5, "pL", 4),
], ids=["trust_pickle", "top-level", "nested-flow", "entry"])
def test_duplicate_key_is_refused_naming_file_line_and_key(tmp_path, text, at, key, first):
    cfg = write(tmp_path, text)
    line = assert_user_error(invoke("batch", cfg, "--check"))
    assert f"cfg.yaml:{at}: duplicate key '{key}' (also at line {first})" in line, line


def test_duplicate_key_error_keeps_its_parts_and_a_merge_key_is_no_duplicate():
    with pytest.raises(ConfigError) as caught:
        load_yaml("a:\n  b: [{c: 1}, {c: 2, d: 3, c: 4}]\n", "x.yaml")
    assert (caught.value.what, caught.value.where) == ("duplicate key 'c' (also at line 2)", "x.yaml:2")
    data, _ = load_yaml("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n", "x.yaml")  # << brings keys in on purpose
    assert data["d"] == {"x": 3, "y": 2}


# --- 2. non-finite numbers -------------------------------------------------------------------------------


def test_non_finite_tolerances_on_the_command_line_are_refused_before_any_work(work):
    for option, value in (("--atol", "nan"), ("--rtol", "inf"), ("--rtol", "-inf"), ("--atol", "-1")):
        line = assert_user_error(invoke("export", *RESNET8, "--input-shape", "1,3,8,8", option, value,
                                        "-o", work / "m.onnx"))
        assert line.startswith(f"error: {option} must be a finite number, zero or more"), line
    line = assert_user_error(invoke("plan", *RESNET8, "--pL", "nan"))
    assert "--pL" in line and "nan" in line, line
    assert list(work.iterdir()) == []


def test_convert_options_refuse_non_finite_tolerances_for_every_caller():
    for name in ("rtol", "atol"):
        for value in (float("nan"), float("inf"), -1.0):
            with pytest.raises(ConfigError) as caught:
                ConvertOptions(**{name: value})
            assert caught.value.option == f"--{name}" and "finite" in caught.value.what
    assert ConvertOptions(rtol=0, atol=0).rtol == 0  # zero is an exact check, not an error


def test_non_finite_numbers_in_a_config_are_refused_naming_line_and_key(tmp_path):
    for option, where, value, words in (
        ("rtol", "defaults", ".nan", "rtol: must be a finite number"),
        ("atol", "entry", ".inf", "atol: must be a finite number"),
        ("atol", "defaults", "-.inf", "atol: must be a finite number"),
        ("timeout", "entry", ".nan", "timeout: must be a positive number of seconds"),
        ("timeout", "defaults", ".inf", "timeout: must be a positive number of seconds"),
        ("pL", "entry", ".nan", "pL: nan is outside (0, 1]"),
    ):
        if where == "defaults":
            text, at = f"defaults:\n  input_shape: [1, 3, 8, 8]\n  {option}: {value}\nmodels:\n  - {ENTRY}\n", 3
        else:
            text, at = (f"models:\n  - name: a\n    arch: 'sdsurgeon.models:cifar_resnet'\n    {option}: {value}\n"
                        "    input_shape: [1, 3, 8, 8]\n", 4)
        line = assert_user_error(invoke("batch", write(tmp_path, text), "--check"))
        assert f"cfg.yaml:{at}: {words}" in line, (option, where, value, line)


# --- 3. --check in time linear in the jobs -----------------------------------------------------------------


@pytest.mark.slow
def test_check_of_2000_jobs_looks_at_each_path_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Every job's outputs against every job's inputs used to stat and resolve every input once per output
    (2000 jobs: minutes); the inputs' identities are worked out once now. Counted, not timed; and an output
    that is an input (a hard link) is still found, at the last job."""
    jobs = 2000
    (tmp_path / "w.pt").write_bytes(b"")  # every job's weights: --check reads no file, it needs one to exist
    cfg = write(tmp_path, "defaults: {input_shape: [1, 3, 8, 8]}\nmodels:\n" + "".join(
        f"  - {{name: m{i}, arch: 'sdsurgeon.models:cifar_resnet', weights: w.pt}}\n" for i in range(jobs)))
    budget = 20 * jobs  # a few per job and output (about 13 now); the old way was ~4 jobs squared
    calls = {"n": 0}

    def counted(real):
        def call(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > budget:  # fail at once, not after minutes
                raise AssertionError(f"more than {budget} stat/realpath calls for {jobs} jobs")
            return real(*args, **kwargs)
        return call

    def check():
        calls["n"] = 0
        with monkeypatch.context() as patch:
            patch.setattr(os.path, "realpath", counted(os.path.realpath))
            patch.setattr(os, "stat", counted(os.stat))
            result = invoke("batch", cfg, "--check")
        assert calls["n"] <= budget
        return result

    results = [check()]
    (tmp_path / "out").mkdir()
    os.link(tmp_path / "w.pt", tmp_path / "out" / f"m{jobs - 1}.onnx")  # the last job's output is the input
    results.append(check())
    assert_ok(results[0])
    assert f"valid, {jobs} jobs" in results[0].stdout
    line = assert_user_error(results[1])
    assert f"job m{jobs - 1}: output" in line and "(the same file)" in line, line


# --- 4. Ctrl-C ------------------------------------------------------------------------------------------

SLOW_CONFIG = ("defaults: {input_shape: [1, 3, 32, 32]}\nmodels:\n"  # seconds to export: time to interrupt it
               "  - {name: m, arch: 'sdsurgeon.models:cifar_resnet', arch_kwargs: {depth: 56, width: 8}}\n")


def _batch_until_a_worker_writes(folder: Path) -> subprocess.Popen:
    """`sdsurgeon batch` in its own process group, once its worker's temp ONNX file exists."""
    write(folder, SLOW_CONFIG)
    out = folder / "out"
    out.mkdir()
    # As a terminal's foreground job starts it: SIGINT at its default. A test run started in the background of a
    # non-interactive shell has SIGINT ignored, which a child inherits (and Python then keeps ignoring it).
    proc = subprocess.Popen([sys.executable, "-m", "sdsurgeon", "batch", "cfg.yaml", "--report-dir", "reports"],
                            cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(TEMP.search(p.name) for p in out.iterdir()):
            return proc
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no temp file appeared (rc {proc.poll()}): {proc.communicate()}")


@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("to", ["process-group", "parent-only"])
def test_ctrl_c_stops_a_batch_with_one_line_and_no_temp_file(tmp_path, to):
    """A terminal's Ctrl-C reaches the whole process group (the workers too); `kill -INT` the parent alone."""
    proc = _batch_until_a_worker_writes(tmp_path)
    try:
        if to == "process-group":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        deadline = time.monotonic() + 30  # the workers are gone too, not left running on their own
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            pytest.fail("a process of the batch outlived it")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, (proc.returncode, stdout, stderr)
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    lines = stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: interrupted"), stderr
    assert stdout == "", stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if TEMP.search(p.name)) == []
    assert not (tmp_path / "out" / "m.onnx").exists()


# --- 5. the workers never import from the current folder ------------------------------------------------

# Imported by a spawned worker (`python -c 'from multiprocessing.spawn import ...'`) before it has the parent's
# sys.path; the parent drops the current folder before it imports either.
HOSTILE = "import pathlib\npathlib.Path({canary!r}).write_text('imported')\n"


@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_batch_workers_never_import_from_the_current_folder(tmp_path):
    canaries = []
    for name in ("multiprocessing", "pickle"):
        canaries.append(tmp_path / f"{name}.ran")
        (tmp_path / f"{name}.py").write_text(HOSTILE.format(canary=str(canaries[-1])))
    write(tmp_path, "defaults: {input_shape: [1, 3, 8, 8]}\nmodels:\n  - " + ENTRY + "\n")
    proc = subprocess.run([sys.executable, "-m", "sdsurgeon", "batch", "cfg.yaml", "--json"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert [c.name for c in canaries if c.exists()] == [], proc.stderr
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert (tmp_path / "out" / "a.onnx").is_file()


# --- 6. trust_pickle: the command line's word, not the config's ----------------------------------------


@pytest.mark.parametrize("where", ["defaults", "entry"])
def test_a_config_cannot_grant_itself_trust_pickle(tmp_path, where):
    if where == "defaults":
        text, at = "defaults:\n  input_shape: [1, 3, 8, 8]\n  trust_pickle: true\nmodels:\n  - " + ENTRY + "\n", 3
    else:
        text, at = ("defaults: {input_shape: [1, 3, 8, 8]}\nmodels:\n  - name: a\n"
                    "    arch: 'sdsurgeon.models:cifar_resnet'\n    trust_pickle: true\n", 5)
    cfg = write(tmp_path, text)
    line = assert_user_error(invoke("batch", cfg, "--check"))
    assert f"cfg.yaml:{at}: trust_pickle:" in line and "--trust-pickle" in line, line
    assert_ok(invoke("batch", cfg, "--check", "--trust-pickle"))
    assert_ok(invoke("batch", write(tmp_path, text.replace("true", "false"), "off.yaml"), "--check"))


def test_the_library_has_the_same_rule(tmp_path):
    cfg = write(tmp_path, "defaults: {trust_pickle: true, input_shape: [1, 3, 8, 8]}\nmodels:\n  - " + ENTRY + "\n")
    with pytest.raises(ConfigError, match="--trust-pickle"):
        load_config(cfg)
    jobs = plan_jobs(load_config(cfg, allow_trust_pickle=True))
    with pytest.raises(ConfigError, match="job a: trust_pickle"):  # refused before any worker starts
        run_batch(jobs)


@pytest.mark.onnx
@pytest.mark.multiprocess
def test_trust_pickle_with_the_flag_loads_a_pickled_model(tmp_path):
    from sdsurgeon.models import cifar_resnet

    torch.save(cifar_resnet(8, width=4), tmp_path / "full.pt")  # a whole pickled model
    cfg = write(tmp_path, "defaults: {input_shape: [1, 3, 8, 8], trust_pickle: true}\nmodels:\n"
                          "  - {name: pickled, checkpoint: full.pt}\n")
    result = invoke("batch", cfg, "--trust-pickle", "--report-dir", tmp_path / "reports")
    assert_ok(result)
    assert (tmp_path / "out" / "pickled.onnx").is_file()
