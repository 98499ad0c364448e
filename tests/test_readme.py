"""Run every command README.md shows, in order, in a scratch folder: the docs cannot rot."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"```(bash|python|yaml)\n(.*?)```", re.S)
FILE_LINE = re.compile(r"# file: (\S+)\n")


def blocks():
    """(language, code) of each fenced block after the Quick start (whose `make` lines run this suite)."""
    tour = README[README.index("## A five-minute tour"):]
    return BLOCK.findall(tour)


def quick_start_commands():
    section = README[README.index("## Quick start"):]
    return [line.split("#")[0].strip() for line in BLOCK.search(section).group(2).splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.hf
@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ran = 0
    for language, code in blocks():
        if language == "yaml":  # a config the next commands read: written where its first line says
            name = FILE_LINE.match(code)
            if name:
                (tmp_path / name.group(1)).write_text(code)
            continue
        if language == "bash":
            for line in code.splitlines():
                if line.strip() and not line.startswith("#"):
                    result = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True)
                    assert result.returncode == 0, f"{line}\n{result.stderr}"
                    ran += 1
        else:
            result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"{code}\n{result.stderr}"
            ran += 1
    assert ran >= 6
    assert (tmp_path / "resnet110.sd.pt").exists() and (tmp_path / "custom.sd.pt").exists()
    assert (tmp_path / "resnet110.onnx").exists() and (tmp_path / "out" / "r110_p08.onnx").exists()
    assert (tmp_path / "sdsurgeon-report" / "junit.xml").exists()
    assert (tmp_path / "bert-tiny.sd.pt").exists() and (tmp_path / "bert-tiny.onnx").exists()
    assert (tmp_path / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # plan --plot
    assert "<svg" in (tmp_path / "schedule.svg").read_text()  # the Python API's plot_schedule
