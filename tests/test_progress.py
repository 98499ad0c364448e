"""Progress: the stages the pipeline reports to a ``Progress``, and the CLI drawing them on stderr only where it is a
terminal (never on stdout, never with --quiet or --json, never into a pipe or a CI log); batch's jobs through it too."""

from __future__ import annotations

import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_ok, invoke
from sdsurgeon import pipeline
from sdsurgeon.batch.config import load_config, plan_jobs
from sdsurgeon.batch.runner import run_batch
from sdsurgeon.capture.inputs import InputSpec
from sdsurgeon.progress import SILENT, Progress

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `--arch archs:...`; spawned batch workers inherit sys.path
    sys.path.insert(0, str(TESTS_DIR))

TINY = ["--arch", "archs:tiny_resnet"]  # two residual blocks, input (N, 8)
PLAN_STAGES = ["load model", "capture", "count FLOPs", "detect residual blocks", "place the gates"]
CURSOR = re.compile(r"\x1b\[(\?25[lh]|\d*[AK])")  # what redraws a line in place: never on stdout


class Recording(Progress):
    """Every report, in order: ("start", name, total), ("advance", name, steps), ("end", name)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.count = 0

    def start(self, name, total=None):
        self.count += 1
        self.events.append(("start", name, total))
        return (self.count, name)

    def advance(self, handle, steps=1):
        self.events.append(("advance", handle[1], steps))

    def end(self, handle):
        self.events.append(("end", handle[1]))

    def started(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "start"]

    def assert_started_in_order(self, *names: str) -> None:
        """``names`` were started in this order (other stages may come between: a new stage breaks no test)."""
        started = iter(self.started())
        assert all(name in started for name in names), (names, self.started())

    def advances(self, name: str) -> int:
        return sum(e[2] for e in self.events if e[0] == "advance" and e[1] == name)

    def assert_nested(self) -> None:
        """Each stage ends once, the innermost first, and none is left open."""
        open_: list[str] = []
        for event in self.events:
            if event[0] == "start":
                open_.append(event[1])
            elif event[0] == "end":
                assert open_ and open_[-1] == event[1], (event, open_, self.events)
                open_.pop()
            else:
                assert event[1] in open_, (event, self.events)
        assert not open_, open_


def screen(text: str) -> list[str]:
    """The lines a terminal shows after ``text``: carriage returns, line erases and cursor-ups applied."""
    lines, row = [""], 0
    for m in re.finditer(r"\x1b\[([0-9;?]*)([A-Za-z])|\r|\n|[^\x1b\r\n]+", text):
        token = m.group()
        if m.group(2) == "K":
            lines[row] = ""  # rich erases whole lines (2K) before redrawing them
        elif m.group(2) == "A":
            row = max(0, row - int(m.group(1) or 1))
        elif m.group(2):
            continue  # colours, cursor shown/hidden
        elif token == "\r":
            continue  # always followed by an erase or by text from the line's start here
        elif token == "\n":
            row += 1
            lines += [""] * (row + 1 - len(lines))
        else:
            lines[row] += token
    return [line for line in lines if line.strip()]


@pytest.fixture
def terminal(monkeypatch):
    """stderr taken for a terminal, as a real one is: rich's TTY_COMPATIBLE=1 (CliRunner's streams are no tty)."""
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("TERM", "xterm-256color")
    monkeypatch.delenv("FORCE_COLOR", raising=False)


@pytest.fixture
def no_terminal(monkeypatch):
    for name in ("TTY_COMPATIBLE", "FORCE_COLOR"):
        monkeypatch.delenv(name, raising=False)


# --- the library: stages reported in order, nested, none left open ---------------------------------------


def test_the_silent_default_reports_nothing_and_its_stage_yields_an_advance():
    with SILENT.stage("x", total=2) as advance:
        advance()
        advance(2)


def test_plan_with_a_prune_curve_reports_its_stages_in_order_and_one_advance_per_point():
    progress = Recording()
    result = pipeline.plan(pipeline.ModelRef(arch="archs:tiny_resnet"), pipeline.SurgeryOptions(),
                           [InputSpec(None, (2, 8))], curve=pipeline.CurveOptions(), progress=progress)
    blocks = result.plan.num_sites
    assert blocks == 2 and len(result.curve.points) == blocks + 1
    progress.assert_started_in_order(*PLAN_STAGES, "inject gates for the prune curve", "capture", "count FLOPs",
                                     "detect residual blocks", "rewrite the blocks", "prune curve")
    assert progress.started()[0] == "load model" and progress.started()[-1] == "prune curve"
    assert ("start", "prune curve", blocks + 1) in progress.events
    assert progress.advances("prune curve") == blocks + 1
    progress.assert_nested()


def test_a_failing_plan_still_ends_the_stage_it_failed_in(tmp_path):
    progress = Recording()
    with pytest.raises(Exception):
        pipeline.plan(pipeline.ModelRef(arch="archs:tiny_resnet"), pipeline.SurgeryOptions(),
                      [InputSpec(None, (2, 5))], progress=progress)  # (2, 5) does not fit Linear(8, 8)
    assert progress.started()[0] == "load model"
    progress.assert_nested()


def test_inject_reports_load_surgery_and_write(tmp_path):
    progress = Recording()
    pipeline.inject(pipeline.ModelRef(arch="archs:tiny_resnet"), pipeline.SurgeryOptions(),
                    [InputSpec(None, (2, 8))], output=tmp_path / "m.sd.pt", progress=progress)
    progress.assert_started_in_order("load model", "capture", "count FLOPs", "detect residual blocks",
                                     "rewrite the blocks", "write the injected model")
    progress.assert_nested()


@pytest.mark.onnx
def test_convert_reports_load_fold_export_and_verify(tmp_path):
    progress = Recording()
    timings: dict[str, float] = {}
    pipeline.convert(pipeline.ModelRef(arch="archs:tiny_resnet"), pipeline.ConvertOptions(compare=True),
                     [InputSpec(None, (2, 8))], output=tmp_path / "m.onnx", timings=timings,
                     progress=progress)
    progress.assert_started_in_order("load model", "fold the gates", "export ONNX", "verify with onnxruntime")
    # a model without gates: the export already is the ungated model's, so --compare takes its node count from it
    assert "export the model without gates (--compare)" not in progress.started()
    assert set(timings) == {"load", "fold", "export", "verify"}  # the keys batch's records use, unchanged
    progress.assert_nested()


@pytest.mark.onnx
@pytest.mark.parametrize("fold", [True, False], ids=["fold", "no-fold"])
def test_compare_exports_the_ungated_model_again_only_when_the_gates_left_ops_behind(fold, tmp_path):
    import sdsurgeon
    from archs import tiny_resnet

    gated = sdsurgeon.inject(tiny_resnet(), 0.5, example_inputs=torch.randn(2, 8))
    progress = Recording()
    result = pipeline.convert(gated, pipeline.ConvertOptions(compare=True, fold=fold), [InputSpec(None, (2, 8))],
                              output=tmp_path / "m.onnx", progress=progress)
    compare = "export the model without gates (--compare)"
    # folded into weights, each block runs its own code again: the export already has the ungated ops; kept as
    # multiplies (--no-fold), it does not, and the ungated model is exported for its count
    assert (compare in progress.started()) is (not fold)
    assert (result.original_nodes == result.exported.nodes) is fold
    plain = sdsurgeon.export_onnx(tiny_resnet(), torch.randn(2, 8), tmp_path / "plain.onnx")
    assert result.original_nodes == plain.nodes  # the count --compare reports is the ungated architecture's
    progress.assert_nested()


# --- the CLI: stderr only, and only on a terminal ------------------------------------------------------------


def test_no_progress_where_stderr_is_no_terminal_and_json_stays_pure(no_terminal, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # colours asked for (CI logs often do): still no progress
    result = invoke("plan", *TINY, "--input-shape", "2,8", "--prune-curve", "--json")
    assert_ok(result)
    assert result.stderr == ""
    assert json.loads(result.stdout)["num_sites"] == 2  # the whole of stdout is one JSON object
    result = invoke("plan", *TINY, "--input-shape", "2,8")
    assert_ok(result)
    assert result.stderr == ""


def test_on_a_terminal_the_stages_show_on_stderr_only_and_leave_nothing_behind(terminal):
    result = invoke("plan", *TINY, "--input-shape", "2,8", "--prune-curve")
    assert_ok(result)
    for name in [*PLAN_STAGES, "prune curve"]:
        assert name in result.stderr, (name, result.stderr)
    assert re.search(r"prune curve .*0/3", result.stderr), result.stderr  # points counted: L + 1 = 3
    assert "residual sites of archs:tiny_resnet" in result.stdout
    for name in ["load model", "count FLOPs", "detect residual blocks", "place the gates"]:
        assert name not in result.stdout, (name, result.stdout)
    assert not CURSOR.search(result.stdout), result.stdout
    assert screen(result.stderr) == [], "the progress lines must be erased once the work is done"


@pytest.mark.parametrize("flag", ["--quiet", "-q", "--json"])
def test_quiet_and_json_turn_the_progress_off_on_a_terminal(terminal, flag):
    result = invoke("plan", *TINY, "--input-shape", "2,8", flag)
    assert_ok(result)
    assert result.stderr == ""
    assert ("residual sites" in result.stdout) == (flag != "--json")


def test_quiet_does_not_silence_errors(terminal):
    result = invoke("plan", *TINY, "--input-shape", "2,5", "--quiet")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: ") and result.stdout == ""


def test_inject_shows_its_stages_on_a_terminal(terminal, work):
    result = invoke("inject", *TINY, "--input-shape", "2,8", "-o", "m.sd.pt")
    assert_ok(result)
    for name in ["load model", "rewrite the blocks", "write the injected model"]:
        assert name in result.stderr, (name, result.stderr)
    assert "wrote m.sd.pt" in result.stdout and "rewrite the blocks" not in result.stdout
    assert screen(result.stderr) == []


@pytest.mark.parametrize("command", ["plan", "inject", "export", "batch"])
def test_help_explains_quiet(command):
    result = invoke(command, "--help")
    assert_ok(result)
    text = " ".join(result.stdout.replace("│", " ").split())
    assert "--quiet" in text and "-q" in text and "Show no progress" in text and "stderr" in text


# --- batch: jobs done, and each running job with the stage its worker is in -------------------------------


def _jobs(folder: Path, names=("a", "b")):
    cfg = folder / "cfg.yaml"
    cfg.write_text(textwrap.dedent("""
        defaults:
          input_shape: [1, 8]
        models:
    """).lstrip("\n") + "".join(f"  - name: {n}\n    arch: archs:tiny_resnet\n" for n in names))
    return plan_jobs(load_config(cfg))


def test_batch_counts_up_to_date_jobs_as_done_without_starting_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    jobs = _jobs(tmp_path)
    for job in jobs:  # what a successful run leaves: skipped, no worker needed
        Path(job.output_path).parent.mkdir(parents=True, exist_ok=True)
        Path(job.output_path).write_bytes(b"stands in for an ONNX file")
        Path(job.stamp_path).write_text(json.dumps({"settings_hash": job.settings_hash(), "outputs": job.outputs}))
    progress, events = Recording(), []
    result = run_batch(jobs, on_event=events.append, progress=progress)
    assert [r.status for r in result.records] == ["skipped", "skipped"]
    assert progress.events == [("start", "jobs", 2), ("advance", "jobs", 1), ("advance", "jobs", 1), ("end", "jobs")]
    assert [(e.kind, e.job) for e in events] == [("done", "a"), ("done", "b")]


@pytest.mark.multiprocess
@pytest.mark.onnx
def test_batch_reports_each_job_start_its_workers_stages_and_its_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    progress, events = Recording(), []
    result = run_batch(_jobs(tmp_path), workers=2, on_event=events.append, progress=progress)
    assert [r.status for r in result.records] == ["ok", "ok"], [r.error for r in result.records]
    assert progress.advances("jobs") == 2
    for job in ("a", "b"):
        shown = [name for name in progress.started() if name == job or name.startswith(f"{job}: ")]
        assert shown[0] == job, shown  # from its start, before its worker says anything
        for stage in ("load model", "inject gates", "rewrite the blocks", "export ONNX", "verify with onnxruntime"):
            assert f"{job}: {stage}" in shown, (stage, shown)
    opened = sum(e[0] == "start" for e in progress.events)  # jobs overlap: each stage opened is closed
    assert opened == sum(e[0] == "end" for e in progress.events)
    assert [e.kind for e in events].count("start") == 2 and [e.kind for e in events].count("done") == 2
