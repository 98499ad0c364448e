"""fold over the zoo: eval equivalence, p inside the weights, multiplies that stay (and why), shared weights."""

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from sdsurgeon import StochasticDepth, find_folds, fold, fold_with_report, inject, remove_gates
from sdsurgeon.surgery import install as in_place
from sdsurgeon.surgery.fold import Scale
from zoo import POSITIVE, PlusBlock, Seq, linear_ps

WITH_REFERENCE = [e for e in POSITIVE if e.scale is not None]
RANDOM_TARGETS = {torch.rand, torch.rand_like, torch.bernoulli, torch.randn, F.dropout}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _cast(inputs, dtype):
    return tuple(i.to(dtype) if i.is_floating_point() else i for i in inputs)


def _graphs(model):
    """(module, graph) for every graph the model runs: GraphModules and graph forwards installed in place."""
    return [(m, m.graph) for m in model.modules() if isinstance(m, fx.GraphModule)] + [
        (m, in_place.graph_forward(m).graph) for _, m in in_place.rewritten(model)]


def _graph_nodes(model):
    return [n for _, g in _graphs(model) for n in g.nodes]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Every way of taking the gates out, each with what it must equal in eval.
PASSES = {
    "fold": lambda m: fold(m),
    "multiply": lambda m: fold(m, into_weights=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("how", list(PASSES))
@pytest.mark.parametrize("entry", WITH_REFERENCE, ids=lambda e: e.name)
def test_folded_equals_injected_and_hand_scaled_reference(entry, how, dtype):
    model = entry.build().to(dtype).eval()
    inputs = _cast(entry.inputs(), dtype)
    injected = inject(model, 0.5).eval()
    folded = PASSES[how](injected)
    reference = copy.deepcopy(model)
    entry.scale(reference, linear_ps(entry.num_sites, 0.5))
    with torch.no_grad():
        got, expected = _first(folded(*inputs)), _first(reference(*inputs))
        injected_out, unscaled = _first(injected(*inputs)), _first(model(*inputs))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, injected_out, rtol=tol, atol=tol)
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert not torch.allclose(got, unscaled), "the reference must differ from the unscaled model"


@pytest.mark.parametrize("how", list(PASSES))
@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_folded_model_has_no_gate_and_no_random_op(entry, how):
    injected = inject(entry.build(), 0.5)
    folded = PASSES[how](injected)
    assert not any(isinstance(m, StochasticDepth) for m in folded.modules())
    assert not any(n.target in RANDOM_TARGETS for n in _graph_nodes(folded))
    assert not hasattr(folded, "sdsurgeon_recipe")
    # train mode too: nothing left to draw, so two calls agree
    folded.train()
    inputs = entry.inputs()
    torch.testing.assert_close(_first(folded(*inputs)), _first(folded(*inputs)))


@pytest.mark.parametrize("entry", [e for e in POSITIVE if e.kept_multiply], ids=lambda e: e.name)
def test_a_branch_ending_in_an_opaque_leaf_keeps_a_multiply_and_says_which(entry):
    folded, report = fold_with_report(inject(entry.build().eval(), 0.5))
    assert len(report.multiplies) == entry.num_sites
    assert all(entry.kept_multiply in s.reason for s in report.multiplies), [s.reason for s in report.multiplies]


@pytest.mark.parametrize("entry", [e for e in POSITIVE if not e.kept_multiply], ids=lambda e: e.name)
def test_p_lives_in_the_weights(entry):
    model = entry.build().eval()
    injected = inject(model, 0.5)
    folded, report = fold_with_report(injected)
    assert len(report.sites) == entry.num_sites
    assert not report.multiplies, [(s.id, s.reason) for s in report.multiplies]
    assert not any(isinstance(m, Scale) for m in folded.modules())
    # the folded graph is the original graph: same number of nodes, only weights differ
    assert len(_graph_nodes(folded)) == len(_graph_nodes(remove_gates(injected)))
    if not any(site.copied for site in report.sites):  # then it is the model's own code again, weights scaled
        assert not in_place.rewritten(folded) and type(folded) is type(model)
    original = dict(model.named_parameters())
    folded_params = dict(folded.named_parameters())
    for site in report.sites:
        assert site.params
        for name in site.params:
            torch.testing.assert_close(folded_params[name], original[name] * site.p, rtol=0, atol=0)


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_no_fold_keeps_one_named_multiply_per_gate(entry):
    injected = inject(entry.build(), 0.5)
    folded, report = fold_with_report(injected, into_weights=False)
    scales = sorted(m.p for m in folded.modules() if isinstance(m, Scale))
    assert scales == sorted(p for _, p in injected.sdsurgeon_recipe.sites)
    assert len(report.multiplies) == entry.num_sites
    calls = [n for m, g in _graphs(folded) for n in g.nodes
             if n.op == "call_module" and isinstance(m.get_submodule(n.target), Scale)]
    assert len(calls) == entry.num_sites


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_fold_and_find_folds_leave_the_injected_model_alone(entry):
    injected = inject(entry.build(), 0.5)
    before = {k: v.clone() for k, v in injected.state_dict().items()}
    find_folds(injected)
    fold(injected)
    assert len([m for m in injected.modules() if isinstance(m, StochasticDepth)]) == entry.num_sites
    after = injected.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_remove_gates_gives_back_the_original_function(entry):
    model = entry.build().eval()
    stripped = remove_gates(inject(model, 0.5))
    inputs = entry.inputs()
    torch.testing.assert_close(_first(stripped(*inputs)), _first(model(*inputs)))


def test_inverted_scaling_removes_gates_and_scales_nothing():
    model = Seq(*(PlusBlock(8) for _ in range(3))).eval()
    injected = inject(model, 0.5, scaling="inverted")
    folded, report = fold_with_report(injected)
    assert [s.how for s in report.sites] == ["none"] * 3
    assert all(torch.equal(v, folded.state_dict()[k]) for k, v in model.state_dict().items())
    x = torch.randn(4, 8)
    torch.testing.assert_close(folded(x), injected.eval()(x))
    torch.testing.assert_close(folded(x), model(x))


# --- branches with no affine producer at the end --------------------------------------------------


class GeluEnd(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + F.gelu(self.fc(x))


class SigmoidGate(nn.Module):
    """Squeeze-excitation style: the branch output is h * sigmoid(g(h)), with h used twice."""

    def __init__(self, d=8):
        super().__init__()
        self.fc, self.gate = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = self.fc(x)
        return x + h * torch.sigmoid(self.gate(h))


class Unaffine(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc, self.norm = nn.Linear(d, d), nn.LayerNorm(d, elementwise_affine=False)

    def forward(self, x):
        return x + self.norm(self.fc(x))


@pytest.mark.parametrize("block, words", [
    (GeluEnd, "gelu"), (SigmoidGate, "sigmoid"), (Unaffine, "no affine weight"),
], ids=["gelu", "sigmoid_gate", "norm_without_affine"])
def test_multiply_stays_where_nothing_can_take_p_and_the_report_says_why(block, words):
    model = Seq(block(), PlusBlock(8)).eval()
    injected = inject(model, 0.5).eval()
    folded, report = fold_with_report(injected)
    kept, done = report.sites
    assert kept.how == "multiply" and words in kept.reason.lower(), kept.reason
    assert done.how == "weights"
    assert [m.p for m in folded.modules() if isinstance(m, Scale)] == [kept.p]
    reference = copy.deepcopy(model)
    reference.blocks[0].register_forward_hook(lambda _m, inp, out: inp[0] + (out - inp[0]) * 0.75)
    reference.blocks[1].f[2].register_forward_hook(lambda _m, _i, out: out * 0.5)
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), reference(x))
        torch.testing.assert_close(folded(x), injected(x))


# --- shared weights ----------------------------------------------------------------------------------


class TiedHead(nn.Module):
    """The block's last Linear shares its weight with a head used outside the block."""

    def __init__(self, d=8):
        super().__init__()
        self.block = PlusBlock(d)
        self.head = nn.Linear(2 * d, d)
        self.head.weight = self.block.f[2].weight

    def forward(self, x):
        return self.block(x), self.head(torch.relu(self.block.f[0](x)))


def test_tied_weight_is_copied_and_its_other_user_is_unchanged():
    model = TiedHead().eval()
    injected = inject(model, 0.5).eval()
    folded, report = fold_with_report(injected)
    (site,) = report.sites
    assert site.how == "weights" and site.copied == ("block.f.2",)
    torch.testing.assert_close(folded.head.weight, model.head.weight, rtol=0, atol=0)
    x = torch.randn(4, 8)
    with torch.no_grad():
        out, head = folded(x)
        ref_out, ref_head = injected(x)
        _, unscaled_head = model(x)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(head, unscaled_head, rtol=0, atol=0)


def test_module_reused_by_two_blocks_gets_a_private_copy_per_block():
    block = PlusBlock(8)
    model = Seq(block, block).eval()
    injected = inject(model, 0.5).eval()
    folded, report = fold_with_report(injected)
    assert [s.how for s in report.sites] == ["weights", "weights"]
    assert all(s.copied for s in report.sites)
    x = torch.randn(4, 8)
    # by hand: the shared last Linear scaled by p_1 in the first call and p_2 in the second
    p1, p2 = linear_ps(2, 0.5)
    with torch.no_grad():
        h = x + block.f(x) * p1
        expected = h + block.f(h) * p2
        torch.testing.assert_close(folded(x), expected)


class SharedGamma(nn.Module):
    """Two layer-scale blocks reading one gamma parameter."""

    def __init__(self, d=8):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((d,), 0.3))
        self.f1, self.f2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.gamma * torch.tanh(self.f1(x))
        return x + self.gamma * torch.tanh(self.f2(x))


def test_shared_layer_scale_parameter_is_copied_per_block():
    model = SharedGamma().eval()
    injected = inject(model, 0.5).eval()
    folded, report = fold_with_report(injected)
    assert [s.how for s in report.sites] == ["weights", "weights"]
    assert all(s.copied == ("gamma",) for s in report.sites)
    torch.testing.assert_close(folded.gamma, model.gamma, rtol=0, atol=0)
    x = torch.randn(4, 8)
    p1, p2 = linear_ps(2, 0.5)
    with torch.no_grad():
        h = x + p1 * model.gamma * torch.tanh(model.f1(x))
        expected = h + p2 * model.gamma * torch.tanh(model.f2(h))
        torch.testing.assert_close(folded(x), expected)


# --- a module kept whole whose output is proportional to one of its own parameters ------------------------------


class LoopExperts(nn.Module):
    """Mixtral's eager experts: the tokens routed to each expert hit, through its slice of fused 3-D weights
    (silu(x G) * (x U), then D), weighted and added up. The loop over the experts hit does not trace (a leaf);
    the output is linear in ``down`` (with ``bias``, in nothing of its own)."""

    def __init__(self, d=8, experts=4, hidden=16, bias=False):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(experts, 2 * hidden, d) / d ** 0.5)
        self.down = nn.Parameter(torch.randn(experts, d, hidden) / hidden ** 0.5)
        self.bias = nn.Parameter(torch.randn(d)) if bias else None

    def forward(self, x, chosen, weights):
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            token, k = torch.where(chosen == e)
            g, u = F.linear(x[token], self.gate_up[e]).chunk(2, -1)
            out.index_add_(0, token, F.linear(F.silu(g) * u, self.down[e]) * weights[token, k, None])
        return out if self.bias is None else out + self.bias


class LoopMoEBlock(nn.Module):
    def __init__(self, d=8, bias=False):
        super().__init__()
        self.norm, self.router, self.experts = nn.LayerNorm(d), nn.Linear(d, 4, bias=False), LoopExperts(d, bias=bias)

    def forward(self, x):
        h = self.norm(x).reshape(-1, x.shape[-1])
        weights, chosen = self.router(h).softmax(-1).topk(2, -1)
        return x + self.experts(h, chosen, weights).reshape(x.shape)


@pytest.mark.parametrize("bias", [False, True])
def test_a_branch_ending_in_a_leaf_proportional_to_its_own_parameter_folds_into_that_parameter(bias):
    """The experts module is called whole (a leaf): no submodule makes its output, but it is proportional to its
    ``down`` weights (the router's weights stay): p goes there. With a bias added after, no parameter of its own
    scales it: a multiply stays, said so."""
    model = nn.Sequential(LoopMoEBlock(bias=bias), LoopMoEBlock(bias=bias)).eval()
    x = torch.randn(2, 5, 8)
    injected = inject(model, 0.5, scaling="paper", leaves=["LoopExperts"], example_inputs=(x,)).eval()
    folded, report = fold_with_report(injected)
    ps = linear_ps(2, 0.5)
    torch.testing.assert_close(folded(x), injected(x))
    if bias:
        assert [s.how for s in report.sites] == ["multiply"] * 2
        assert all("LoopExperts" in s.reason and "not positively homogeneous" in s.reason for s in report.sites)
        return
    assert [(s.how, s.params) for s in report.sites] == [("weights", ("0.experts.down",)), ("weights", ("1.experts.down",))]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for block, p in zip(reference, ps):
            block.experts.down.mul_(p)
    torch.testing.assert_close(folded(x), reference(x))
    assert not torch.allclose(folded(x), model(x))
    assert all(torch.equal(a, b) for a, b in zip(injected.state_dict().values(), model.state_dict().values()))
