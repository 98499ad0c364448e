"""Gate semantics: keep rates, skipped compute forward and backward, seeds, row mode, scaling."""

import math

import pytest
import torch
from torch import nn

from sdsurgeon import StochasticDepth, gates, inject
from zoo import PlusBlock, Seq, linear_ps


def _count_calls(model):
    """Count forward calls of every Linear, keyed by its module path."""
    counts = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            counts[name] = 0
            m.register_forward_hook(lambda _m, _i, _o, name=name: counts.__setitem__(name, counts[name] + 1))
    return counts


def test_batch_mode_keep_rate_is_p_and_dropped_branch_runs_nothing():
    steps, L = 600, 4
    model = inject(Seq(*(PlusBlock(4) for _ in range(L))), 0.3, seed=7).train()
    counts = _count_calls(model)
    x = torch.randn(2, 4)
    for _ in range(steps):
        model(x)
    ps = linear_ps(L, 0.3)
    for l, p in enumerate(ps):
        first, second = counts[f"blocks.{l}.f.0"], counts[f"blocks.{l}.f.2"]
        assert first == second, "a branch runs all of its ops or none"
        bound = 4 * math.sqrt(p * (1 - p) / steps)  # ~4 sigma binomial bound
        assert abs(first / steps - p) <= bound, (l, first / steps, p)


def test_dropped_branch_gets_no_backward():
    model = inject(Seq(PlusBlock(4), PlusBlock(4)), 0.5, overrides=["blocks\\.0:.*=0.000001", "blocks\\.1:.*=1"]).train()
    x = torch.randn(3, 4, requires_grad=True)
    model(x).sum().backward()
    assert all(p.grad is None for p in model.blocks[0].parameters()), "dropped branch must not be in the graph"
    assert all(p.grad is not None for p in model.blocks[1].parameters())
    torch.testing.assert_close(x.grad, torch.ones_like(x) + _jacobian_sum(model.blocks[1].f, x), rtol=1e-5, atol=1e-6)


def _jacobian_sum(f, x):
    x = x.detach().requires_grad_()
    f(x).sum().backward()
    return x.grad


def test_same_seed_same_draws_other_seed_other_draws():
    def draws(seed):
        model = inject(Seq(*(PlusBlock(4) for _ in range(3))), 0.5, seed=seed).train()
        return [tuple(g.keep() for g in gates(model)) for _ in range(50)]

    assert draws(3) == draws(3)
    assert draws(3) != draws(4)


def test_eval_is_deterministic_and_scales_by_p():
    branch = nn.Linear(3, 3)
    x = torch.randn(5, 3)
    for scaling, factor in (("paper", 0.25), ("inverted", 1.0)):
        gate = StochasticDepth(0.25, branch, scaling=scaling).eval()
        out = gate(x, x)
        torch.testing.assert_close(out, gate(x, x))
        torch.testing.assert_close(out, x + factor * branch(x))


def test_inverted_scaling_divides_kept_branch_by_p_in_training():
    branch = nn.Linear(3, 3)
    x = torch.randn(5, 3)
    gate = StochasticDepth(0.5, branch, scaling="inverted", seed=0).train()
    outs = {tuple(gate(x, x).flatten().tolist()) for _ in range(40)}
    expected = {tuple(x.flatten().tolist()), tuple((x + branch(x) / 0.5).flatten().tolist())}
    assert {tuple(round(v, 4) for v in o) for o in outs} == {tuple(round(v, 4) for v in e) for e in expected}


def test_row_mode_draws_per_sample():
    torch.manual_seed(0)
    branch = nn.Linear(4, 4)
    n = 4000
    x = torch.randn(n, 4)
    gate = StochasticDepth(0.7, branch, mode="row").train()
    with torch.no_grad():
        out, full = gate(x, x), branch(x)
    kept = torch.isclose(out, x + full, atol=1e-6).all(1)
    dropped = torch.isclose(out, x, atol=1e-6).all(1)
    assert bool((kept | dropped).all()), "each sample is either fully kept or fully dropped"
    rate = kept.float().mean().item()
    assert abs(rate - 0.7) <= 4 * math.sqrt(0.7 * 0.3 / n)


def test_gate_adds_no_state_dict_entries():
    gate = StochasticDepth(0.5, nn.Linear(2, 2), seed=3)
    assert gate.state_dict() == {}


@pytest.mark.parametrize("bad", [dict(p=0.0), dict(p=1.5), dict(mode="sample"), dict(scaling="up")])
def test_gate_rejects_bad_settings(bad):
    from sdsurgeon.errors import ConfigError

    kwargs = dict(p=0.5) | bad
    with pytest.raises(ConfigError):
        StochasticDepth(kwargs.pop("p"), nn.Identity(), **kwargs)



def test_names_pickled_before_the_gate_moved_still_resolve():
    """Models pickled by earlier versions name sdsurgeon.layers.StochasticDepth and, in graph code, its draw."""
    import pickle

    import sdsurgeon.gate

    assert pickle.loads(b"csdsurgeon.layers\nStochasticDepth\n.") is sdsurgeon.gate.StochasticDepth
    assert pickle.loads(b"csdsurgeon.layers\ndraw\n.") is sdsurgeon.gate.draw
