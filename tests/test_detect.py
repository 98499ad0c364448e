"""Detection over the zoo: counts, ids, shortcut kinds, partial capture, and linear-time scaling."""

import pytest
import torch

from sdsurgeon import find_residuals
from sdsurgeon.capture.fx import capture
from sdsurgeon.analysis.locate import locate
from sdsurgeon.models import cifar_resnet
from zoo import ZOO, DataDependentTop


@pytest.mark.parametrize("entry", ZOO, ids=lambda e: e.name)
def test_zoo_site_count(entry):
    from sdsurgeon.capture.drop_path import switch_off

    model = entry.build()
    switch_off(model)  # as plan and inject do: a LayerDrop drawn in Python would skip layers from the trace at random
    _, sites = locate(model)
    assert len(sites) == entry.num_sites, [s.id for s in sites]
    assert [s.index for s in sites] == list(range(1, entry.num_sites + 1))
    assert len({s.id for s in sites}) == len(sites)


@pytest.mark.parametrize("entry", [e for e in ZOO if e.shortcuts], ids=lambda e: e.name)
def test_shortcut_kinds(entry):
    _, sites = locate(entry.build())
    for index, kind in entry.shortcuts.items():
        assert sites[index - 1].shortcut == kind, sites[index - 1]


def test_detection_does_not_mutate_the_graph():
    gm = capture(cifar_resnet(20)).parts[0].gm
    before = gm.code
    find_residuals(gm)
    assert gm.code == before


def test_ids_are_module_path_and_position():
    from zoo import Transformer, PreNormLayer

    _, sites = locate(Transformer(PreNormLayer))
    assert [s.id for s in sites] == ["layers.0:add", "layers.0:add_1", "layers.1:add", "layers.1:add_1"]


def test_ids_are_stable_across_recaptures():
    ids = [[s.id for s in locate(cifar_resnet(20))[1]] for _ in range(2)]
    assert ids[0] == ids[1]
    assert ids[0][0] == "layers.0:add"


def test_data_dependent_top_is_captured_in_parts():
    cap, sites = locate(DataDependentTop())
    assert [p.path for p in cap.parts] == ["blocks"]
    assert [u.path for u in cap.untraced] == [""]
    assert "control flow" in cap.untraced[0].reason or "TraceError" in cap.untraced[0].reason
    assert [s.id for s in sites] == ["blocks.0:add", "blocks.1:add", "blocks.2:add"]


def test_leaf_option_hides_residuals_inside_a_module():
    from zoo import PlusBlock, Seq

    model = Seq(*(PlusBlock(8) for _ in range(3)))
    assert len(locate(model)[1]) == 3
    assert len(locate(model, leaves=["PlusBlock"])[1]) == 0
    assert len(locate(model, leaves=["zoo.PlusBlock"])[1]) == 0


def test_branch_params_and_modules():
    _, sites = locate(cifar_resnet(20))
    block = cifar_resnet(20).layers[0]
    assert sites[0].params == sum(p.numel() for p in block.parameters())
    assert set(sites[0].modules) == {"layers.0.conv1", "layers.0.bn1", "layers.0.conv2", "layers.0.bn2"}


@pytest.mark.slow
def test_detection_work_grows_linearly():
    """ResNet-1202 has 11x the graph of ResNet-110: the nodes walked must grow about as much, not 120x."""
    from sdsurgeon.analysis.detect import _find, _Graph

    def work(depth):
        g = _Graph(capture(cifar_resnet(depth)).parts[0].gm)
        sites = _find(g, "")[0]
        return g.visited, len(g.nodes), len(sites)

    small, nodes_small, n_small = work(110)
    large, nodes_large, n_large = work(1202)
    assert (n_small, n_large) == (54, 600)
    assert large / small < 1.5 * nodes_large / nodes_small, (small, large)


def test_expected_flops_ratio_against_a_hand_count():
    """Nested blocks: inner work runs with p_outer * p_inner; ratio computed by hand from FLOP counts."""
    import sdsurgeon
    from zoo import NestedBlock, Seq

    d, n = 8, 4
    model = Seq(NestedBlock(d))
    x = torch.randn(n, d)
    plan = sdsurgeon.plan(model, 0.5, example_inputs=x)
    p_inner, p_outer = 0.75, 0.5  # linear rule, L = 2
    lin = 2 * n * d * d  # FLOPs of one Linear(d, d) on n rows (torch's flop counter: 2 per MAC)
    inner = 2 * n * d * (2 * d) * 2  # the inner MLP: d -> 2d -> d
    total = 2 * lin + inner  # pre and post Linear, and the inner MLP; all inside the outer branch
    assert plan.total_flops == total
    expected = (total - (1 - p_outer) * (2 * lin) - (1 - p_outer * p_inner) * inner) / total
    assert plan.expected_train_flops_ratio == pytest.approx(expected)
    assert [s.flops for s in plan.sites] == [inner, 2 * lin + inner]


def test_broadcasting_add_is_no_site_when_shapes_are_known():
    """x (n, 1) + f(x) (n, d): structurally x + f(x), but a dropped gate could not return x's shape."""
    from torch import nn

    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(1, 4)

        def forward(self, x):
            return x + self.f(x)

    assert len(locate(Broadcast())[1]) == 1  # no shapes: the structure alone matches
    assert len(locate(Broadcast(), example_inputs=torch.randn(3, 1))[1]) == 0


def test_a_root_that_decides_on_self_training_is_captured_below_it_and_says_why():
    import torch.nn.functional as F
    from torch import nn
    from zoo import PlusBlock

    class TrainOnlyNoise(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(PlusBlock(8), PlusBlock(8))

        def forward(self, x):
            if self.training:  # the root itself decides: nothing to make a leaf of
                x = x + 0.1
            return F.relu(self.blocks(x))

    cap, sites = locate(TrainOnlyNoise())
    assert [p.path for p in cap.parts] == ["blocks"] and len(sites) == 2
    assert "self.training" in cap.untraced[0].reason and cap.untraced[0].path == ""


def test_a_block_that_cannot_be_gated_is_named_with_its_reason_in_one_line(work):
    import json

    import torch

    import sdsurgeon
    from cli_helpers import assert_ok, invoke
    from zoo import EscapingBranch, Negatives

    plan = sdsurgeon.plan(EscapingBranch(), 0.5)
    assert plan.num_sites == 0
    (refused,) = plan.refused
    assert refused.id == "add" and "also used as an output of the model" in refused.reason
    assert sdsurgeon.plan(Negatives(), 0.5).refused == []  # adds that are no block are not reported at all
    torch.save(EscapingBranch().state_dict(), work / "escaping.pt")
    arch = ["--arch", "zoo:EscapingBranch"]
    text = invoke("plan", "escaping.pt", *arch)
    assert_ok(text)
    assert "not gated: add: " in text.stdout
    record = json.loads(invoke("plan", "escaping.pt", *arch, "--json").stdout)
    assert record["refused"] == [{"id": "add", "reason": refused.reason}]


def test_an_fx_capture_that_froze_something_is_checked_on_the_inputs_and_falls_back():
    import torch
    from torch import nn
    from zoo import PlusBlock

    class ShapeSpecialised(nn.Module):
        """Decides on a shape in Python: fx freezes the branch it took while tracing (a proxy's len is 1)."""

        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(PlusBlock(8), PlusBlock(8))
            self.scale = 1.0

        def forward(self, x):
            self.scale = 2.0 if not isinstance(x, torch.Tensor) else 1.0  # a proxy is no tensor
            return self.blocks(x) * self.scale

    model = ShapeSpecialised()
    assert locate(model)[0].method == "fx"  # without inputs, nothing can show the trace is wrong
    cap, sites = locate(model, example_inputs=torch.randn(2, 8))
    assert cap.method == "export" and len(sites) == 2  # auto: torch.export got it right
    cap, sites = locate(model, example_inputs=torch.randn(2, 8), method="fx")
    assert cap.untraced[0].path == "" and "torch.fx capture" in cap.untraced[0].reason
    assert [p.path for p in cap.parts] == ["blocks"] and len(sites) == 2  # fx: the parts below it


class TorchAttentionBlock(torch.nn.Module):
    """Pre-norm ``nn.MultiheadAttention`` (batch first): in eval under no_grad it takes a fused fast path."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x):
        h = self.norm(x)
        out, _ = self.attn(h, h, h, need_weights=False)
        return x + out


def test_branch_flops_count_the_attention_a_training_step_computes():
    """Counted as training runs (grad on): a no-grad count took fused attention kernels (nn.MultiheadAttention's
    fast path, CPU flash SDPA) whose FLOPs torch's counter does not see, and left attention out of the plan
    (timm's BEiT planned 0.73 of the training FLOPs, ran 0.68)."""
    import sdsurgeon
    from zoo import Seq

    b, n, c = 2, 8, 16
    plan = sdsurgeon.plan(Seq(TorchAttentionBlock(c, 2)).eval(), 0.5, example_inputs=torch.randn(b, n, c))
    linears = 2 * b * n * c * (3 * c) + 2 * b * n * c * c  # in and out projections (2 FLOPs per multiply-add)
    attention = 2 * (2 * b * n * n * c)  # q @ k^T and weights @ v, over all heads
    assert [s.flops for s in plan.sites] == [linears + attention]


def test_a_mixture_of_experts_counts_the_experts_each_token_was_routed_to():
    """A fused grouped matmul (the experts of an MoE layer, one op) has no formula in torch's counter: the plan
    counted the router alone (Mixtral: 0.83 planned, 0.95 run)."""
    import sdsurgeon
    from zoo import MoEBlock, Seq

    b, n, d, hidden, experts, top = 2, 5, 8, 16, 4, 2
    plan = sdsurgeon.plan(Seq(MoEBlock(d, experts, hidden, top)), 0.5, example_inputs=torch.randn(b, n, d))
    routed = b * n * top  # rows: each token once per expert it was sent to
    router = 2 * b * n * d * experts
    expert_mlps = 2 * routed * d * hidden + 2 * routed * hidden * d  # up and down, active experts only
    assert [s.flops for s in plan.sites] == [router + expert_mlps]
    assert plan.total_flops == router + expert_mlps


# --- refusals in the user's terms (issue 28, item 5) ------------------------------------------------------------


class _HiddenEscapes(torch.nn.Module):
    """x + fc(norm(x)) whose normalised value is also read after the block: no self-contained branch."""

    def __init__(self, d=8):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)

    def forward(self, x):
        h = self.norm(x)  # computed inside the branch
        y = x + self.fc(h)
        return y * torch.sigmoid(h)  # and used outside it


def _line_of(text: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(_HiddenEscapes.forward)
    return start + next(i for i, line in enumerate(lines) if text in line)


# Graph node names as torch.fx and torch.export make them (norm, fc, add_1, layer_norm, linear, mul, sigmoid, to_11).
_NODE_NAME = __import__("re").compile(r"\b(?:norm|fc|add|mul|sigmoid|layer_norm|linear|to|getitem)(?:_\d+)?\b|used by")


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_refusal_names_the_source_lines_and_module_paths_never_graph_nodes(method):
    import re

    import sdsurgeon

    plan = sdsurgeon.plan(_HiddenEscapes(), 0.5, capture=method, example_inputs=torch.randn(2, 8))
    assert plan.capture == method and plan.num_sites == 0
    (refused,) = plan.refused
    reason = refused.reason
    assert f"test_detect.py:{_line_of('h = self.norm(x)')}" in reason, reason
    assert f"test_detect.py:{_line_of('return y * torch.sigmoid(h)')}" in reason, reason
    assert "`norm` (LayerNorm)" in reason and "computed inside the branch" in reason, reason
    words = re.sub(r"`[^`]*`", "", reason)  # what is left once module paths and quoted source are taken out
    assert not _NODE_NAME.search(words), reason


def test_an_untraced_reason_says_what_stopped_the_trace_in_words_at_the_users_line():
    import inspect

    import archs

    cap = capture(archs.data_dependent(), example_inputs=torch.randn(2, 8))
    lines, start = inspect.getsourcelines(archs.DataDependent.forward)
    where = f"archs.py:{start + next(i for i, t in enumerate(lines) if 'x.sum() > 0' in t)} in forward"
    fx_reason, export_reason = (u.reason for u in cap.untraced if u.path == "")
    assert fx_reason.startswith("Python control flow on a tensor") and where in fx_reason
    assert "data-dependent control flow" in export_reason and where in export_reason
    assert not any(name in r for r in (fx_reason, export_reason)
                   for name in ("TraceError", "GuardOnDataDependentSymNode", "Eq(u0"))


class _SharedLayerLoop(torch.nn.Module):
    """One layer called ``steps`` times, its weights shared by every step (ALBERT): each call's add is a block.
    ``scales`` multiply each step's branch, for a hand-scaled reference."""

    def __init__(self, d=8, steps=3):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(d), torch.nn.Linear(d, d)
        self.scales = [1.0] * steps

    def forward(self, x):
        for scale in self.scales:
            x = x + torch.tanh(self.fc(self.norm(x))) * scale
        return x


@pytest.mark.parametrize("capture_with", ["fx", "export"])
def test_a_layer_whose_weights_every_step_shares_is_a_block_at_each_step(capture_with):
    """torch.export reads each weight once for the whole graph: a branch that shares its weights with the other
    steps' branches held "no parameters of its own" there, and ALBERT had 0 sites (fx calls the module each step)."""
    import copy

    import sdsurgeon

    model, x = _SharedLayerLoop().eval(), torch.randn(4, 8)
    plan = sdsurgeon.plan(model, 0.5, capture=capture_with, example_inputs=x)
    assert len(plan.sites) == 3
    injected = sdsurgeon.inject(model, 0.5, capture=capture_with, example_inputs=x).eval()
    reference = copy.deepcopy(model)
    reference.scales = [1 - (l / 3) * 0.5 for l in (1, 2, 3)]  # the linear rule, written out
    torch.testing.assert_close(injected(x), reference(x))
    assert not torch.allclose(model(x), reference(x))
    folded, report = sdsurgeon.fold_with_report(injected)  # one weight, three scales: each step a copy or a multiply
    torch.testing.assert_close(folded(x), reference(x))
    assert len(report.sites) == 3
