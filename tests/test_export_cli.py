"""`sdsurgeon export` through typer's CliRunner: the verified ONNX file, its options, and user errors that write nothing."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke, one_json
from sdsurgeon.deploy.export import RANDOM_OPS
from sdsurgeon.models import cifar_resnet

# A ResNet-8 of width 4: three residual blocks (one per stage), so three gates; about 3 s per export.
ARCH = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8, "width": 4}']
SHAPE = (1, 3, 16, 16)
GATES = 3
MODEL = "resnet8.sd.pt"  # the injected file's name in every work folder
TOL = {"rtol": 1e-4, "atol": 1e-5}









def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden temp files included) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_nothing_written(folder: Path, before: dict[str, bytes]) -> None:
    after = snapshot(folder)
    assert not [n for n in after if n.endswith(".onnx") and n not in before], after.keys()
    assert not [n for n in after if Path(n).name.startswith(".") and n.endswith(".tmp")], after.keys()
    assert not list(folder.rglob(".*.tmp")), "a staged temp folder was left"
    assert after.keys() == before.keys()
    assert all(after[n] == before[n] for n in before), "a file was changed"


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    return session.run(None, {onnx_input.name: x.numpy()})[0]


def run_torch(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(x).numpy()


def fresh_input(batch: int = 3, seed: int = 123) -> torch.Tensor:
    return torch.randn(batch, *SHAPE[1:], generator=torch.Generator().manual_seed(seed))


def count_ops(path: Path, op_type: str) -> int:
    return sum(1 for n in onnx.load(str(path)).graph.node if n.op_type == op_type)


def batch_dim(path: Path):
    (graph_input,) = onnx.load(str(path)).graph.input
    return graph_input.type.tensor_type.shape.dim[0]


# --- fixtures ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def injected(tmp_path_factory) -> Path:
    """`sdsurgeon inject --input-shape ...` of a seeded ResNet-8: the file every test exports (read-only)."""
    path = tmp_path_factory.mktemp("injected") / MODEL
    torch.manual_seed(0)
    assert_ok(invoke("inject", *ARCH, "--input-shape", ",".join(map(str, SHAPE)), "--seed", "0", "-o", path))
    return path


@pytest.fixture(scope="module")
def default_export(injected, tmp_path_factory):
    """`export MODEL -o out.onnx --json` with no input shape (inject's is remembered); shared, read-only."""
    folder = tmp_path_factory.mktemp("default_export")
    result = invoke("export", injected, "-o", folder / "out.onnx", "--json")
    return result, folder / "out.onnx"


@pytest.fixture
def work(tmp_path, monkeypatch, injected) -> Path:
    """The current directory, holding a copy of the injected file as MODEL."""
    folder = tmp_path / "work"
    folder.mkdir()
    shutil.copy(injected, folder / MODEL)
    monkeypatch.chdir(folder)
    return folder


# --- success ----------------------------------------------------------------------------------------


def test_export_json_remembers_the_input_shape_and_matches_onnxruntime(default_export, injected):
    result, path = default_export
    record = one_json(result)
    assert {"nodes", "folded", "gates", "max_abs_error", "file_bytes", "output"} <= record.keys()
    assert record["output"] == str(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.onnx"]  # no temp file beside it
    assert record["gates"] == GATES and record["folded"] == GATES and record["fold"] is True
    assert record["scale_nodes"] == 0 and record["multiplies"] == []
    assert record["file_bytes"] == path.stat().st_size
    assert record["nodes"] == len(onnx.load(str(path)).graph.node)
    assert record["dynamic_inputs"] and record["verify"]["ok"] is True
    assert 0 <= record["max_abs_error"] <= TOL["atol"] + TOL["rtol"]
    assert not {n.op_type for n in onnx.load(str(path)).graph.node} & RANDOM_OPS

    # Independently of the command's own check: onnxruntime on a batch of 3 vs the injected model in eval.
    x = fresh_input(batch=3)
    got = run_onnx(path, x)
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, run_torch(sdsurgeon.load(injected), x), **TOL)
    np.testing.assert_array_equal(got, run_onnx(path, x))  # deterministic


@pytest.mark.onnx
def test_text_report_has_no_exporter_noise(work):
    result = invoke("export", MODEL)  # no -o: <stem>.onnx beside MODEL
    assert_ok(result)
    assert result.stderr == ""
    lines = result.stdout.strip("\n").splitlines()
    assert [line.split(" ")[0] for line in lines] == ["folded", "ONNX:", "onnxruntime", "wrote"], result.stdout
    assert lines[0] == f"folded {GATES} of {GATES} gates into their branch's weights"
    assert "dynamic batch" in lines[1]
    assert lines[2].startswith("onnxruntime vs the injected model in eval")
    assert lines[3].startswith("wrote resnet8.onnx in ")
    for line in lines:
        for noise in ("torch.onnx", "Warning", "W11", "[torch"):
            assert noise not in line, line
    assert sorted(os.listdir(work)) == ["resnet8.onnx", MODEL]


@pytest.mark.onnx
def test_no_fold_keeps_one_mul_per_gate(default_export, injected, tmp_path):
    folded_path = default_export[1]
    path = tmp_path / "nofold.onnx"
    record = one_json(invoke("export", injected, "--no-fold", "-o", path, "--json"))
    assert record["fold"] is False and record["folded"] == 0
    assert record["scale_nodes"] == record["gates"] == GATES
    assert len(record["multiplies"]) == GATES
    assert count_ops(path, "Mul") - count_ops(folded_path, "Mul") == GATES
    assert record["nodes"] - len(onnx.load(str(folded_path)).graph.node) == GATES


@pytest.mark.onnx
def test_compare_exports_the_ungated_architecture_for_its_node_count(default_export, injected, tmp_path):
    folded = one_json(invoke("export", injected, "--compare", "-o", tmp_path / "f.onnx", "--json"))
    multiplied = one_json(invoke("export", injected, "--compare", "--no-fold", "-o", tmp_path / "m.onnx", "--json"))
    assert folded["original_nodes"] == multiplied["original_nodes"] == folded["nodes"]
    assert multiplied["nodes"] == multiplied["original_nodes"] + GATES
    assert one_json(default_export[0])["original_nodes"] is None  # measured only when asked: a second export


@pytest.mark.onnx
def test_static_batch_fixes_the_first_input_dimension(default_export, injected, tmp_path):
    dynamic = batch_dim(default_export[1])
    assert dynamic.dim_param and not dynamic.HasField("dim_value")
    path = tmp_path / "static.onnx"
    record = one_json(invoke("export", injected, "--static-batch", "-o", path, "--json"))
    assert record["dynamic_inputs"] == []
    static = batch_dim(path)
    assert static.HasField("dim_value") and static.dim_value == SHAPE[0]
    assert not static.dim_param


@pytest.mark.onnx
def test_weights_option_exports_the_trained_weights(work):
    untrained = sdsurgeon.load(MODEL)
    model = sdsurgeon.load(MODEL)
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(8, *SHAPE[1:], generator=g)
        y = torch.randint(0, 10, (8,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    torch.save(model.state_dict(), "trained.pt")

    assert_ok(invoke("export", MODEL, "--weights", "trained.pt", "-o", "t.onnx"))
    x = fresh_input(batch=3)
    got = run_onnx(work / "t.onnx", x)
    np.testing.assert_allclose(got, run_torch(model, x), **TOL)
    untrained_out = run_torch(untrained, x)
    assert not np.allclose(got, untrained_out, **TOL)  # the test can tell trained from untrained weights
    assert np.abs(got - untrained_out).max() > 1e-3


# --- user errors: exit 1, one line, no traceback, no file ------------------------------------------


def _other_weights(folder: Path, name: str, **kwargs) -> str:
    torch.save(cifar_resnet(**kwargs).state_dict(), folder / name)
    return name


def _copy(folder: Path, name: str) -> str:
    shutil.copy(folder / MODEL, folder / name)
    return name


def _mkdir(folder: Path, name: str) -> str:
    (folder / name).mkdir()
    return name


# case: (args built in the work folder, which may create files there first; text the message must contain)
USER_ERRORS = {
    "no_input_shape": (lambda w: [*ARCH, "-o", "a.onnx"], "--input-shape"),
    "input_shape_not_numbers": (lambda w: [MODEL, "--input-shape", "1,3,abc", "-o", "a.onnx"], "--input-shape"),
    "input_shape_letter_x": (lambda w: [MODEL, "--input-shape", "1,3,x", "-o", "a.onnx"], "--input-shape"),
    "input_shape_zero": (lambda w: [MODEL, "--input-shape", "0,3,16,16", "-o", "a.onnx"], "--input-shape"),
    "output_folder_missing": (lambda w: [MODEL, "-o", "missing_dir/a.onnx"], "does not exist"),
    "output_is_a_folder": (lambda w: [MODEL, "-o", _mkdir(w, "dir.onnx")], "folder"),
    "output_not_onnx": (lambda w: [MODEL, "-o", "out.txt"], ".onnx"),
    "output_is_input": (lambda w: [MODEL, "-o", MODEL], ".onnx"),  # refused by the suffix rule first
    "output_is_input_onnx_name": (lambda w: [_copy(w, "model.onnx"), "-o", "model.onnx"], "input"),
    "default_output_is_input": (lambda w: [_copy(w, "model.onnx")], "input"),
    "output_is_weights": (lambda w: [MODEL, "--weights", _copy(w, "w.onnx"), "-o", "w.onnx"], "input"),
    "weights_other_depth": (lambda w: [MODEL, "--weights", _other_weights(w, "resnet14.pt", depth=14, width=4)],
                            "resnet14.pt"),
    "weights_other_width": (lambda w: [MODEL, "--weights", _other_weights(w, "wide.pt", depth=8, width=8)],
                            "wide.pt"),
    "weights_missing": (lambda w: [MODEL, "--weights", "nope.pt", "-o", "a.onnx"], "nope.pt"),
    "negative_rtol": (lambda w: [MODEL, "--rtol", "-1e-4", "-o", "a.onnx"], "--rtol"),
    "negative_atol": (lambda w: [MODEL, "--atol", "-1", "-o", "a.onnx"], "--atol"),
}


@pytest.mark.parametrize("case", list(USER_ERRORS))
def test_user_error_exits_1_with_one_line_and_writes_nothing(work, tmp_path, case):
    make_args, message = USER_ERRORS[case]
    args = make_args(work)
    before = snapshot(tmp_path)  # the whole tmp_path: also catches writes beside a missing -o folder
    line = assert_user_error(invoke("export", *args))
    assert message in line, line
    assert_nothing_written(tmp_path, before)


@pytest.mark.onnx
def test_tolerance_miss_keeps_no_file(work):
    """rtol = atol = 0: folding p into BN weights changes float rounding, so onnxruntime differs by ~1e-8."""
    before = snapshot(work)
    line = assert_user_error(invoke("export", MODEL, "--rtol", "0", "--atol", "0", "-o", "exact.onnx"))
    assert "onnxruntime" in line and "no ONNX file was kept" in line, line
    assert_nothing_written(work, before)


@pytest.mark.onnx
def test_tolerance_miss_keeps_an_existing_output_unchanged(work):
    (work / "old.onnx").write_bytes(b"an earlier export")
    before = snapshot(work)
    assert_user_error(invoke("export", MODEL, "--rtol", "0", "--atol", "0", "-o", "old.onnx"))
    assert_nothing_written(work, before)


def test_input_shape_that_does_not_fit_the_model_writes_nothing(work):
    """3 channels expected, 5 given: caught by a forward before export, and said in the user's terms."""
    before = snapshot(work)
    line = assert_user_error(invoke("export", MODEL, "--input-shape", "1,5,16,16", "-o", "a.onnx"))
    assert "--input-shape" in line and "5 channels" in line, line
    assert_nothing_written(work, before)


def test_input_name_not_a_forward_argument_is_a_user_error(work):
    before = snapshot(work)
    line = assert_user_error(invoke("export", MODEL, "--input", "y:1,3,16,16", "-o", "a.onnx"))
    assert "--input" in line
    assert_nothing_written(work, before)


@pytest.mark.onnx
def test_opset_the_exporter_cannot_write_is_refused(work):
    before = snapshot(work)
    # torch.onnx raises a requested opset 17 to 18 (no Pad adapter down to 17): refused, not silently changed
    assert "--opset" in assert_user_error(invoke("export", MODEL, "--opset", "17", "-o", "a.onnx"))
    assert_nothing_written(work, before)


@pytest.mark.multiprocess
@pytest.mark.onnx
def test_exporter_failure_is_one_clean_line_on_the_real_stderr(work):
    # Only a real process shows what torch's log handlers (bound to the real stderr at import) print.
    tests_dir = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")]))}
    before = snapshot(work)
    proc = subprocess.run([sys.executable, "-m", "sdsurgeon", "export", "--arch", "archs:data_dependent",
                           "--input-shape", "4,8", "-o", "a.onnx"], capture_output=True, text=True, cwd=work,
                          env=env, timeout=300)
    assert proc.returncode == 1 and proc.stdout == "", (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip("\n").splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: torch.onnx.export failed"), proc.stderr
    assert "\x1b" not in lines[0], lines[0]
    assert_nothing_written(work, before)


# --- usage and help ---------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [["--rtol", "tight"], ["--opset", "x"], ["--no-such-option"]])
def test_bad_usage_exits_2(work, args):
    result = invoke("export", MODEL, *args)
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    assert sorted(os.listdir(work)) == [MODEL]


def test_export_help():
    result = invoke("export", "--help")
    assert_ok(result)
    for text in ("--no-fold", "--weights", "--static-batch", "Example"):
        assert text in result.stdout, text


@pytest.mark.onnx
def test_a_model_saved_whole_injects_and_exports_through_the_cli(work):
    # the mission's two commands on the most common checkpoint format: torch.save(model)
    torch.manual_seed(0)
    model = cifar_resnet(8, width=4)
    torch.save(model, work / "whole.pt")
    assert_ok(invoke("inject", "whole.pt", "--trust-pickle", "--pL", "0.5", "--input-shape", "1,3,16,16"))
    result = invoke("export", "whole.sd.pt", "--trust-pickle", "--fold", "-o", "whole.onnx", "--json")
    assert_ok(result)
    record = json.loads(result.stdout)
    assert record["verify"]["ok"] is True
    injected = sdsurgeon.load(work / "whole.sd.pt", trust_pickle=True)
    assert len(sdsurgeon.gates(injected)) == GATES
    x = torch.randn(2, 3, 16, 16)
    (got,) = ort.InferenceSession(str(work / "whole.onnx")).run(None, {"x": x.numpy()})
    reference = model.eval()  # by hand: each block's bn2 output scaled by its p_l
    for block, p in zip([m for m in reference.modules() if type(m).__name__ == "BasicBlock"], (5 / 6, 4 / 6, 3 / 6)):
        block.bn2.register_forward_hook(lambda _m, _i, out, p=p: out * p)
    with torch.no_grad():
        np.testing.assert_allclose(got, reference(x).numpy(), **TOL)
