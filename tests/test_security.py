"""Issue 14: a hostile file, folder or config runs no code and destroys nothing; every failure is one line.

Where the behaviour depends on the process (sys.path, stdin, signals) the command runs in a subprocess;
elsewhere through typer's CliRunner or the library. Canary files are written by code that must never run.
"""

from __future__ import annotations

import json
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

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon.errors import LoadError, UnsafeLoadError, WriteError
from sdsurgeon.files import atomic_write, check_output

RESNET8 = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8, "width": 4}']
SCRIPT = Path(sys.executable).with_name("sdsurgeon")  # the console script of this venv

# A module that must never be imported: it leaves <canary> at import and <canary>.init when its Net is built.
HOSTILE_MODULE = """
import pathlib
pathlib.Path({canary!r}).write_text("imported")
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        pathlib.Path({canary!r} + ".init").write_text("constructed")
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(x)
"""

# The user's own architecture module, in the folder they work in.
USER_MODULE = """
import torch

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(8, 8)
        self.fc2 = torch.nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(), Block())
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.blocks(x))

def net():
    return Net()
"""


def cli(*args, cwd: Path, script: bool = False, stdin: str | None = None, timeout: float = 300):
    """The real command in a subprocess (environment inherited: this test's trust store)."""
    command = [str(SCRIPT)] if script else [sys.executable, "-m", "sdsurgeon"]
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          input=stdin if stdin is not None else "", timeout=timeout)


def assert_one_error_line(proc) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def sd_file(path: Path, arch: str, state: dict | None = None, arch_kwargs: dict | None = None,
            recipe: dict | None = None, **payload) -> Path:
    """An sdsurgeon file as anyone could write it."""
    torch.save({"format": "sdsurgeon", "version": 1, "recipe": recipe, "state_dict": state or {},
                "source": {"kind": "arch", "arch": arch, "arch_kwargs": arch_kwargs or {}}, **payload}, path)
    return path


@pytest.fixture
def own_imports(monkeypatch):
    """sys.path and sys.modules as they were, after a test that imports modules from its own folders."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        del sys.modules[name]


def hostile_folder(folder: Path, name: str = "evilmod") -> Path:
    """``folder`` holding a hostile ``name``.py and the canary path it would write."""
    folder.mkdir(parents=True, exist_ok=True)
    canary = folder / f"{name}.ran"
    (folder / f"{name}.py").write_text(HOSTILE_MODULE.format(canary=str(canary)))
    return canary


# --- 6. outputs are regular files only -------------------------------------------------------------------

def test_item6_output_that_is_a_fifo_or_a_device_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    device = tmp_path / "null"
    device.symlink_to(os.devnull)  # what -o /dev/null would reach, without risking the real one
    for target, kind in ((fifo, "FIFO"), (device, "character device")):
        line = assert_user_error(invoke("inject", *RESNET8, "-o", target))
        assert kind in line and "regular file" in line, line
        with pytest.raises(WriteError, match=kind):
            atomic_write(target, lambda f: f.write(b"x"))
    assert fifo.is_fifo() and device.is_symlink() and Path(os.devnull).is_char_device()


# --- 8. no temp file outlives a run ---------------------------------------------------------------------

TEMP = re.compile(r"^\.m\.onnx\..*\.tmp$")


BIG = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 56, "width": 8}']  # seconds to export


def _export_until_its_temp_file_exists(folder: Path, command: list | None = None):
    out = folder / "out"
    out.mkdir()
    command = command or ["export", *BIG, "--input-shape", "1,3,32,32", "-o", out / "m.onnx"]
    proc = subprocess.Popen([sys.executable, "-m", "sdsurgeon", *command], cwd=folder,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        temps = [p for p in out.iterdir() if TEMP.match(p.name)]
        if temps:
            return proc, out, temps[0]
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no temp file appeared (rc {proc.poll()}): {proc.communicate()}")


@pytest.mark.slow
def test_item8_sigterm_during_export_leaves_no_temp_file(tmp_path):
    proc, out, _temp = _export_until_its_temp_file_exists(tmp_path)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.slow
def test_item8_sigterm_to_a_batch_stops_its_workers_and_leaves_no_temp_file(tmp_path):
    (tmp_path / "cfg.yaml").write_text("defaults: {input_shape: [1, 3, 32, 32]}\nmodels:\n"
                                       "  - {name: m, arch: 'sdsurgeon.models:cifar_resnet', arch_kwargs: {depth: 56, width: 8}}\n")
    proc, out, _temp = _export_until_its_temp_file_exists(tmp_path, ["batch", "cfg.yaml", "--report-dir", "reports"])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    deadline = time.monotonic() + 60  # the worker removes its own temp file as it stops
    while time.monotonic() < deadline and list(out.iterdir()):
        time.sleep(0.1)
    assert sorted(p.name for p in out.iterdir()) == []


@pytest.mark.slow
def test_item8_temp_file_of_a_killed_run_is_swept_by_the_next(tmp_path, monkeypatch):
    proc, out, temp = _export_until_its_temp_file_exists(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert temp.exists()  # SIGKILL: nothing could clean up
    assert f"-{proc.pid}-" in temp.name  # its name says whose it is
    live = out / temp.name.replace(f"-{proc.pid}-", f"-{os.getpid()}-")  # the same name, owned by a live process
    live.write_bytes(b"")
    foreign = out / ".m.onnx.not-ours.tmp"
    foreign.write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    assert_ok(invoke("inject", *RESNET8, "-o", out / "m.sd.pt"))
    assert not temp.exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, foreign.name, "m.sd.pt"])
