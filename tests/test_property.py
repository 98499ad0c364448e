"""Property: in random networks with planted residual and non-residual adds, detection finds exactly the planted residuals."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from sdsurgeon.analysis.locate import locate

W = 6
RESIDUAL = ("plus", "iadd", "torch_add", "method_add", "projection", "layerscale", "nested")
NOT_RESIDUAL = ("plain", "bias_add", "const_add", "self_add", "param_add", "input_add", "no_param_residual")


class Op(nn.Module):
    """One planted step of a random network; ``kind`` says what its add is."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Linear(W, W), nn.Linear(W, W, bias=kind != "bias_add")
        self.p = nn.Parameter(torch.randn(W))

    def forward(self, x, z):
        k = self.kind
        if k == "plus":
            return x + self.b(F.relu(self.a(x)))
        if k == "iadd":
            out = self.b(F.relu(self.a(x)))
            out += x
            return out
        if k == "torch_add":
            return torch.add(x, self.b(torch.tanh(self.a(x))))
        if k == "method_add":
            return x.add(self.b(F.relu(self.a(x))))
        if k == "projection":
            return self.a(x) + self.b(F.gelu(self.b(x)))
        if k == "layerscale":
            return x + self.p * self.b(F.relu(self.a(x)))
        if k == "nested":
            h = self.a(x)
            return x + self.b(h + self.a(F.relu(h)))
        if k == "plain":
            return F.relu(self.a(x))
        if k == "bias_add":
            return self.b(x) + self.p
        if k == "const_add":
            return x + 0.5
        if k == "self_add":
            return x + x
        if k == "param_add":
            return x + self.p[: x.size(-1)]
        if k == "input_add":
            return x + z  # z (an independent input) is used once only
        if k == "no_param_residual":
            return x + F.relu(x)
        raise AssertionError(k)


class Net(nn.Module):
    def __init__(self, kinds):
        super().__init__()
        self.ops = nn.ModuleList(Op(k) for k in kinds)

    def forward(self, x, z):
        for op in self.ops:
            x = op(x, z)
        return x


def expected_ids(kinds):
    ids = []
    for i, k in enumerate(kinds):
        if k == "nested":
            ids += [f"ops.{i}:add", f"ops.{i}:add_1"]  # inner h + a(relu(h)), then the outer add
        elif k in RESIDUAL:
            ids.append(f"ops.{i}:add")
    return ids


kinds_strategy = st.lists(st.sampled_from(RESIDUAL + NOT_RESIDUAL), min_size=1, max_size=10).filter(
    lambda ks: ks.count("input_add") <= 1
)


@pytest.mark.slow
@settings(max_examples=60, deadline=None)
@given(kinds_strategy)
def test_detection_finds_exactly_the_planted_residuals(kinds):
    _, sites = locate(Net(kinds))
    assert [s.id for s in sites] == expected_ids(kinds)
