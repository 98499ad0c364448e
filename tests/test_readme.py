"""Run every command README.md and the docs pages show, in order, in a scratch folder: the docs cannot rot.

README's five-minute tour runs in one folder; each page of docs/ runs its blocks in order in a folder of its own
(a page makes the files it needs, a checkpoint included, with a block of its own). A block runs when its fence
says bash, python or yaml (written to the file its first line `# file: NAME` names); output samples say text,
console or json. Any other fence, or a run fence this file would not find, fails
test_every_code_block_is_run_or_marked_as_not_run, so a block cannot be skipped silently.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
BLOCK = re.compile(r"```(bash|python|yaml)\n(.*?)```", re.S)
FILE_LINE = re.compile(r"# file: (\S+)\n")
RUN = {"bash", "python", "yaml"}
NOT_RUN = {"text", "console", "json"}  # output samples and commands shown with their prompt, never run
FENCE = re.compile(r"^\s*(`{3,}|~{3,})(.*)$")


def blocks():
    """(language, code) of each fenced block after the Quick start (whose `make` lines run this suite)."""
    tour = README[README.index("## A five-minute tour"):]
    return BLOCK.findall(tour)


def doc_pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def quick_start_commands():
    section = README[README.index("## Quick start"):]
    return [line.split("#")[0].strip() for line in BLOCK.search(section).group(2).splitlines() if line.strip()]


def fences(text: str) -> list[tuple[int, str]]:
    """(line number, language) of every fenced block's opening fence."""
    found, open_fence = [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if not match:
            continue
        if open_fence is None:
            open_fence = match.group(1)
            found.append((number, match.group(2).strip()))
        elif match.group(1).startswith(open_fence) and not match.group(2).strip():
            open_fence = None
    assert open_fence is None, "a fenced block is never closed"
    return found


def run_blocks(code_blocks, folder: Path) -> int:
    """Run (language, code) blocks in order in ``folder``, as a reader would; the number of commands run."""
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    ran = 0
    for language, code in code_blocks:
        if language == "yaml":  # a config the next commands read: written where its first line says
            (folder / FILE_LINE.match(code).group(1)).write_text(code)
            continue
        if language == "bash":
            for line in code.splitlines():
                if line.strip() and not line.startswith("#"):
                    result = subprocess.run(["bash", "-c", line], cwd=folder, env=env, capture_output=True, text=True)
                    assert result.returncode == 0, f"{line}\n{result.stderr}"
                    ran += 1
        else:
            result = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"{code}\n{result.stderr}"
            ran += 1
    return ran


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = quick_start_commands()
    assert commands == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_every_code_block_is_run_or_marked_as_not_run():
    tour_at = README.index("## A five-minute tour")
    head = README[:tour_at]
    # Before the tour: the Quick start's `make` lines (the test above) and commands shown with a prompt.
    assert [language for _, language in fences(head) if language not in NOT_RUN] == ["bash"]
    assert BLOCK.search(head).start() > head.index("## Quick start")
    offset = head.count("\n")
    run = [("README.md", README[tour_at:], offset)] + [(f"docs/{p.relative_to(DOCS)}", p.read_text(), 0) for p in doc_pages()]
    for where, text, offset in run:
        opened = fences(text)
        for number, language in opened:
            assert language in RUN | NOT_RUN, (
                f"{where}:{number + offset}: a ```{language} block is neither run by tests/test_readme.py "
                f"({', '.join(sorted(RUN))}) nor marked as not run ({', '.join(sorted(NOT_RUN))})")
        found = BLOCK.findall(text)
        assert len(found) == sum(language in RUN for _, language in opened), (
            f"{where}: a run block that this file would not find (indented, or more after its language)")
        for language, code in found:
            assert language != "yaml" or FILE_LINE.match(code), f"{where}: a yaml block without `# file: NAME` first"


@pytest.mark.hf
@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_readme_commands_run(tmp_path):
    ran = run_blocks(blocks(), tmp_path)
    assert ran >= 6
    assert (tmp_path / "resnet110.sd.pt").exists() and (tmp_path / "custom.sd.pt").exists()
    assert (tmp_path / "resnet110.onnx").exists() and (tmp_path / "out" / "r110_p08.onnx").exists()
    assert (tmp_path / "sdsurgeon-report" / "junit.xml").exists()
    assert (tmp_path / "bert-tiny.sd.pt").exists() and (tmp_path / "bert-tiny.onnx").exists()
    assert (tmp_path / "schedule.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # plan --plot


# What some pages' blocks leave behind, checked beyond their exit codes.
PAGE_OUTPUTS = {"python-api.md": ["m.sd.pt", "m.onnx", "schedule.svg"]}


# Marked like the tour: a page's blocks start processes and may export ONNX or build transformers models.
@pytest.mark.hf
@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("page", [p.relative_to(DOCS).as_posix() for p in doc_pages() if BLOCK.search(p.read_text())])
def test_docs_page_commands_run(page, tmp_path):
    assert run_blocks(BLOCK.findall((DOCS / page).read_text()), tmp_path) >= 1
    for name in PAGE_OUTPUTS.get(page, []):
        assert (tmp_path / name).exists(), name
    if page == "python-api.md":
        assert "<svg" in (tmp_path / "schedule.svg").read_text()  # plot_schedule


# README's first command, `make demo`, is this script: the main job end to end on the built-in ResNet-110.
@pytest.mark.onnx
@pytest.mark.multiprocess
@pytest.mark.slow
def test_make_demo_runs_the_main_job_end_to_end(tmp_path):
    assert "examples/quickstart.py" in (ROOT / "Makefile").read_text()  # what `make demo` runs
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("resnet110.pt", "resnet110.sd.pt", "trained.pt", "resnet110.onnx"):
        assert (tmp_path / name).is_file(), name
    # a CIFAR ResNet-110 has 3 stages of 18 basic blocks: 54 residual adds, every one gated and folded
    assert re.search(r"residual sites gated:\s+54 of 54", done.stdout), done.stdout[-2000:]
    assert "folded 54 of 54 gates into weights; 0 kept as a multiply" in done.stdout
