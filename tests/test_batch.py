"""`sdsurgeon batch`: config errors with file:line, --check, mixed good/broken runs and their reports, globs, incremental and parallel runs, crashed and timed-out jobs.

Runs are few and tiny (archs:tiny_resnet, a ResNet-8 of width 4): every worker process costs an import of
torch and every job an ONNX export, so the runs that several tests inspect happen once, in module fixtures.
Config mistakes are checked through ``batch CONFIG --check``, which runs nothing.
"""

from __future__ import annotations

import json
import re
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke
import sdsurgeon.batch.runner
from sdsurgeon.batch.config import load_config, plan_jobs
from sdsurgeon.batch.runner import run_batch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `arch: archs:...` in the parent; spawned workers inherit sys.path
    sys.path.insert(0, str(TESTS_DIR))

import archs


TINY_SHAPE = "[1, 8]"  # archs:tiny_resnet takes (N, 8)








def write_config(folder: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(text: str, start: str, nth: int = 1) -> int:
    """1-based number of the ``nth`` line of ``text`` (dedented) whose stripped form starts with ``start``."""
    hits = [i for i, line in enumerate(textwrap.dedent(text).lstrip("\n").splitlines(), 1)
            if line.strip().startswith(start)]
    return hits[nth - 1]


def files_under(folder: Path) -> list[str]:
    """Every file under ``folder`` (hidden temp files included), relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def save_weights(path: Path, seed: int, factory=archs.tiny_resnet, **kwargs) -> Path:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(factory(**kwargs).state_dict(), path)
    return path


def report_of(folder: Path) -> dict[str, dict]:
    jobs = json.loads((folder / "report.json").read_text())["jobs"]
    return {j["name"]: j for j in jobs}


def statuses(folder: Path) -> dict[str, str]:
    return {name: j["status"] for name, j in report_of(folder).items()}


def onnx_graph(path: Path) -> tuple[list, dict[str, np.ndarray]]:
    model = onnx.load(str(path))
    nodes = [(n.op_type, list(n.input), list(n.output), [a.SerializeToString() for a in n.attribute])
             for n in model.graph.node]
    return nodes, {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- config errors: one line naming file, line and key, through `batch --check` -------------------

# (id, config text, start of the line the error must name (nth match), fragments the message must hold)
CONFIG_ERRORS = [
    ("unknown-top-level-key", """
        defaults:
          pL: 0.5
        modles:
          - name: a
            arch: archs:tiny_resnet
        """, ("modles:", 1), ["unknown key 'modles'", "defaults, models"]),
    ("unknown-key-in-defaults", """
        defaults:
          input_shape: [1, 8]
          pl: 0.5
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("pl:", 1), ["unknown key 'pl' in defaults", "valid keys:", "pL", "input_shape", "timeout"]),
    ("unknown-key-in-model", """
        defaults:
          input_shape: [1, 8]
        models:
          - name: a
            arch: archs:tiny_resnet
            chekpoint: a.pt
        """, ("chekpoint:", 1), ["unknown key 'chekpoint' in a model entry", "checkpoint", "arch", "pL",
                                 "input_shape"]),
    ("pL-not-a-number", """
        defaults:
          pL: high
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("pL:", 1), ["pL: expected a number, got 'high'"]),
    ("fold-a-string", """
        models:
          - name: a
            arch: archs:tiny_resnet
            fold: "yes"
        """, ("fold:", 1), ["fold: expected true or false, got 'yes'"]),
    ("input_shape-with-a-string", """
        defaults:
          input_shape: [1, "3"]
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("input_shape:", 1), ["input_shape: expected a list of integers"]),
    ("missing-models", """
        defaults:
          pL: 0.5
        """, (None, 1), ["missing key 'models'"]),
    ("empty-models", """
        defaults:
          pL: 0.5
        models: []
        """, ("models:", 1), ["models: expected a non-empty list"]),
    ("entry-without-name", """
        defaults:
          input_shape: [1, 8]
        models:
          - name: a
            arch: archs:tiny_resnet
          - arch: archs:tiny_resnet
            pL: 0.8
        """, ("- arch:", 1), ["models[1]", "missing key 'name'"]),
    ("entry-without-checkpoint-or-arch", """
        models:
          - name: a
            pL: 0.8
        """, ("- name: a", 1), ["models[0] (a)", "'checkpoint'", "'arch'"]),
    ("weights-without-arch", """
        models:
          - name: a
            weights: a.pt
        """, ("weights: a.pt", 1), ["models[0] (a)", "'weights' needs 'arch'", "or 'checkpoint'"]),
    ("arch_kwargs-not-a-mapping", """
        models:
          - name: a
            arch: archs:tiny_resnet
            arch_kwargs: [8]
        """, ("arch_kwargs:", 1), ["models[0] (a).arch_kwargs: expected a mapping"]),
    ("invalid-yaml", """
        defaults:
          pL: 0.5: 3
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("pL:", 1), ["not valid YAML", "mapping values are not allowed here"]),
    ("pL-out-of-range-in-model", """
        defaults:
          input_shape: [1, 8]
        models:
          - name: a
            arch: archs:tiny_resnet
            pL: 1.5
        """, ("pL:", 1), ["pL: 1.5 is outside (0, 1]"]),
    ("pL-zero-in-defaults", """
        defaults:
          pL: 0
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("pL:", 1), ["pL: 0.0 is outside (0, 1]"]),
    ("unknown-rule", """
        defaults:
          rule: cosine
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("rule:", 1), ["rule: 'cosine' is not one of", "linear", "uniform"]),
    ("bad-set-override", """
        models:
          - name: a
            arch: archs:tiny_resnet
            set: [nope]
        """, ("set:", 1), ["set: 'nope'", "PATTERN=P"]),
    ("bad-input-spec", """
        models:
          - name: a
            arch: archs:tiny_resnet
            inputs: ["x:1,8:float99"]
        """, ("inputs:", 1), ["inputs: 'x:1,8:float99': unknown dtype 'float99'"]),
    ("bad-input-shape-in-spec", """
        models:
          - name: a
            arch: archs:tiny_resnet
            inputs: ["x:1,a"]
        """, ("inputs:", 1), ["inputs: '1,a': expected positive integers"]),
    ("bad-set-after-good-inputs", """
        models:
          - name: a
            arch: archs:tiny_resnet
            inputs: ["x:1,8"]
            set: ["a=2"]
        """, ("set:", 1), ["set: 'a=2': survival probability 2.0 is outside (0, 1]"]),
    ("timeout-zero", """
        defaults:
          timeout: 0
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("timeout:", 1), ["timeout: must be a positive number"]),
    ("input_shape-and-inputs", """
        models:
          - name: a
            arch: archs:tiny_resnet
            input_shape: [1, 8]
            inputs: ["x:1,8"]
        """, ("inputs:", 1), ["give input_shape or inputs, not both"]),
    ("glob-matching-nothing", """
        defaults:
          input_shape: [1, 8]
        models:
          - checkpoint: "ckpts/*.pt"
            arch: archs:tiny_resnet
        """, ("- checkpoint:", 1), ["checkpoint 'ckpts/*.pt' matches no file"]),
    ("drop-share-over-100", """
        models:
          - name: a
            arch: archs:tiny_resnet
            drop: 120%
        """, ("drop:", 1), ["drop: '120%': expected a count from 0 or a share from 0% to 100%"]),
    ("drop-and-drop-sites", """
        models:
          - name: a
            arch: archs:tiny_resnet
            drop: 2
            drop_sites: layer
        """, ("drop_sites:", 1), ["drop_sites: names the blocks itself: give it or drop, not both"]),
    ("drop-layers-and-drop", """
        models:
          - name: a
            arch: archs:tiny_resnet
            drop: 2
            drop_layers: 1
        """, ("drop_layers:", 1), ["drop_layers: counts whole layers and drop chooses blocks"]),
    ("drop-layers-share-over-100", """
        models:
          - name: a
            arch: archs:tiny_resnet
            drop_layers: 150%
        """, ("drop_layers:", 1), ["drop_layers: '150%': expected a count from 0 or a share"]),
    ("drop-by-unknown", """
        defaults:
          drop_by: random
        models:
          - name: a
            arch: archs:tiny_resnet
        """, ("drop_by:", 1), ["drop_by: 'random' is not one of schedule, influence"]),
    ("format-unknown", """
        models:
          - name: a
            arch: archs:tiny_resnet
            format: tflite
        """, ("format:", 1), ["format: 'tflite' is not one of onnx, safetensors, hf"]),
    ("format-with-drop", """
        defaults:
          format: safetensors
        models:
          - name: a
            arch: archs:tiny_resnet
            drop: 1
        """, ("- name: a", 1), ["format: safetensors writes the original architecture", "which a pruned model is not: use format onnx, or hf to delete whole layers (drop_layers)"]),
    ("drop-not-a-count", """
        models:
          - name: a
            arch: archs:tiny_resnet
            drop: [1]
        """, ("drop:", 1), ["drop: expected a count or a share such as '25%'"]),
    ("duplicate-job-names", """
        defaults:
          input_shape: [1, 8]
        models:
          - name: a
            arch: archs:tiny_resnet
          - name: a
            arch: archs:tiny_resnet
            pL: 0.8
        """, ("- name: a", 2), ["two jobs are named 'a'", "(the other at line 4)"]),
]


@pytest.mark.parametrize("text, where, fragments", [c[1:] for c in CONFIG_ERRORS], ids=[c[0] for c in CONFIG_ERRORS])
def test_config_error_names_file_line_and_key(tmp_path, monkeypatch, text, where, fragments):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, text)
    message = assert_user_error(invoke("batch", "cfg.yaml", "--check"))
    start, nth = where
    line = 1 if start is None else line_of(text, start, nth)
    assert message.startswith(f"error: cfg.yaml:{line}: "), (line, message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert files_under(tmp_path) == ["cfg.yaml"]  # --check writes nothing, not even on an error


def test_config_errors_name_the_batch_key_never_the_command_line_option(tmp_path, monkeypatch):
    """The library's error carries the option as a field; batch puts its own key there (no text rewriting)."""
    from sdsurgeon.analysis.schedule import Override
    from sdsurgeon.capture.inputs import InputSpec
    from sdsurgeon.errors import ConfigError

    with pytest.raises(ConfigError) as caught:
        InputSpec.parse("x:1,8:float99")
    err = caught.value
    assert (err.option, err.what) == ("--input", "'x:1,8:float99': unknown dtype 'float99'; use one of: "
                                      + ", ".join(sdsurgeon.capture.inputs.DTYPES))
    assert str(err) == f"--input {err.what}"  # the command line's message is unchanged
    with pytest.raises(ConfigError) as caught:
        Override.parse("layer.*=2")
    assert caught.value.option == "--set" and caught.value.what.startswith("'layer.*=2': survival probability")
    # An option's name inside the text stays: only the field decides what batch replaces.
    monkeypatch.setattr(InputSpec, "parse", classmethod(lambda cls, text: (_ for _ in ()).throw(
        ConfigError("give it with --input x:1,8 please", what="nothing to replace", option="--input"))))
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, """
        models:
          - name: a
            arch: archs:tiny_resnet
            inputs: ["x:1,8"]
        """)
    message = assert_user_error(invoke("batch", "cfg.yaml", "--check"))
    assert message.endswith(": inputs: nothing to replace"), message


def test_missing_checkpoint_file_is_a_user_error_at_its_config_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = """
        defaults:
          input_shape: [1, 8]
        models:
          - name: a
            arch: archs:tiny_resnet
            weights: missing.pt
        """
    write_config(tmp_path, text)
    message = assert_user_error(invoke("batch", "cfg.yaml", "--check"))
    assert "missing.pt" in message and "no such file" in message, message
    assert message.startswith(f"error: cfg.yaml:{line_of(text, '- name: a')}: "), message
    assert files_under(tmp_path) == ["cfg.yaml"]


def test_no_config_file_and_bad_jobs_count(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "nothing.yaml: no such config file" in assert_user_error(invoke("batch", "nothing.yaml", "--check"))
    write_config(tmp_path, "models:\n  - name: a\n    arch: archs:tiny_resnet\n")
    assert "--jobs must be 1 or more" in assert_user_error(invoke("batch", "cfg.yaml", "--jobs", "0"))
    assert files_under(tmp_path) == ["cfg.yaml"]


def test_entry_inputs_override_default_input_shape(tmp_path):
    cfg = write_config(tmp_path, """
        defaults:
          input_shape: [1, 8]
        models:
          - name: a
            arch: archs:tiny_resnet
            inputs: ["x:1,8"]
        """)
    (job,) = plan_jobs(load_config(cfg))
    assert job.options.inputs == ("x:1,8",) and job.options.input_shape is None


def test_options_merge_defaults_and_overrides(tmp_path):
    cfg = write_config(tmp_path, """
        defaults:
          pL: 0.7
          input_shape: [1, 8]
          output_dir: onnx
          set: ['blocks\\.0=0.9']
        models:
          - name: a
            arch: archs:tiny_resnet
            arch_kwargs: {width: 8, blocks: 3}
          - name: b
            arch: archs:tiny_resnet
            pL: 1
            input_shape: null
            inputs: ["x:1,8"]
            output_dir: elsewhere
            timeout: 30
        """)
    a, b = plan_jobs(load_config(cfg))
    assert (a.options.pL, a.options.input_shape, a.options.set) == (0.7, (1, 8), ("blocks\\.0=0.9",))
    assert a.arch_kwargs == {"width": 8, "blocks": 3} and a.checkpoint is None
    assert a.output_path == str(tmp_path / "onnx" / "a.onnx") and a.sd_path is None
    assert a.stamp_path == str(tmp_path / "onnx" / "a.sdsurgeon.json")
    assert (b.options.pL, b.options.input_shape, b.options.inputs, b.options.timeout) == (1.0, None, ("x:1,8",), 30.0)
    assert b.output_path == str(tmp_path / "elsewhere" / "b.onnx")
    assert a.settings_hash() != b.settings_hash()


# --- --check and --help -----------------------------------------------------------------------------


def test_check_lists_jobs_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_weights(tmp_path / "w.pt", 0)
    for stem in ("m1", "m2"):
        save_weights(tmp_path / "ckpts" / f"{stem}.pt", 1)
    write_config(tmp_path, f"""
        defaults:
          input_shape: {TINY_SHAPE}
          save_injected: true
        models:
          - name: a
            arch: archs:tiny_resnet
            weights: w.pt
          - checkpoint: "ckpts/*.pt"
            arch: archs:tiny_resnet
        """)
    before = files_under(tmp_path)
    result = invoke("batch", "cfg.yaml", "--check")
    assert_ok(result)
    assert result.stdout.strip() == "cfg.yaml: valid, 3 jobs: a, m1, m2", result.stdout
    listed = json.loads(invoke("batch", "cfg.yaml", "--check", "--json").stdout)
    assert [j["name"] for j in listed["jobs"]] == ["a", "m1", "m2"]
    assert listed["jobs"][0]["outputs"] == [str(tmp_path / "out" / "a.onnx"), str(tmp_path / "out" / "a.sd.pt")]
    assert files_under(tmp_path) == before  # no out/, no sdsurgeon-report/
    assert not (tmp_path / "out").exists() and not (tmp_path / "sdsurgeon-report").exists()


@pytest.mark.multiprocess
@pytest.mark.onnx
def test_checkpoint_with_weights_loads_the_trained_weights_into_the_checkpoints_model(tmp_path, monkeypatch):
    """`checkpoint` + `weights` is `export MODEL --weights W`: the gated .sd.pt file with trained weights in it."""
    import onnxruntime as ort

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    sdsurgeon.save(sdsurgeon.inject(archs.tiny_resnet(), 1.0), tmp_path / "gated.sd.pt", arch="archs:tiny_resnet")
    save_weights(tmp_path / "trained.pt", 5)
    write_config(tmp_path, f"""
        defaults:
          input_shape: {TINY_SHAPE}
        models:
          - name: a
            checkpoint: gated.sd.pt
            weights: trained.pt
        """)
    assert_ok(invoke("batch", "cfg.yaml"))
    reference = archs.tiny_resnet().eval()  # the plain architecture with the trained weights (p_L 1 folds to it)
    reference.load_state_dict(torch.load(tmp_path / "trained.pt"))
    x = torch.randn(3, 8)
    session = ort.InferenceSession(str(tmp_path / "out" / "a.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, reference(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_help_names_the_options_and_an_example():
    result = invoke("batch", "--help")
    assert_ok(result)
    for option in ("--jobs", "--fail-fast", "--force", "--check", "--report-dir", "--json", "--trust-pickle",
                   "--shard", "Example"):
        assert option in result.stdout, option


def test_help_lists_every_key_a_job_takes():
    from dataclasses import fields

    from sdsurgeon.batch.config import JobOptions

    words = set(re.findall(r"[A-Za-z_]+", invoke("batch", "--help").stdout))
    assert {f.name for f in fields(JobOptions)} - words == set()


# --- a mixed batch: two good jobs, two broken ones, one run -----------------------------------------


MIXED = f"""
    defaults:
      input_shape: {TINY_SHAPE}
      seed: 0
    models:
      - name: good_tiny
        arch: archs:tiny_resnet
        weights: tiny.pt
        save_injected: true
      - name: garbage
        arch: archs:tiny_resnet
        weights: bad.pt
      - name: good_resnet8
        arch: sdsurgeon.models:cifar_resnet
        arch_kwargs: {{depth: 8, width: 4}}
        input_shape: [1, 3, 16, 16]
      - name: pickled
        checkpoint: full.pt
    """


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """`batch cfg.yaml --json --report-dir reports --jobs 2` on MIXED, run once."""
    folder = tmp_path_factory.mktemp("mixed")
    save_weights(folder / "tiny.pt", 0)
    (folder / "bad.pt").write_bytes(b"this is not a checkpoint\n" * 4)
    torch.manual_seed(1)
    torch.save(archs.tiny_resnet(), folder / "full.pt")  # a whole pickled model, without trust_pickle
    cfg = write_config(folder, MIXED)
    result = invoke("batch", cfg, "--json", "--report-dir", folder / "reports", "--jobs", 2)
    return folder, result


def test_mixed_batch_exit_code_and_last_line(mixed):
    folder, result = mixed
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip("\n").splitlines()
    assert lines[-1] == f"error: 2 of 4 jobs failed (garbage, pickled); see {folder / 'reports' / 'summary.md'}"
    assert len(lines) == 1, result.stderr  # --json: no progress lines
    assert "Traceback" not in result.stderr + result.stdout


def test_mixed_batch_report_json(mixed):
    folder, _ = mixed
    report = report_of(folder / "reports")
    assert list(report) == ["good_tiny", "garbage", "good_resnet8", "pickled"]  # config order, not finish order
    assert statuses(folder / "reports") == {"good_tiny": "ok", "garbage": "failed", "good_resnet8": "ok",
                                            "pickled": "failed"}
    for name, sites in (("good_tiny", 2), ("good_resnet8", 3)):
        job = report[name]
        assert job["error"] is None and "traceback" not in job
        assert (job["sites"], job["folded"], job["multiplies"]) == (sites, sites, 0)
        assert job["nodes"] > 0 and job["max_abs_error"] < 1e-4 and job["max_rel_error"] is not None
        assert {"load", "inject", "fold", "export", "verify", "total"} <= job["timings"].keys()
    assert report["good_tiny"]["outputs"] == [str(folder / "out" / "good_tiny.onnx"),
                                              str(folder / "out" / "good_tiny.sd.pt")]
    assert report["good_resnet8"]["outputs"] == [str(folder / "out" / "good_resnet8.onnx")]
    for name, words in (("garbage", ["bad.pt", "not a PyTorch checkpoint"]), ("pickled", ["full.pt", "trust_pickle"])):
        job = report[name]
        assert job["error"] and "\n" not in job["error"], job["error"]
        assert all(w in job["error"] for w in words), job["error"]
        assert job["outputs"] == [] and job["sites"] is None
        assert "traceback" not in job  # a user error, not a bug


def test_mixed_batch_junit_and_summary(mixed):
    folder, _ = mixed
    root = ET.parse(folder / "reports" / "junit.xml").getroot()
    cases = list(root.iter("testcase"))
    assert [c.get("name") for c in cases] == ["good_tiny", "garbage", "good_resnet8", "pickled"]
    failures = {c.get("name"): c.find("failure") for c in cases if c.find("failure") is not None}
    assert sorted(failures) == ["garbage", "pickled"]
    assert all(f.get("message") for f in failures.values())
    assert len(list(root.iter("failure"))) == 2
    assert root.get("tests") == "4" and root.get("failures") == "2"
    summary = (folder / "reports" / "summary.md").read_text()
    assert "2 ok, 2 failed, 0 skipped" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| job ")]
    assert [r.split("|")[1].strip() for r in rows] == ["good_tiny", "garbage", "good_resnet8", "pickled"]
    assert "ok" in rows[0] and "failed" in rows[1] and "ok" in rows[2] and "failed" in rows[3]
    assert "trust_pickle" in rows[3]


def test_mixed_batch_files(mixed):
    folder, _ = mixed
    out = folder / "out"
    assert files_under(out) == ["good_resnet8.onnx", "good_resnet8.sdsurgeon.json", "good_tiny.onnx",
                                "good_tiny.sd.pt", "good_tiny.sdsurgeon.json"]  # nothing for failed jobs, no temp files
    for name in ("good_tiny", "good_resnet8"):
        onnx.checker.check_model(onnx.load(str(out / f"{name}.onnx")), full_check=True)
    # A config trusts its architectures for its own run only: loading its output later takes the user's word.
    with pytest.raises(sdsurgeon.SurgeonError, match="not trusted"):
        sdsurgeon.load(out / "good_tiny.sd.pt")
    sdsurgeon.trust("archs:tiny_resnet", folder=folder)
    injected = sdsurgeon.load(out / "good_tiny.sd.pt")  # save_injected: weights-only, gated, seeded
    assert len(sdsurgeon.gates(injected)) == 2
    assert not list(folder.rglob("*.tmp"))  # temp files and staged temp folders alike


def test_json_prints_report_json(mixed):
    folder, result = mixed
    text = (folder / "reports" / "report.json").read_text()
    assert json.loads(result.stdout) == json.loads(text)
    assert result.stdout.strip() == text.strip()


@pytest.mark.onnx
@pytest.mark.multiprocess
def test_fail_fast_skips_jobs_not_started(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.pt").write_bytes(b"this is not a checkpoint\n" * 4)
    write_config(tmp_path, f"""
        defaults:
          input_shape: {TINY_SHAPE}
        models:
          - name: broken
            arch: archs:tiny_resnet
            weights: bad.pt
          - name: never
            arch: archs:tiny_resnet
        """)
    result = invoke("batch", "cfg.yaml", "--fail-fast")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 jobs failed (broken)")
    report = report_of(tmp_path / "sdsurgeon-report")
    assert report["broken"]["status"] == "failed"
    assert report["never"]["status"] == "skipped" and "fail-fast" in report["never"]["error"]
    assert not (tmp_path / "out" / "never.onnx").exists()
    assert "[2/2] never: skipped" in result.stdout


# --- globs --------------------------------------------------------------------------------------------


def test_glob_is_one_job_per_match_named_by_stem(tmp_path):
    for stem in ("m3", "m1", "m2"):
        save_weights(tmp_path / "ckpts" / f"{stem}.pt", 0)
    (tmp_path / "ckpts" / "notes.txt").write_text("not matched")
    cfg = write_config(tmp_path, f"""
        defaults:
          input_shape: {TINY_SHAPE}
        models:
          - name: first
            arch: archs:tiny_resnet
          - checkpoint: "ckpts/*.pt"
            arch: archs:tiny_resnet
            pL: 0.8
        """)
    jobs = plan_jobs(load_config(cfg))
    assert [j.name for j in jobs] == ["first", "m1", "m2", "m3"]
    for job in jobs[1:]:
        assert job.checkpoint == str(tmp_path / "ckpts" / f"{job.name}.pt")
        assert job.output_path == str(tmp_path / "out" / f"{job.name}.onnx")
        assert job.arch == "archs:tiny_resnet" and job.options.pL == 0.8


def test_glob_names_keep_dots_of_the_stem(tmp_path):
    for stem in ("ckpt.epoch1", "ckpt.epoch2"):
        save_weights(tmp_path / "ckpts" / f"{stem}.pt", 0)
    cfg = write_config(tmp_path, """
        models:
          - checkpoint: "ckpts/*.pt"
            arch: archs:tiny_resnet
        """)
    assert [j.name for j in plan_jobs(load_config(cfg))] == ["ckpt.epoch1", "ckpt.epoch2"]


def test_glob_in_a_folder_with_brackets(tmp_path):
    folder = tmp_path / "run[1]"
    save_weights(folder / "ckpts" / "m1.pt", 0)
    cfg = write_config(folder, """
        models:
          - checkpoint: "ckpts/*.pt"
            arch: archs:tiny_resnet
        """)
    assert [j.name for j in plan_jobs(load_config(cfg))] == ["m1"]


GLOB = f"""
    defaults:
      input_shape: {TINY_SHAPE}
      seed: 7
      output_dir: {{out}}
    models:
      - checkpoint: "ckpts/*.pt"
        arch: archs:tiny_resnet
    """


@pytest.fixture(scope="module")
def glob_runs(tmp_path_factory):
    """The same two glob-matched checkpoints run serially (--jobs 1) and in parallel (--jobs 2)."""
    folder = tmp_path_factory.mktemp("glob")
    save_weights(folder / "ckpts" / "m1.pt", 1)
    save_weights(folder / "ckpts" / "m2.pt", 2)
    results = {}
    for out, jobs in (("serial", 1), ("parallel", 2)):
        cfg = write_config(folder, GLOB.format(out=out), name=f"{out}.yaml")
        results[out] = invoke("batch", cfg, "--jobs", jobs, "--report-dir", folder / f"{out}-report")
    return folder, results


def test_glob_run_writes_one_onnx_per_match(glob_runs):
    folder, results = glob_runs
    assert_ok(results["serial"])
    assert statuses(folder / "serial-report") == {"m1": "ok", "m2": "ok"}
    assert files_under(folder / "serial") == ["m1.onnx", "m1.sdsurgeon.json", "m2.onnx", "m2.sdsurgeon.json"]
    for stem in ("m1", "m2"):
        onnx.checker.check_model(onnx.load(str(folder / "serial" / f"{stem}.onnx")), full_check=True)
    # different checkpoints, different files
    assert (folder / "serial" / "m1.onnx").read_bytes() != (folder / "serial" / "m2.onnx").read_bytes()


def test_parallel_output_matches_serial(glob_runs):
    folder, results = glob_runs
    assert_ok(results["parallel"])
    assert statuses(folder / "parallel-report") == {"m1": "ok", "m2": "ok"}
    for stem in ("m1", "m2"):
        serial, parallel = folder / "serial" / f"{stem}.onnx", folder / "parallel" / f"{stem}.onnx"
        if serial.read_bytes() == parallel.read_bytes():
            continue  # byte-identical: the strongest form
        (s_nodes, s_init), (p_nodes, p_init) = onnx_graph(serial), onnx_graph(parallel)
        assert s_nodes == p_nodes, stem
        assert s_init.keys() == p_init.keys(), stem
        assert all(np.array_equal(s_init[k], p_init[k]) for k in s_init), stem


# --- incremental runs ----------------------------------------------------------------------------------


INCREMENTAL = f"""
    defaults:
      input_shape: {TINY_SHAPE}
      seed: 0
    models:
      - name: a
        arch: archs:tiny_resnet
        weights: a.pt
      - name: b
        arch: archs:tiny_resnet
        weights: b.pt
        pL: {{b_pL}}
    """


@pytest.mark.onnx
@pytest.mark.multiprocess
def test_incremental_skips_up_to_date_jobs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_weights(tmp_path / "a.pt", 1)
    save_weights(tmp_path / "b.pt", 2)
    write_config(tmp_path, INCREMENTAL.format(b_pL=0.5))
    out, reports = tmp_path / "out", tmp_path / "sdsurgeon-report"

    def mtimes() -> dict[str, int]:
        return {name: (out / name).stat().st_mtime_ns for name in files_under(out)}

    def batch(*extra):
        result = invoke("batch", "cfg.yaml", *extra)
        assert_ok(result)
        return statuses(reports)

    # 1. first run: both run, plain progress lines on stdout, reports in ./sdsurgeon-report
    result = invoke("batch", "cfg.yaml")
    assert_ok(result)
    assert statuses(reports) == {"a": "ok", "b": "ok"}
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == "2 ok, 0 failed, 0 skipped; reports in sdsurgeon-report: report.json, junit.xml, summary.md"
    assert [line.split(":")[0] for line in lines[:-1]] == ["[1/2] a", "[2/2] b"], lines
    assert all(": ok (2/2 folded, " in line for line in lines[:-1]), lines
    assert files_under(out) == ["a.onnx", "a.sdsurgeon.json", "b.onnx", "b.sdsurgeon.json"]
    first = mtimes()

    # 2. again: nothing to do, nothing touched, no worker needed
    started = time.monotonic()
    assert batch() == {"a": "skipped", "b": "skipped"}
    assert time.monotonic() - started < 5
    assert mtimes() == first
    report = report_of(reports)
    assert "up to date" in report["a"]["error"] and report["a"]["outputs"] == [str(out / "a.onnx")]
    assert report["a"]["folded"] == 2 and report["a"]["nodes"], "a skipped job keeps the figures of its last run"

    # 3. a newer checkpoint for a: only a runs again
    save_weights(tmp_path / "a.pt", 3)
    assert (tmp_path / "a.pt").stat().st_mtime_ns > first["a.onnx"]
    before_a = (out / "a.onnx").read_bytes()
    assert batch() == {"a": "ok", "b": "skipped"}
    assert (out / "a.onnx").read_bytes() != before_a  # new weights
    second = mtimes()
    assert second["b.onnx"] == first["b.onnx"] and second["a.onnx"] > first["a.onnx"]

    # 4. a changed setting for b: only b runs again
    write_config(tmp_path, INCREMENTAL.format(b_pL=0.8))
    assert batch() == {"a": "skipped", "b": "ok"}
    third = mtimes()
    assert third["a.onnx"] == second["a.onnx"] and third["b.onnx"] > second["b.onnx"]

    # 5. --force: both again
    assert batch("--force") == {"a": "ok", "b": "ok"}
    fourth = mtimes()
    assert fourth["a.onnx"] > third["a.onnx"] and fourth["b.onnx"] > third["b.onnx"]


def make_up_to_date(job) -> None:
    """What a successful run leaves for ``job`` (an arch-only job: no input file to be newer than it)."""
    Path(job.output_path).parent.mkdir(parents=True, exist_ok=True)
    Path(job.output_path).write_bytes(b"stands in for an ONNX file")
    Path(job.stamp_path).write_text(json.dumps({"settings_hash": job.settings_hash(), "outputs": job.outputs}))


def test_report_dir_that_is_a_file_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = write_config(tmp_path, f"""
        defaults:
          input_shape: {TINY_SHAPE}
        models:
          - name: a
            arch: archs:tiny_resnet
        """)
    make_up_to_date(plan_jobs(load_config(cfg))[0])  # skipped: no worker needed to reach the report
    (tmp_path / "reports").write_text("a file, not a folder")
    message = assert_user_error(invoke("batch", "cfg.yaml", "--report-dir", "reports"))
    assert "reports" in message


# --- crashes and timeouts: one batch with a job that kills its worker, one that hangs, one that is fine ---


CRASHES = f"""
    defaults:
      input_shape: {TINY_SHAPE}
    models:
      - name: killed
        arch: archs:dies_on_export
        leaf: [KillOnExport]
      - name: sleepy
        arch: archs:sleepy_resnet
        arch_kwargs: {{seconds: 60}}
        timeout: 3
      - name: fine
        arch: archs:tiny_resnet
    """


@pytest.fixture(scope="module")
def crashes(tmp_path_factory):
    """CRASHES run once with --jobs 2; also what the output folder held when each dead job was cleaned up."""
    folder = tmp_path_factory.mktemp("crashes")
    cfg = write_config(folder, CRASHES)
    seen_at_cleanup: dict[str, list[str]] = {}
    real_cleanup = sdsurgeon.batch.runner._remove_leftovers

    def spy(job):  # files and folders: an ONNX export is staged in a temp folder (its graph and any data file)
        out = folder / "out"
        seen_at_cleanup[job.name] = sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) if out.is_dir() else []
        real_cleanup(job)

    started = time.monotonic()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdsurgeon.batch.runner, "_remove_leftovers", spy)
        result = invoke("batch", cfg, "--jobs", 2, "--report-dir", folder / "reports")
    return folder, result, time.monotonic() - started, seen_at_cleanup


def test_killed_job_is_failed_and_others_run(crashes):
    folder, result, elapsed, seen_at_cleanup = crashes
    assert elapsed < 120, elapsed
    assert result.exit_code == 1, (result.stdout, result.stderr, repr(result.exception))
    assert result.stderr.strip().splitlines()[-1].startswith("error: 2 of 3 jobs failed (killed, sleepy)")
    report = report_of(folder / "reports")
    assert report["fine"]["status"] == "ok"
    killed = report["killed"]
    assert killed["status"] == "failed"
    assert "died" in killed["error"] and "SIGKILL" in killed["error"], killed["error"]
    # it died mid-export, when its staged ONNX output existed; nothing of it may remain
    assert [f for f in seen_at_cleanup["killed"] if f.startswith(".killed.onnx.") and f.endswith(".tmp")], \
        seen_at_cleanup
    assert sorted(p.name for p in (folder / "out").iterdir()) == ["fine.onnx", "fine.sdsurgeon.json"]


def test_timeout_stops_a_hanging_job(crashes):
    folder, _result, elapsed, _ = crashes
    assert elapsed < 45, elapsed  # the job sleeps 60 s
    sleepy = report_of(folder / "reports")["sleepy"]
    assert sleepy["status"] == "failed"
    assert "timed out after 3 s" in sleepy["error"], sleepy["error"]
    assert 3 <= sleepy["timings"]["total"] < 20
    assert not (folder / "out" / "sleepy.onnx").exists()


def test_run_batch_with_no_jobs_returns_at_once():
    started = time.monotonic()
    result = run_batch([], workers=4)
    assert result.records == [] and result.ok
    assert time.monotonic() - started < 5


@pytest.mark.multiprocess
@pytest.mark.onnx
def test_a_job_prunes_as_export_drop_does_and_a_bad_count_fails_in_config_terms(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, """
        defaults:
          input_shape: [1, 3, 16, 16]
        models:
          - {name: whole, arch: sdsurgeon.models:cifar_resnet, arch_kwargs: {depth: 14, width: 4}}
          - {name: pruned, arch: sdsurgeon.models:cifar_resnet, arch_kwargs: {depth: 14, width: 4}, drop: 2}
          - {name: too_many, arch: sdsurgeon.models:cifar_resnet, arch_kwargs: {depth: 14, width: 4}, drop: 7}
        """)
    result = invoke("batch", "cfg.yaml", "--json", "--report-dir", "reports")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    jobs = {j["name"]: j for j in json.loads(result.stdout)["jobs"]}
    assert jobs["whole"]["dropped"] is None and jobs["pruned"]["dropped"] == 2
    assert jobs["pruned"]["nodes"] < jobs["whole"]["nodes"]
    assert jobs["pruned"]["folded"] == jobs["whole"]["folded"] - 2
    assert jobs["too_many"]["error"].startswith("drop: '7': expected a count from 0 to 6"), jobs["too_many"]["error"]


@pytest.mark.multiprocess
def test_a_job_writes_the_plain_architecture_as_safetensors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, """
        defaults:
          input_shape: [1, 3, 16, 16]
          format: safetensors
        models:
          - {name: r, arch: sdsurgeon.models:cifar_resnet, arch_kwargs: {depth: 8}, save_injected: true}
        """)
    result = invoke("batch", "cfg.yaml", "--json", "--report-dir", "reports")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    (job,) = json.loads(result.stdout)["jobs"]
    assert job["status"] == "ok" and job["nodes"] is None and job["folded"] == job["sites"] == 3
    assert job["outputs"] == [str(tmp_path / "out" / "r.safetensors"), str(tmp_path / "out" / "r.sd.pt")]
    from safetensors.torch import load_model

    import sdsurgeon
    from sdsurgeon.models import cifar_resnet

    plain = cifar_resnet(depth=8).eval()
    load_model(plain, str(tmp_path / "out" / "r.safetensors"))
    injected = sdsurgeon.load(tmp_path / "out" / "r.sd.pt").eval()
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(plain(x), injected(x))


@pytest.mark.multiprocess
def test_a_jobs_failure_names_config_keys_where_the_library_names_flags(tmp_path, monkeypatch):
    """The library words its errors for the command line (--format, --arch); a batch report says the config's keys."""
    monkeypatch.chdir(tmp_path)
    write_config(tmp_path, """
        models:
          - name: a
            arch: archs:tiny_resnet
            input_shape: [1, 8]
            format: hf
        """)
    assert invoke("batch", "cfg.yaml", "--report-dir", "reports").exit_code == 1
    error = report_of(tmp_path / "reports")["a"]["error"]
    assert "did not come from transformers" in error and "use format safetensors" in error, error
    assert "--" not in error, error
