"""Pruning: `export --drop`, `sdsurgeon.prune`, block influence and `plan --prune-curve`, checked against hand-made copies."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke, one_json
from sdsurgeon.models import BasicBlock, cifar_resnet
from zoo import POSITIVE, linear_ps

ARCH = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 14, "width": 4}']
SHAPE = (1, 3, 16, 16)
BLOCKS = 6  # ResNet-14: two blocks per stage


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Batch norms with random statistics and affine parameters, so scaling or zeroing one shows in the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def hand_pruned(plain: nn.Module, p: list[float], dropped: set[int]) -> nn.Module:
    """The paper's inference rule by hand: block l's branch ends in bn2, so scaling bn2's weight and bias by p_l
    scales the branch; zeroing them removes it (block l = relu(shortcut(x)))."""
    ref = copy.deepcopy(plain).eval()
    blocks = [m for m in ref.modules() if isinstance(m, BasicBlock)]
    with torch.no_grad():
        for l, block in enumerate(blocks):
            scale = 0.0 if l in dropped else p[l]
            block.bn2.weight.mul_(scale)
            block.bn2.bias.mul_(scale)
    return ref


def run_onnx(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_input,) = session.get_inputs()
    return session.run(None, {onnx_input.name: x.numpy()})[0]


def ops(path: Path, op_type: str | None = None) -> int:
    return sum(1 for n in onnx.load(str(path)).graph.node if op_type is None or n.op_type == op_type)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, nn.Module, list[float]]:
    """A ResNet-14 (random batch norms) injected through the CLI: (its .sd.pt, the plain model, each block's p_l)."""
    folder = tmp_path_factory.mktemp("prune")
    torch.manual_seed(0)
    plain = randomised(cifar_resnet(14, width=4))
    torch.save(plain.state_dict(), folder / "weights.pt")
    assert_ok(invoke("inject", folder / "weights.pt", *ARCH, "--input-shape", ",".join(map(str, SHAPE)),
                     "-o", folder / "m.sd.pt"))
    p = [g.p for g in sdsurgeon.gates(sdsurgeon.load(folder / "m.sd.pt"))]
    return folder / "m.sd.pt", plain, p


@pytest.fixture
def work(tmp_path, monkeypatch, trained) -> Path:
    shutil.copy(trained[0], tmp_path / "m.sd.pt")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _x(batch: int, seed: int = 5, side: int = SHAPE[-1]) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(seed))


# --- export --drop -----------------------------------------------------------------------------------------


@pytest.mark.onnx
def test_pruned_onnx_equals_a_hand_made_copy_with_the_dropped_branches_zeroed(work, trained):
    _, plain, p = trained
    record = one_json(invoke("export", "m.sd.pt", "--drop", "2", "-o", "pruned.onnx", "--json"))
    # schedule order: lowest p_l first, the deepest first among equals: the last two blocks
    assert record["dropped"] == ["layers.4:add", "layers.5:add"]
    assert record["kept"] == [f"layers.{i}:add" for i in range(4)]
    reference = hand_pruned(plain, p, dropped={4, 5})
    for batch in (2, 5):
        x = _x(batch)
        with torch.no_grad():
            want = reference(x).numpy()
        np.testing.assert_allclose(run_onnx(work / "pruned.onnx", x), want, rtol=1e-4, atol=1e-5)
    assert record["nodes_after"] == ops(work / "pruned.onnx") < record["nodes_before"]
    # the two dropped blocks held their two convolutions each; nothing else went
    assert ops(work / "pruned.onnx", "Conv") == 1 + 2 * (BLOCKS - 2)
    removed = sum(q.numel() for b in (plain.layers[4], plain.layers[5]) for q in b.parameters())
    assert record["params_before"] == sum(q.numel() for q in plain.parameters())
    assert record["params_after"] == record["params_before"] - removed
    assert record["drop_by"] == "schedule" and record["calibration"].startswith("16 random samples")
    fidelity = record["fidelity"]
    assert fidelity["samples"] == 16 and 0 < fidelity["rel_error"] and fidelity["cosine"] < 1
    assert fidelity["top1_agreement"] is not None


@pytest.mark.onnx
def test_drop_zero_equals_plain_fold_and_drop_all_leaves_only_skips(work, trained):
    _, plain, p = trained
    folded = one_json(invoke("export", "m.sd.pt", "-o", "folded.onnx", "--json"))
    none = one_json(invoke("export", "m.sd.pt", "--drop", "0", "-o", "none.onnx", "--json"))
    every = one_json(invoke("export", "m.sd.pt", "--drop", "100%", "-o", "all.onnx", "--json"))
    x = _x(3)
    np.testing.assert_allclose(run_onnx(work / "none.onnx", x), run_onnx(work / "folded.onnx", x), rtol=1e-5, atol=1e-6)
    assert none["nodes"] == folded["nodes"] and none["dropped"] == [] and none["fidelity"]["rel_error"] < 1e-6
    assert len(every["dropped"]) == BLOCKS and every["kept"] == []
    assert ops(work / "all.onnx", "Conv") == 1  # the stem alone: every block is its skip (option A: slice + pad)
    with torch.no_grad():
        want = hand_pruned(plain, p, dropped=set(range(BLOCKS)))(x).numpy()
    np.testing.assert_allclose(run_onnx(work / "all.onnx", x), want, rtol=1e-4, atol=1e-5)


class ProjectionBlock(nn.Module):
    """conv + bn branch with a 1x1 conv projection shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.proj = nn.Conv2d(cin, cout, 1, stride) if (cin != cout or stride != 1) else None

    def forward(self, x):
        skip = self.proj(x) if self.proj is not None else x
        return F.relu(skip + self.bn(self.conv(x)))


class ProjectionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, 1, 1)
        self.blocks = nn.Sequential(ProjectionBlock(4, 8, 2), ProjectionBlock(8, 8, 1))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def test_a_dropped_block_keeps_its_projection_shortcut():
    torch.manual_seed(1)
    net = randomised(ProjectionNet())
    injected = sdsurgeon.inject(net, 0.5, example_inputs=_x(1))
    pruned, report = sdsurgeon.prune(injected, sites=r"blocks\.0", calibration=_x(4))
    assert report.dropped == ["blocks.0:add"] and report.by == "sites"
    reference = copy.deepcopy(net)
    with torch.no_grad():
        reference.blocks[0].bn.weight.zero_()
        reference.blocks[0].bn.bias.zero_()
        reference.blocks[1].bn.weight.mul_(0.5)  # p of the last block at p_L 0.5
        reference.blocks[1].bn.bias.mul_(0.5)
        x = _x(3)
        torch.testing.assert_close(pruned(x), reference(x))
    kept = {n for n, q in net.named_parameters()} - {"blocks.0.conv.weight", "blocks.0.bn.weight", "blocks.0.bn.bias"}
    assert report.params_after == sum(q.numel() for n, q in net.named_parameters() if n in kept)
    assert sdsurgeon.gates(pruned) == [] and not any(isinstance(m, sdsurgeon.StochasticDepth) for m in pruned.modules())
    # the state_dict keys stay the original's: trained weights still load into the original architecture
    assert pruned.state_dict().keys() == net.state_dict().keys()


# --- which blocks ----------------------------------------------------------------------------------------------


def _near_identity(model: nn.Module, blocks: tuple[int, ...]) -> nn.Module:
    with torch.no_grad():
        for l in blocks:
            model.layers[l].bn2.weight.mul_(1e-3)
            model.layers[l].bn2.bias.mul_(1e-3)
    return model


def test_influence_ranks_blocks_made_near_identity_lowest_and_drop_by_influence_removes_them():
    torch.manual_seed(2)
    plain = _near_identity(randomised(cifar_resnet(14, width=4)), (1, 3))
    injected = sdsurgeon.inject(plain, 0.5, example_inputs=_x(1, side=8))
    x = _x(8, side=8)
    influence = sdsurgeon.block_influence(injected, x)
    assert list(influence) == [f"layers.{i}:add" for i in range(BLOCKS)]
    lowest = sorted(influence, key=influence.get)[:2]
    assert set(lowest) == {"layers.1:add", "layers.3:add"}, influence
    # against a hand computation for block 0 (identity shortcut): 1 - cos(x, x + p * branch(x)) per sample
    p0 = sdsurgeon.gates(injected)[0].p
    seen = {}
    hook = plain.layers[0].register_forward_hook(lambda m, args, out: seen.setdefault("x", args[0]))
    with torch.no_grad():
        plain(x)
        hook.remove()
        block, inp = plain.layers[0], seen["x"]
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(inp)))))
        a, b = inp.flatten(1).double(), (inp + p0 * branch).flatten(1).double()
        want = float((1 - F.cosine_similarity(a, b, dim=1)).mean())
    assert influence["layers.0:add"] == pytest.approx(want, rel=1e-4)
    _, report = sdsurgeon.prune(injected, 2, by="influence", calibration=x)
    assert report.dropped == ["layers.1:add", "layers.3:add"] and report.influence == influence
    _, by_schedule = sdsurgeon.prune(injected, 2, calibration=x)
    assert by_schedule.dropped == ["layers.4:add", "layers.5:add"]
    # the measure is the point: those two blocks barely mattered, the deepest two did
    assert report.fidelity.rel_error < by_schedule.fidelity.rel_error


def test_drop_share_rounds_half_up_and_counts_every_gated_block():
    from sdsurgeon.surgery.prune import drop_count

    assert [drop_count(v, 54) for v in ("0", "25%", "50%", "100%", "13", 13)] == [0, 14, 27, 54, 13, 13]
    assert drop_count("1%", 54) == 1 and drop_count("0.9%", 54) == 0


def test_fidelity_of_prune_is_measured_against_the_unpruned_model_by_hand():
    torch.manual_seed(3)
    plain = randomised(cifar_resnet(14, width=4))
    injected = sdsurgeon.inject(plain, 0.5, example_inputs=_x(1, side=8))
    p = [g.p for g in sdsurgeon.gates(injected)]
    x = _x(6, side=8)
    _, report = sdsurgeon.prune(injected, 3, calibration=x)
    with torch.no_grad():
        unpruned = hand_pruned(plain, p, set())(x).double()
        got = hand_pruned(plain, p, {3, 4, 5})(x).double()
    assert report.fidelity.rel_error == pytest.approx(float((got - unpruned).norm() / unpruned.norm()), rel=1e-4)
    assert report.fidelity.cosine == pytest.approx(float(F.cosine_similarity(got, unpruned, dim=1).mean()), rel=1e-6)
    assert report.fidelity.top1 == pytest.approx(float((got.argmax(1) == unpruned.argmax(1)).double().mean()))


# --- plan --prune-curve -------------------------------------------------------------------------------------------


def test_prune_curve_points_equal_the_pruned_models_they_stand_for(work):
    x = _x(8)
    torch.save(x, work / "calib.pt")
    record = one_json(invoke("plan", "m.sd.pt", "--prune-curve", "--calibration", "calib.pt", "--json"))
    points = record["prune_curve"]["points"]
    assert [pt["removed"] for pt in points] == list(range(BLOCKS + 1))
    assert points[0]["site"] is None and points[0]["fidelity"]["rel_error"] == 0
    assert [pt["site"] for pt in points[1:]] == [f"layers.{i}:add" for i in reversed(range(BLOCKS))]
    injected = sdsurgeon.load(work / "m.sd.pt")
    for k in (1, 3, BLOCKS):  # the curve masks gates; prune folds: two ways to the same model
        _, report = sdsurgeon.prune(injected, k, calibration=x)
        assert points[k]["params"] == report.params_after
        assert points[k]["fidelity"]["rel_error"] == pytest.approx(report.fidelity.rel_error, rel=1e-4)
        assert points[k]["fidelity"]["cosine"] == pytest.approx(report.fidelity.cosine, rel=1e-6)


def test_prune_curve_of_a_plain_model_gates_it_as_planned(tmp_path):
    record = one_json(invoke("plan", *ARCH, "--input-shape", "1,3,8,8", "--prune-curve", "--drop-by", "influence",
                             "--json"))
    curve = record["prune_curve"]
    assert curve["drop_by"] == "influence" and len(curve["points"]) == BLOCKS + 1
    assert set(curve["influence"]["sites"]) == {f"layers.{i}:add" for i in range(BLOCKS)}
    assert "1 - cos" in curve["influence"]["measure"]


# --- refusals ------------------------------------------------------------------------------------------------------


BAD = {
    "negative count": (["--drop", "-1"], "--drop"),
    "share over 100%": (["--drop", "120%"], "--drop"),
    "more than there are": (["--drop", "7"], "--drop"),
    "not a number": (["--drop", "half"], "--drop"),
    "regex matching nothing": (["--drop-sites", "nowhere"], "--drop-sites"),
    "bad regex": (["--drop-sites", "("], "--drop-sites"),
    "count and sites": (["--drop", "2", "--drop-sites", "layers"], "--drop-sites"),
    "unknown rule": (["--drop", "2", "--drop-by", "random"], "--drop-by"),
    "calibration without drop": (["--calibration", "calib.pt"], "--calibration"),
    "calibration of the wrong inputs": (["--drop", "2", "--calibration", "wrong.pt"], "--calibration"),
    "calibration that is not inputs": (["--drop", "2", "--calibration", "notinputs.pt"], "--calibration"),
    "calibration missing": (["--drop", "2", "--calibration", "missing.pt"], "--calibration"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_prune_values_are_one_line_exit_1_and_no_file(work, case):
    args, option = BAD[case]
    torch.save(_x(2), work / "calib.pt")
    torch.save(torch.randn(2, 5), work / "wrong.pt")
    torch.save({"lr": 0.1}, work / "notinputs.pt")
    before = sorted(p.name for p in work.iterdir())
    line = assert_user_error(invoke("export", "m.sd.pt", *args, "-o", "out.onnx"))
    assert option in line, line
    assert sorted(p.name for p in work.iterdir()) == before


def test_plan_refuses_curve_options_without_the_curve(work):
    torch.save(_x(2), work / "calib.pt")
    assert "--prune-curve" in assert_user_error(invoke("plan", "m.sd.pt", "--calibration", "calib.pt"))


def test_prune_refuses_a_model_without_gates():
    with pytest.raises(sdsurgeon.SurgeonError, match="inject it first"):
        sdsurgeon.prune(cifar_resnet(8, width=4), 1)


# --- over the zoo: every block kind, pruned against its hand-scaled copy with the dropped blocks' scales at 0 ------------


@pytest.mark.parametrize("drop", ["50%", "100%"])
@pytest.mark.parametrize("entry", [e for e in POSITIVE if e.scale is not None], ids=lambda e: e.name)
def test_pruned_zoo_model_equals_its_reference_with_dropped_branches_at_zero(entry, drop):
    torch.manual_seed(0)
    model = entry.build().eval()
    inputs = entry.inputs()
    injected = sdsurgeon.inject(model, 0.5)
    pruned, report = sdsurgeon.prune(injected, drop, calibration=inputs)
    wanted = sdsurgeon.surgery.prune.drop_count(drop, entry.num_sites)
    gone = {s.index - 1 for s in report.fold.dropped}
    assert len(report.dropped) >= wanted and len(report.dropped) == len(gone)  # nested blocks go with their outer one
    assert len(report.dropped) + len(report.kept) == entry.num_sites
    ps = [0.0 if i in gone else p for i, p in enumerate(linear_ps(entry.num_sites, 0.5))]
    reference = copy.deepcopy(model)
    entry.scale(reference, ps)
    with torch.no_grad():
        got, want = pruned(*inputs), reference(*inputs)
    got, want = (got[0], want[0]) if isinstance(got, tuple) else (got, want)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert sdsurgeon.gates(pruned) == []
    assert report.params_after <= report.params_before
