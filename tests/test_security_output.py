"""Issue 25 (security, round 2): what the tool writes out. A full disk ends in one error line with no temp file
left; control characters from a file are shown escaped, never sent to the terminal."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import resource
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon.errors import WriteError
from sdsurgeon.io import files
from sdsurgeon.io.files import staged, writing
from sdsurgeon.models import cifar_resnet
from sdsurgeon.pipeline import ConvertOptions, convert
from sdsurgeon.report import JobRecord, to_junit, to_markdown

RESNET8 = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8, "width": 4}']
SHAPE = ["--input-shape", "1,3,8,8"]
TEMP = re.compile(r"^\..+\.sdsurgeon-.+\.tmp$")
ENOSPC = f"{os.strerror(errno.ENOSPC)}; free space or choose another output with -o"


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- 1. a full disk is one line, and leaves nothing -------------------------------------------------------


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write that would pass it fails with ENOSPC, as write(2)
    does (the first bytes are on disk by then, so the temp file is there to be removed)."""

    room = 4096

    def write(self, data) -> int:
        if self.tell() + len(memoryview(data)) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def full_disk_for(monkeypatch, output: str) -> None:
    """The disk is full for the staged temp file of ``output`` (a file name), or for the files in its staged temp
    folder (an ONNX file and its external data): every write sdsurgeon does there goes through ``open``
    (torch.save into the staged file, onnx_ir's save); other files write as usual."""
    real_open = builtins.open

    def staged_for_output(name: str) -> bool:
        return bool(TEMP.match(name)) and name.startswith(f".{output}.")

    def open_(file, mode="r", *args, **kwargs):
        path = os.fspath(file) if isinstance(file, (str, os.PathLike)) else ""
        name, folder = os.path.basename(path), os.path.basename(os.path.dirname(path))
        if "w" in mode and (staged_for_output(name) or staged_for_output(folder)):
            return _FullDisk(file, "wb")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)


def test_full_disk_during_inject_is_one_line_and_leaves_nothing(work, monkeypatch):
    torch.save(cifar_resnet(depth=8, width=4).state_dict(), work / "m.pt")
    before = (work / "m.pt").read_bytes()
    full_disk_for(monkeypatch, "out.sd.pt")
    line = assert_user_error(invoke("inject", work / "m.pt", *RESNET8, "-o", work / "out.sd.pt"))
    assert line == f"error: cannot write {work / 'out.sd.pt'}: {ENOSPC}"
    assert listing(work) == ["m.pt"]  # no output, no temp file
    assert (work / "m.pt").read_bytes() == before


@pytest.mark.onnx
def test_full_disk_during_export_is_one_line_and_leaves_nothing(work, monkeypatch):
    assert_ok(invoke("inject", *RESNET8, *SHAPE, "-o", work / "m.sd.pt"))
    before = (work / "m.sd.pt").read_bytes()
    full_disk_for(monkeypatch, "out.onnx")
    line = assert_user_error(invoke("export", work / "m.sd.pt", "-o", work / "out.onnx"))
    assert line == f"error: cannot write {work / 'out.onnx'}: {ENOSPC}"
    assert listing(work) == ["m.sd.pt"]
    assert (work / "m.sd.pt").read_bytes() == before


def test_full_disk_quoted_by_a_library_is_one_line(work, monkeypatch):
    """safetensors writes from Rust: the OS error reaches Python only as words in its own exception."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*_args, **_kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert_ok(invoke("inject", *RESNET8, *SHAPE, "-o", work / "m.sd.pt"))
    line = assert_user_error(invoke("export", work / "m.sd.pt", "--format", "safetensors", "-o", work / "out.safetensors"))
    assert line == f"error: cannot write {work / 'out.safetensors'}: {ENOSPC}"
    assert listing(work) == ["m.sd.pt"]


def _limit_file_size(size: int):
    def preexec() -> None:  # writes past ``size`` bytes fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return preexec


@pytest.mark.multiprocess
@pytest.mark.parametrize("command, output", [
    pytest.param(["inject", *RESNET8], "out.sd.pt", id="inject"),  # torch.save's zip writer
    pytest.param(["export", *RESNET8, *SHAPE], "out.onnx", id="export",
                 marks=[pytest.mark.onnx, pytest.mark.slow]),  # onnx's protobuf writer
])
def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path, command, output):
    """A real write(2) failing: the output (about 35 kB and 55 kB) is larger than the process may write, what
    it writes before (a built-in --arch needs no trust store entry) is not."""
    proc = subprocess.run([sys.executable, "-m", "sdsurgeon", *command, "-o", output], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size(16 * 1024))
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr == (f"error: cannot write {output}: {os.strerror(errno.EFBIG)}; choose another output with -o "
                           "on a filesystem that takes larger files, or raise ulimit -f\n")
    assert listing(tmp_path) == []


@pytest.mark.onnx
def test_a_full_disk_names_the_output_being_written(work, monkeypatch):
    """export with save_injected stages two outputs: the ONNX writer's failure names the ONNX file, though the
    other output's block, entered last, sees it first."""
    model = sdsurgeon.inject(cifar_resnet(depth=8, width=4).eval(), 0.5, example_inputs=torch.randn(1, 3, 8, 8))
    full_disk_for(monkeypatch, "out.onnx")
    with pytest.raises(WriteError) as raised:
        convert(model, ConvertOptions(), output=work / "out.onnx", save_injected=work / "out.sd.pt")
    assert str(raised.value) == f"cannot write {work / 'out.onnx'}: {ENOSPC}"
    assert listing(work) == []


def test_a_write_failure_is_named_after_its_own_output(tmp_path):
    """Two outputs staged together (export with save_injected): the ONNX writer's full disk names the ONNX
    file, though the other output's block, entered last, sees the failure first."""
    with pytest.raises(WriteError, match=r"cannot write .*a\.onnx: No space left"):
        with staged(tmp_path / "a.onnx") as onnx_tmp, staged(tmp_path / "b.sd.pt") as sd_tmp:
            sd_tmp.write_bytes(b"saved")
            with writing(onnx_tmp):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert listing(tmp_path) == []


def test_a_bug_in_a_staged_block_keeps_its_exception(tmp_path):
    """Only a write failure becomes a WriteError: anything else keeps its type and traceback."""
    with pytest.raises(RuntimeError, match="a bug"):
        with staged(tmp_path / "a.onnx"):
            raise RuntimeError("a bug")
    with pytest.raises(OSError) as raised:
        with staged(tmp_path / "a.onnx"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    assert not isinstance(raised.value, WriteError)
    assert listing(tmp_path) == []


def test_a_library_error_without_errno_is_a_write_failure_only_on_a_full_disk(tmp_path, monkeypatch):
    def fail() -> None:
        with staged(tmp_path / "a.pt"):
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(RuntimeError, match="PytorchStreamWriter"):
        fail()  # this disk has room: not a full disk, so not said to be one
    full = os.statvfs(tmp_path)
    monkeypatch.setattr(os, "statvfs", lambda _folder: os.statvfs_result(
        (full.f_bsize, full.f_frsize, full.f_blocks, 0, 0, full.f_files, full.f_ffree, full.f_favail,
         full.f_flag, full.f_namemax)))
    with pytest.raises(WriteError, match="No space left on device"):
        fail()
    assert listing(tmp_path) == []


# --- 2. control characters from a file are shown escaped ------------------------------------------------

# An OSC that retitles the window (ended by BEL), a colour CSI, and the one-byte C1 CSI.
EVIL = "\x1b]0;pwned\x07\x1b[31m\x9b"
RAW = ("\x1b", "\x07", "\x9b")


def assert_escaped(text: str) -> None:
    assert not [c for c in RAW if c in text], repr(text)
    assert "\\x1b]0;pwned\\x07\\x1b[31m\\x9b" in text, text


def test_a_refused_pickle_global_is_shown_escaped(work):
    """A stranger's file, no trust given: the global it names is quoted in the error."""
    (work / "evil.pt").write_bytes(b"\x80\x02c" + f"os{EVIL}".encode() + b"\nsystem\n.")
    line = assert_user_error(invoke("plan", work / "evil.pt", *RESNET8))
    assert_escaped(line)


def test_a_key_and_file_name_that_do_not_fit_are_shown_escaped(work):
    state = cifar_resnet(depth=8, width=4).state_dict()
    state[f"evil{EVIL}"] = torch.zeros(1)
    bad = work / f"bad{EVIL}.pt"
    torch.save(state, bad)
    line = assert_user_error(invoke("plan", bad, *RESNET8))
    assert "do not fit" in line and "evil" in line, line
    assert_escaped(line)
    assert line.count("\\x1b]0;pwned") == 2  # the file's name and the key


def _pickled_with_a_hostile_block_name(path: Path, name: str = f"blk{EVIL}") -> str:
    """A pickled CIFAR ResNet-8 whose first block is called ``name``; returns that block's path."""
    model = cifar_resnet(depth=8, width=4)
    model.layers._modules = OrderedDict((name if k == "0" else k, m) for k, m in model.layers._modules.items())
    torch.save(model, path)
    return f"layers.{name}"


def test_a_size_mismatch_quoting_a_key_is_shown_escaped(work):
    block = _pickled_with_a_hostile_block_name(work / "model.pt")
    state = torch.load(work / "model.pt", weights_only=False).state_dict()
    state[f"{block}.conv1.weight"] = torch.zeros(1)  # torch's message names the key as it is
    torch.save(state, work / "weights.pt")
    line = assert_user_error(invoke("plan", work / "model.pt", "--trust-pickle", "--weights", work / "weights.pt"))
    assert "size mismatch for layers.blk" in line, line
    assert_escaped(line)


def test_a_module_name_in_the_plan_table_is_shown_escaped_and_json_keeps_it_escaped(work):
    _pickled_with_a_hostile_block_name(work / "model.pt")
    result = invoke("plan", work / "model.pt", "--trust-pickle", *SHAPE)
    assert_ok(result)
    shown = result.stdout + result.stderr
    assert not [c for c in RAW if c in shown], repr(shown)
    assert "layers.blk\\x1b]0;pwned" in shown, shown  # the table folds a long id: its first part, escaped
    result = invoke("plan", work / "model.pt", "--trust-pickle", "--json")
    assert_ok(result)
    assert not [c for c in RAW if c in result.stdout + result.stderr], repr(result.stdout)
    assert json.loads(result.stdout)["sites"][0]["id"] == f"layers.blk{EVIL}:add"  # the name itself, in JSON


def test_a_name_that_looks_like_rich_markup_is_shown_as_it_is(work):
    """Rich markup in a name is text: a stray closing tag is no MarkupError, an opening one styles nothing."""
    _pickled_with_a_hostile_block_name(work / "[bold]m.pt", name="[/x]")
    result = invoke("plan", work / "[bold]m.pt", "--trust-pickle")
    assert_ok(result)
    assert "residual sites of " in result.stdout and "[bold]m.pt" in result.stdout, result.stdout
    assert "layers.[/x]:add" in result.stdout, result.stdout


def test_reports_show_control_characters_escaped():
    """A failed batch job's message quotes its file: junit.xml stays well-formed XML, summary.md plain text."""
    record = JobRecord("m", "failed", error=f"the weights in bad{EVIL}.pt do not fit")
    junit = to_junit([record])
    failure = ET.fromstring(junit.split("?>", 1)[1]).find(".//failure")
    assert failure is not None
    assert_escaped(failure.get("message"))
    assert_escaped(to_markdown([record]))
