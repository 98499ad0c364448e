"""ONNX past 2 GB (issue 27 item 4): the weights go to external data beside the graph, written as a pair, verified."""

from __future__ import annotations

import gc
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import sdsurgeon
from cli_helpers import assert_ok, invoke
from sdsurgeon.batch.config import load_config, plan_jobs
from sdsurgeon.batch.runner import run_job, skipped_record, up_to_date
from sdsurgeon.deploy import export
from sdsurgeon.errors import ExportError, WriteError
from sdsurgeon.io.files import staged_pair
from sdsurgeon.models import cifar_resnet
from sdsurgeon.pipeline import ConvertOptions, convert


def listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --- the staged pair ----------------------------------------------------------------------------------------


def test_a_staged_pair_appears_together_and_replaces_the_old_pair(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"old graph")
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    with staged_pair(tmp_path / "m.onnx", ".data") as tmp:
        assert tmp.name == "m.onnx" and tmp.parent != tmp_path  # the final names, in a temp folder
        tmp.write_bytes(b"new graph")
        (tmp.parent / "m.onnx.data").write_bytes(b"new weights")
        assert (tmp_path / "m.onnx").read_bytes() == b"old graph"  # nothing changes before the block ends
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx").read_bytes() == b"new graph"
    assert (tmp_path / "m.onnx.data").read_bytes() == b"new weights"


def test_a_failed_pair_writes_nothing_and_keeps_the_old_pair(tmp_path):
    with pytest.raises(RuntimeError, match="check failed"):
        with staged_pair(tmp_path / "m.onnx", ".data") as tmp:
            tmp.write_bytes(b"graph")
            (tmp.parent / "m.onnx.data").write_bytes(b"weights")
            raise RuntimeError("check failed")
    assert listing(tmp_path) == []
    (tmp_path / "m.onnx").write_bytes(b"old graph")
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    with pytest.raises(RuntimeError, match="check failed"):
        with staged_pair(tmp_path / "m.onnx", ".data") as tmp:
            tmp.write_bytes(b"graph")
            raise RuntimeError("check failed")
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert (tmp_path / "m.onnx.data").read_bytes() == b"old weights"


def test_a_single_file_replaces_an_old_pair_whole(tmp_path):
    """A model now under the threshold: the old weights file would sit beside a graph that does not name it."""
    (tmp_path / "m.onnx").write_bytes(b"old graph")
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    with staged_pair(tmp_path / "m.onnx", ".data") as tmp:
        tmp.write_bytes(b"graph with its weights")
    assert listing(tmp_path) == ["m.onnx"]
    assert (tmp_path / "m.onnx").read_bytes() == b"graph with its weights"


def test_a_pair_whose_companion_is_a_folder_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "m.onnx.data").mkdir()
    with pytest.raises(WriteError, match=r"m\.onnx\.data: it is a folder"):
        with staged_pair(tmp_path / "m.onnx", ".data"):
            pytest.fail("the block ran")
    assert listing(tmp_path) == ["m.onnx.data"]


# --- a model with external data -------------------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class Embedded(nn.Module):
    """A big embedding table (the weights) and a tiny residual block to gate and fold (the compute)."""

    def __init__(self, rows: int, dim: int, blocks: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))
        self.blocks = nn.Sequential(*(Block(dim) for _ in range(blocks)))
        self.head = nn.Linear(dim, 4)

    def forward(self, ids):
        return self.head(self.blocks(self.embed(ids)))


def gated(rows: int, dim: int, used: int = 64) -> tuple[nn.Module, torch.Tensor]:
    """The model with gates, and token ids below ``used``: those rows random, the rest a constant (cheap to make,
    still every page written, as a trained table's are)."""
    torch.manual_seed(0)
    model = Embedded(rows, dim).eval()
    with torch.no_grad():
        model.embed.weight[used:].fill_(0.01)
        model.embed.weight[:used].normal_()
    ids = torch.randint(0, used, (2, 5))
    return sdsurgeon.inject(model, 0.5, example_inputs=ids).eval(), ids


def onnxruntime_output(path, ids: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: ids.numpy()})[0]


@pytest.mark.onnx
def test_weights_past_the_threshold_go_to_a_data_file_beside_the_graph(tmp_path, monkeypatch):
    """The threshold lowered: a 1 MB table takes the path a 2 GB one does."""
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 2**20 // 2)
    model, ids = gated(4096, 64)
    with torch.no_grad():
        expected = model(ids).numpy()  # torch's own output, in eval: x + p f(x)
    result = convert(model, ConvertOptions(), output=tmp_path / "m.onnx")
    assert listing(tmp_path) == ["m.onnx", "m.onnx.data"]
    graph, data = (tmp_path / "m.onnx").stat().st_size, (tmp_path / "m.onnx.data").stat().st_size
    table = model.embed.weight.numel() * 4
    assert data >= table and graph < table / 4  # the weights are in the data file, not the graph
    assert result.to_dict()["external_data"] == {"path": str(tmp_path / "m.onnx.data"), "bytes": data}
    assert result.to_dict()["file_bytes"] == graph
    np.testing.assert_allclose(onnxruntime_output(tmp_path / "m.onnx", ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.onnx
def test_under_the_threshold_one_file_replaces_an_old_pair(tmp_path, monkeypatch):
    model, ids = gated(4096, 64)
    (tmp_path / "m.onnx").write_bytes(b"old graph")
    (tmp_path / "m.onnx.data").write_bytes(b"old weights")
    result = convert(model, ConvertOptions(), output=tmp_path / "m.onnx")
    assert listing(tmp_path) == ["m.onnx"]
    assert result.to_dict()["external_data"] is None
    assert (tmp_path / "m.onnx").stat().st_size > model.embed.weight.numel() * 4


@pytest.mark.onnx
def test_the_command_line_says_where_the_weights_went(work, monkeypatch):
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    model = cifar_resnet(depth=8, width=4)
    torch.save(model.state_dict(), work / "m.pt")
    arch = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8, "width": 4}',
            "--input-shape", "1,3,8,8"]
    result = invoke("export", work / "m.pt", *arch, "-o", work / "m.onnx")
    assert_ok(result)
    data = work / "m.onnx.data"
    assert f"wrote {work / 'm.onnx'} and its weights {data} (" in result.stdout
    result = invoke("export", work / "m.pt", *arch, "-o", work / "m.onnx", "--json")
    assert_ok(result)
    assert json.loads(result.stdout)["external_data"] == {"path": str(data), "bytes": data.stat().st_size}


@pytest.mark.onnx
def test_a_data_file_that_is_an_input_is_refused(work):
    """The weights file would replace (or, under 2 GB, remove) whatever is at <output>.data: never an input."""
    torch.save(cifar_resnet(depth=8, width=4).state_dict(), work / "m.onnx.data")
    result = invoke("export", work / "m.onnx.data", "--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs",
                    '{"depth": 8, "width": 4}', "--input-shape", "1,3,8,8", "-o", work / "m.onnx")
    assert result.exit_code == 1, result.stdout
    assert "is the input" in result.stderr and "Traceback" not in result.stderr
    assert listing(work) == ["m.onnx.data"]


@pytest.mark.onnx
def test_a_batch_job_lists_the_data_file_and_is_up_to_date_only_with_it(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("defaults:\n  input_shape: [1, 32]\nmodels:\n  - name: a\n    arch: archs:tiny_resnet\n"
                   "    arch_kwargs: {width: 32}\n")  # tensors of 4 kB: under 256 bytes they stay in the graph
    (job,) = plan_jobs(load_config(cfg))
    record = run_job(job)
    assert record.status == "ok", record.error
    data = tmp_path / "out" / "a.onnx.data"
    assert record.outputs == [str(tmp_path / "out" / "a.onnx"), str(data)] and data.is_file()
    assert up_to_date(job) and skipped_record(job).outputs == record.outputs
    data.unlink()  # the graph alone is no model: the job runs again
    assert not up_to_date(job)


@pytest.mark.onnx
def test_a_graph_too_big_even_without_its_weights_is_one_error_and_no_file(tmp_path, monkeypatch):
    """Large constants in the graph itself can still pass protobuf's limit: the error says so, nothing is left."""
    from google.protobuf.message import EncodeError
    from torch.onnx._internal.exporter._onnx_program import ONNXProgram

    def save(self, destination, **_kwargs):
        with open(destination, "wb") as f:
            f.write(b"half a graph")
        raise EncodeError("Failed to serialize proto")

    monkeypatch.setattr(ONNXProgram, "save", save)
    model, _ = gated(256, 16)
    with pytest.raises(ExportError, match=r"the ONNX graph is over 2 GB even with its 0\.00 GiB of weights"):
        convert(model, ConvertOptions(), output=tmp_path / "m.onnx")
    assert listing(tmp_path) == []


# --- past 2 GB for real ---------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.onnx
def test_a_model_past_2_gb_exports_with_external_data(tmp_path):
    """540M float32 entries (2.16 GB): protobuf's 2 GB limit made this a traceback."""
    rows, dim = 2_109_375, 256  # 540,000,000 entries
    model, ids = gated(rows, dim)
    with torch.no_grad():
        expected = model(ids).numpy()
    result = convert(model, ConvertOptions(), output=tmp_path / "big.onnx").to_dict()
    table = rows * dim * 4
    del model  # onnxruntime's copy below is the test's own
    gc.collect()
    assert table > 2**31
    assert listing(tmp_path) == ["big.onnx", "big.onnx.data"]
    assert result["external_data"]["bytes"] == (tmp_path / "big.onnx.data").stat().st_size >= table
    assert result["file_bytes"] == (tmp_path / "big.onnx").stat().st_size < 2**20
    assert result["folded"] == 2 and result["verify"]["ok"]
    np.testing.assert_allclose(onnxruntime_output(tmp_path / "big.onnx", ids), expected, rtol=1e-5, atol=1e-6)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
