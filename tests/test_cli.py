"""The command line through typer's CliRunner: plan and inject outputs, exit codes, no stray files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon.errors import UnsafeLoadError

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `--arch archs:...` and unpickling archs.TinyResNet need it
    sys.path.insert(0, str(TESTS_DIR))

import archs  # noqa: E402

TINY = ["--arch", "archs:tiny_resnet"]
RESNET20 = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 20}']









def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def loaded_gates(path) -> list[tuple[str, float]]:
    return [(g.site_id, g.p) for g in sdsurgeon.gates(sdsurgeon.load(path))]


# --- fixtures: a work folder (conftest.py) holding one file of every kind ---------------------------


@pytest.fixture
def tiny_model() -> archs.TinyResNet:
    torch.manual_seed(0)
    return archs.tiny_resnet()


@pytest.fixture
def files(work, tiny_model) -> dict[str, Path]:
    f = {
        "sd": work / "tiny.pt",
        "full": work / "full.pt",
        "script": work / "scripted.pt",
        "plain_sd": work / "plain.pt",
        "truncated": work / "half.pt",
        "noise": work / "noise.pt",
    }
    torch.save(tiny_model.state_dict(), f["sd"])
    torch.save(tiny_model, f["full"])
    torch.jit.save(torch.jit.trace(tiny_model.eval(), torch.randn(1, 8)), str(f["script"]))
    torch.save(archs.no_residual().state_dict(), f["plain_sd"])
    data = f["sd"].read_bytes()
    f["truncated"].write_bytes(data[: len(data) // 2])
    f["noise"].write_bytes(random.Random(0).randbytes(2048))
    return f


# --- plan -------------------------------------------------------------------------------------------


def test_plan_json_resnet20(work):
    result = invoke("plan", *RESNET20, "--pL", "0.5", "--json")
    assert_ok(result)
    assert len(result.stdout.strip().splitlines()) == 1
    record = json.loads(result.stdout)
    assert record["num_sites"] == 9
    assert record["rule"] == "linear" and record["p_L"] == 0.5
    reference = sum(1 - (l / 9) * (1 - 0.5) for l in range(1, 10))
    assert record["expected_depth"] == pytest.approx(reference, abs=1e-4)
    assert record["expected_depth"] == pytest.approx(9 - 10 / 4, abs=1e-4)  # L - (L + 1) / 4
    sites = record["sites"]
    assert [s["index"] for s in sites] == list(range(1, 10))
    assert len({s["id"] for s in sites}) == 9 and all(isinstance(s["id"], str) and s["id"] for s in sites)
    assert [s["p"] for s in sites] == pytest.approx([1 - (l / 9) * 0.5 for l in range(1, 10)], abs=1e-4)
    assert all(isinstance(s["params"], int) and s["params"] > 0 for s in sites)
    # stage 3 blocks have 4x the channels of stage 1: their branches have far more parameters
    assert sites[-1]["params"] > sites[0]["params"]
    assert "expected_train_flops_ratio" in record and record["expected_train_flops_ratio"] is None
    assert listing(work) == []  # plan writes nothing


@pytest.mark.slow
def test_plan_json_with_input_shape_counts_flops(work):
    result = invoke("plan", *RESNET20, "--pL", "0.5", "--input-shape", "1,3,32,32", "--json")
    assert_ok(result)
    record = json.loads(result.stdout)
    ratio = record["expected_train_flops_ratio"]
    assert isinstance(ratio, float) and 0 < ratio < 1
    total = record["total_flops"]
    saved = sum(s["flops"] * (1 - s["p"]) for s in record["sites"])
    assert ratio == pytest.approx((total - saved) / total, abs=1e-3)


def test_plan_json_uniform_rule(work):
    result = invoke("plan", *RESNET20, "--pL", "0.8", "--rule", "uniform", "--json")
    assert_ok(result)
    record = json.loads(result.stdout)
    assert record["rule"] == "uniform"
    assert [s["p"] for s in record["sites"]] == pytest.approx([0.8] * 9)
    assert record["expected_depth"] == pytest.approx(7.2, abs=1e-4)


def test_plan_json_set_include_exclude(work):
    result = invoke("plan", *TINY, "--set", r"blocks\.1=0.9", "--json")
    assert_ok(result)
    assert [s["p"] for s in json.loads(result.stdout)["sites"]] == pytest.approx([0.75, 0.9])

    result = invoke("plan", *TINY, "--exclude", r"blocks\.0", "--json")
    assert_ok(result)
    record = json.loads(result.stdout)
    assert [s["gated"] for s in record["sites"]] == [False, True]
    assert record["num_gated"] == 1 and record["expected_depth"] == pytest.approx(1.5)


def test_plan_text_shows_table_and_summary(work):
    result = invoke("plan", *TINY, "--pL", "0.5")
    assert_ok(result)
    out = result.stdout
    assert "residual sites of archs:tiny_resnet" in out
    assert "blocks.0:add" in out and "blocks.1:add" in out
    assert "0.7500" in out and "0.5000" in out
    assert "sites: 2 found, 2 gated (linear rule, p_L = 0.5)" in out
    assert "expected depth: 1.25 of 2 blocks" in out
    assert "give --input-shape" in out
    assert result.stderr == ""


def test_plan_text_with_input_shape_shows_flops_ratio(work):
    result = invoke("plan", *TINY, "--input-shape", "2,8")
    assert_ok(result)
    assert "expected training FLOPs: 0." in result.stdout and "of the original" in result.stdout


def test_plan_says_which_outputs_the_model_can_reach(work):
    """Before any training: ONNX needs the model captured by torch.export, hf a transformers model."""
    import inspect

    result = invoke("plan", *TINY, "--input-shape", "2,8")
    assert_ok(result)
    assert "outputs: ONNX yes (dynamic batch); safetensors yes; hf no (not a transformers model)" in result.stdout.splitlines()
    lines, start = inspect.getsourcelines(archs.DataDependent.forward)
    where = f"archs.py:{start + next(i for i, t in enumerate(lines) if 'x.sum() > 0' in t)} in forward"
    data_dependent = ["--arch", "archs:data_dependent", "--input-shape", "2,8"]
    result = invoke("plan", *data_dependent)
    assert_ok(result)  # it plans (its blocks are captured); export would fail after training, so plan says so now
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("outputs: ")]
    assert line.startswith("outputs: ONNX no (") and "data-dependent control flow" in line and where in line, line
    assert line.endswith("; safetensors yes; hf no (not a transformers model)"), line
    onnx, safetensors, hf = json.loads(invoke("plan", *data_dependent, "--json").stdout)["outputs"]
    assert (onnx["format"], onnx["reachable"], safetensors["reachable"], hf["reachable"]) == ("onnx", False, True, False)
    assert where in onnx["why"]
    result = invoke("plan", "--arch", "archs:data_dependent")  # no inputs: torch.export cannot be tried
    assert_ok(result)
    assert "outputs: ONNX not checked (give --input-shape" in result.stdout


def test_site_ids_never_wrap_at_80_columns(work, monkeypatch):
    """Site ids are what users copy into --set: whole on one line in the plan and prune-curve tables."""
    from sdsurgeon import cli

    monkeypatch.setattr(cli.out, "_width", 80)
    args = ["--arch", "archs:long_names", "--input-shape", "2,8"]
    ids = [s["id"] for s in json.loads(invoke("plan", *args, "--json").stdout)["sites"]]
    assert len(ids) == 3 and all(len(i) >= 40 for i in ids), ids
    result = invoke("plan", *args, "--prune-curve")
    assert_ok(result)
    lines = result.stdout.splitlines()
    for site in ids:  # once in the plan's table, once in the curve's, in rows that fit the width
        rows = [line for line in lines if site in line]
        assert len(rows) == 2 and all(len(row) <= 80 for row in rows), (site, result.stdout)
    assert any(line.startswith("(left out at this width: ") for line in lines)


def test_plan_of_checkpoint_files(files):
    result = invoke("plan", files["sd"], *TINY, "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["num_sites"] == 2
    result = invoke("plan", files["full"], "--trust-pickle", "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["num_sites"] == 2


def test_plan_of_model_without_residuals_is_fine(files):
    for args in (["--arch", "archs:no_residual"], [files["plain_sd"], "--arch", "archs:no_residual"]):
        result = invoke("plan", *args, "--json")
        assert_ok(result)
        record = json.loads(result.stdout)
        assert record["num_sites"] == 0 and record["sites"] == [] and record["expected_depth"] == 0
    result = invoke("plan", "--arch", "archs:no_residual")
    assert_ok(result)
    assert "sites: 0 found" in result.stdout


# --- inject -----------------------------------------------------------------------------------------


def test_inject_writes_beside_the_input_by_default(files, tiny_model):
    before = listing(files["sd"].parent)
    result = invoke("inject", files["sd"], *TINY)
    assert_ok(result)
    out = files["sd"].with_name("tiny.sd.pt")
    assert listing(files["sd"].parent) == sorted(before + ["tiny.sd.pt"])
    assert f"wrote {out}" in result.stdout
    assert "gated 2 residual blocks" in result.stdout
    model = sdsurgeon.load(out)  # weights-only: no trust needed
    assert len(sdsurgeon.gates(model)) == 2
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_inject_output_option_and_json_record(files, tmp_path):
    target = tmp_path / "elsewhere" / "trained.pt"
    target.parent.mkdir()
    before = listing(files["sd"].parent)
    result = invoke("inject", files["sd"], *TINY, "--pL", "0.6", "-o", target, "--mode", "row",
                    "--scaling", "inverted", "--seed", "5", "--json")
    assert_ok(result)
    assert listing(files["sd"].parent) == before  # nothing beside the input
    assert len(result.stdout.strip().splitlines()) == 1
    record = json.loads(result.stdout)
    assert record["output"] == str(target)
    assert record["num_gated"] == 2
    assert record["weights_only"] is True
    assert record["mode"] == "row" and record["scaling"] == "inverted" and record["seed"] == 5
    assert [s["id"] for s in record["sites"]] == ["blocks.0:add", "blocks.1:add"]
    assert record["expected_depth"] == pytest.approx(0.8 + 0.6)
    gates = sdsurgeon.gates(sdsurgeon.load(target))
    assert [(g.mode, g.scaling, g.seed) for g in gates] == [("row", "inverted", 5)] * 2
    assert [g.p for g in gates] == pytest.approx([0.8, 0.6])


def test_inject_from_arch_alone_writes_into_the_current_folder(work):
    result = invoke("inject", *RESNET20, "--json")
    assert_ok(result)
    record = json.loads(result.stdout)
    assert record["num_gated"] == 9
    assert listing(work) == ["cifar_resnet.sd.pt"]
    assert len(loaded_gates(work / "cifar_resnet.sd.pt")) == 9


@pytest.mark.parametrize(
    "options, expected",
    [
        ([], [("blocks.0:add", 0.75), ("blocks.1:add", 0.5)]),
        (["--set", r"blocks\.1=0.9"], [("blocks.0:add", 0.75), ("blocks.1:add", 0.9)]),
        (["--set", "blocks=0.7", "--set", r"\.0:=1"], [("blocks.0:add", 1.0), ("blocks.1:add", 0.7)]),
        (["--include", r"blocks\.0"], [("blocks.0:add", 0.5)]),
        (["--exclude", r"blocks\.0"], [("blocks.1:add", 0.5)]),
        (["--include", "blocks", "--exclude", r"\.1:"], [("blocks.0:add", 0.5)]),
        (["--rule", "uniform", "--pL", "0.3"], [("blocks.0:add", 0.3), ("blocks.1:add", 0.3)]),
    ],
)
def test_inject_selection_options_shape_the_gates(files, options, expected):
    target = files["sd"].with_name("out.sd.pt")
    result = invoke("inject", files["sd"], *TINY, "-o", target, *options)
    assert_ok(result)
    gates = loaded_gates(target)
    assert [g[0] for g in gates] == [e[0] for e in expected]
    assert [g[1] for g in gates] == pytest.approx([e[1] for e in expected])


def test_inject_pickled_model_with_trust_writes_a_file_that_needs_trust(files):
    target = files["full"].with_name("full.sd.pt")
    result = invoke("inject", files["full"], "--trust-pickle")
    assert_ok(result)
    assert "--trust-pickle" in result.stdout
    assert target.exists()
    with pytest.raises(UnsafeLoadError):
        sdsurgeon.load(target)
    assert len(sdsurgeon.gates(sdsurgeon.load(target, trust_pickle=True))) == 2


# --- user errors: exit 1, one line, no traceback, no file -------------------------------------------

# Each case: (commands it applies to, args built from the files fixture, text the message must contain)
USER_ERRORS = {
    "pL_zero": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--pL", "0"], "--pL"),
    "pL_above_one": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--pL", "1.5"], "--pL"),
    "pL_nan": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--pL", "nan"], "--pL"),
    "set_without_equals": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--set", "blocks"], "--set"),
    "set_not_a_number": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--set", "blocks=high"], "--set"),
    "set_out_of_range": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--set", "blocks=0"], "--set"),
    "set_bad_regex": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--set", "[=0.5"], "--set"),
    "include_bad_regex": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--include", "["], "--include"),
    "exclude_bad_regex": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--exclude", "(a"], "--exclude"),
    "input_shape_not_numbers": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--input-shape", "1,x"], "--input-shape"),
    "input_shape_zero": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--input-shape", "0,8"], "--input-shape"),
    "input_bad_spec": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--input", "1,8"], "--input"),
    "input_bad_dtype": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--input", "x:1,8:complex7"], "--input"),
    "arch_kwargs_bad_json": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--arch-kwargs", "{width: 8"], "--arch-kwargs"),
    "arch_kwargs_not_object": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--arch-kwargs", "[8]"], "--arch-kwargs"),
    "arch_kwargs_unknown": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--arch-kwargs", '{"depth": 3}'], "depth"),
    "arch_not_importable": (("plan", "inject"), lambda f: [f["sd"], "--arch", "no_such_pkg_xyz:net"], "cannot import"),
    "arch_no_attribute": (("plan", "inject"), lambda f: [f["sd"], "--arch", "archs:nope"], "no attribute"),
    "arch_not_a_module": (("plan", "inject"), lambda f: [f["sd"], "--arch", "archs:not_a_module"], "nn.Module"),
    "arch_bad_spec": (("plan", "inject"), lambda f: [f["sd"], "--arch", "archs.tiny_resnet"], "package.module:factory"),
    "weights_do_not_fit": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--arch-kwargs", '{"width": 4}'], "do not fit"),
    "missing_file": (("plan", "inject"), lambda f: [f["sd"].with_name("missing.pt"), *TINY], "no such file"),
    "no_model_no_arch": (("plan", "inject"), lambda f: ["--pL", "0.5"], "--arch"),
    "state_dict_without_arch": (("plan", "inject"), lambda f: [f["sd"]], "--arch"),
    "pickle_without_trust": (("plan", "inject"), lambda f: [f["full"]], "--trust-pickle"),
    "torchscript": (("plan", "inject"), lambda f: [f["script"], *TINY], "TorchScript"),
    "torchscript_trusted": (("plan", "inject"), lambda f: [f["script"], "--trust-pickle"], "TorchScript"),
    "truncated_file": (("plan", "inject"), lambda f: [f["truncated"], *TINY], "damaged"),
    "random_bytes": (("plan", "inject"), lambda f: [f["noise"], *TINY], "damaged"),
    "unknown_rule": (("plan", "inject"), lambda f: [f["sd"], *TINY, "--rule", "cosine"], "rule"),
    "no_residual": (("inject",), lambda f: [f["plain_sd"], "--arch", "archs:no_residual"], "no residual"),
    "no_residual_selected": (("inject",), lambda f: [f["sd"], *TINY, "--include", "nothing_matches"], "none of"),
    "output_is_input": (("inject",), lambda f: [f["sd"], *TINY, "-o", f["sd"]], "input"),
    "output_is_input_other_spelling": (
        ("inject",), lambda f: [f["sd"], *TINY, "-o", f["sd"].parent / "." / f["sd"].name], "input"),
    "default_output_is_input": (("inject",), lambda f: [_copy(f["sd"], "again.sd.pt"), *TINY], "input"),
    "output_folder_missing": (("inject",), lambda f: [f["sd"], *TINY, "-o", f["sd"].parent / "no" / "x.pt"], "does not exist"),
    # --weights: MODEL --arch and --arch --weights are one model; a weights-only MODEL and --weights give it twice.
    "weights_twice": (("plan", "inject", "export"), lambda f: [f["sd"], *TINY, "--weights", f["sd"], "--input-shape",
                                                               "1,8"], "give them once"),
    "weights_do_not_fit_arch": (("plan", "inject"), lambda f: [*TINY, "--arch-kwargs", '{"width": 4}', "--weights",
                                                               f["sd"]], "do not fit"),
    "weights_missing": (("plan", "inject"), lambda f: [*TINY, "--weights", f["sd"].with_name("nope.pt")], "nope.pt"),
    "weights_pickled_model": (("plan", "inject"), lambda f: [*TINY, "--weights", f["full"]], "--trust-pickle"),
    "output_is_weights": (("inject",), lambda f: [*TINY, "--weights", f["sd"], "-o", f["sd"]], "input"),
    "unknown_mode": (("inject",), lambda f: [f["sd"], *TINY, "--mode", "column"], "mode"),
    "unknown_scaling": (("inject",), lambda f: [f["sd"], *TINY, "--scaling", "sqrt"], "scaling"),
}


def _copy(path: Path, name: str) -> Path:
    target = path.with_name(name)
    target.write_bytes(path.read_bytes())
    return target


def test_arch_with_weights_is_the_model_that_model_with_arch_is(files, tiny_model, work):
    """`--arch X --weights W` (as export and batch spell it) loads what `W --arch X` loads, in plan and inject."""
    by_weights = invoke("plan", *TINY, "--weights", files["sd"], "--input-shape", "1,8", "--json")
    by_model = invoke("plan", files["sd"], *TINY, "--input-shape", "1,8", "--json")
    assert_ok(by_weights)
    assert_ok(by_model)
    a, b = json.loads(by_weights.stdout), json.loads(by_model.stdout)
    assert a.pop("model") == "archs:tiny_resnet" and b.pop("model") == str(files["sd"])
    assert a == b and a["num_sites"] == 2
    result = invoke("inject", *TINY, "--weights", files["sd"], "-o", work / "w.sd.pt", "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["weights_only"] is True
    loaded = sdsurgeon.load(work / "w.sd.pt").state_dict()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(loaded[k], v), k  # the weights of W, not the factory's fresh ones
    torch.manual_seed(1)
    fresh = archs.tiny_resnet().state_dict()
    assert any(not torch.equal(fresh[k], v) for k, v in tiny_model.state_dict().items())  # the check can tell


def test_weights_into_a_model_file_are_its_trained_weights(files, tiny_model, work):
    """MODEL holding a model (here an sdsurgeon file) and --weights: the weights replace the file's own."""
    assert_ok(invoke("inject", *TINY, "-o", work / "fresh.sd.pt"))  # fresh weights from the factory
    result = invoke("plan", work / "fresh.sd.pt", "--weights", files["sd"], "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["num_sites"] == 2
    torch.manual_seed(3)
    other = work / "other.pt"
    torch.save(archs.tiny_resnet(width=4).state_dict(), other)
    assert "do not fit" in assert_user_error(invoke("plan", work / "fresh.sd.pt", "--weights", other))


def test_weights_rule_is_in_every_commands_help():
    for command in ("plan", "inject", "export"):
        result = invoke(command, "--help")
        assert_ok(result)
        text = " ".join(result.stdout.replace("│", " ").split())  # the options table's borders and wraps
        assert "--weights" in text and "give the weights twice: an error" in text, command


@pytest.mark.parametrize(
    "command, case",
    [(cmd, case) for case, (cmds, _, _) in USER_ERRORS.items() for cmd in cmds],
)
def test_user_error_exits_1_with_one_line_and_writes_nothing(files, command, case):
    _, make_args, message = USER_ERRORS[case]
    args = make_args(files)
    folder = files["sd"].parent.parent  # the whole tmp_path: also catches writes next to -o targets
    before = listing(folder)
    line = assert_user_error(invoke(command, *args))
    assert message in line
    assert listing(folder) == before


# User mistakes that once escaped as raw exceptions (a traceback, not one line).
def test_arch_kwargs_rejected_by_factory_is_a_user_error(work):
    assert_user_error(invoke("plan", *RESNET20[:2], "--arch-kwargs", '{"depth": 7}'))


def test_input_shape_that_does_not_fit_the_model_is_a_user_error(work):
    assert_user_error(invoke("plan", *TINY, "--input-shape", "1,5"))


def test_output_that_is_a_folder_is_a_user_error(files, tmp_path):
    before = listing(tmp_path)
    assert_user_error(invoke("inject", files["sd"], *TINY, "-o", files["sd"].parent))
    assert listing(tmp_path) == before


# --- bad usage: exit 2 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["plan", "--arch", "archs:tiny_resnet", "--no-such-option"],
        ["inject", "--arch", "archs:tiny_resnet", "--bogus", "1"],
        ["plan", "--arch", "archs:tiny_resnet", "--pL", "half"],
        ["inject", "--arch", "archs:tiny_resnet", "--seed", "x"],
        ["inject", "--arch"],
        ["no-such-command"],
    ],
)
def test_bad_usage_exits_2(work, args):
    result = invoke(*args)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert listing(work) == []


# --- python -m sdsurgeon ----------------------------------------------------------------------------


def _python_m(*args, cwd: Path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "sdsurgeon", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


@pytest.mark.multiprocess
def test_python_m_help(tmp_path):
    proc = _python_m("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "plan" in proc.stdout and "inject" in proc.stdout


@pytest.mark.multiprocess
def test_python_m_user_error_is_one_line_on_real_stderr(tmp_path):
    proc = _python_m("plan", "--arch", "archs:tiny_resnet", "--pL", "0", cwd=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--pL" in lines[0], proc.stderr
