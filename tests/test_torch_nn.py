"""torch.nn's own transformer (its encoder and decoder layers and stacks) is found, gated and folded like user
code; its masks, its fused fast path and its nested-tensor path are handled (tests/zoo.py runs the zoo's
torch.nn entries through every pass; these are the paths the zoo's plain calls do not take)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdsurgeon
from sdsurgeon.capture.torch_nn import is_composite
from zoo import linear_ps


class Tutorial(nn.Module):
    """As PyTorch's language-model tutorial: token embedding, an encoder stack, a head; the caller's masks."""

    def __init__(self, batch_first=False, norm_first=False, d=16):
        super().__init__()
        self.embedding = nn.Embedding(50, d)
        layer = nn.TransformerEncoderLayer(d, 2, 2 * d, dropout=0.1, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=batch_first and not norm_first)
        self.head = nn.Linear(d, 50)
        self.d = d

    def forward(self, ids, mask=None, padding=None):
        x = self.embedding(ids) * math.sqrt(self.d)
        return self.head(self.encoder(x, mask=mask, src_key_padding_mask=padding))


def _hand_scaled(model: nn.Module, ps: list[float]) -> nn.Module:
    """A copy whose layers' attention and feed-forward outputs (dropout1, dropout2) are times p_l, by hook."""
    reference = copy.deepcopy(model)
    ends = [d for m in reference.modules() if isinstance(m, nn.TransformerEncoderLayer) for d in (m.dropout1, m.dropout2)]
    assert len(ends) == len(ps)
    for end, p in zip(ends, ps):
        end.register_forward_hook(lambda _m, _i, out, p=p: out * p)
    return reference


def _without_fast_path(model, *args):
    # torch's fused path would not call the reference's hooked modules at all
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        return model(*args)
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def test_torch_nn_modules_that_call_their_children_are_traced_into_and_attention_stays_a_leaf():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    assert is_composite(layer) and is_composite(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    assert is_composite(nn.TransformerDecoderLayer(8, 2, 16))
    assert is_composite(nn.Transformer(8, 2, 1, 1, 16, batch_first=True))
    # it computes with out_proj.weight, never calls out_proj: a leaf, as are layers without children
    assert not is_composite(nn.MultiheadAttention(8, 2)) and not is_composite(nn.Linear(8, 8))
    assert not is_composite(nn.Sequential(nn.Linear(8, 8)))  # a container torch.fx already goes into

    class Mine(nn.TransformerEncoderLayer):  # user code: torch.fx goes into it anyway
        pass

    assert not is_composite(Mine(8, 2, 16))


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_the_tutorials_model_with_its_masks_is_gated_layer_by_layer_and_equals_the_hand_scaled_copy(norm_first):
    torch.manual_seed(0)
    model = Tutorial(norm_first=norm_first).eval()
    ids = torch.randint(0, 50, (7, 2))  # sequence first
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1)  # causal, of the padding mask's type
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 5:] = True
    plan = sdsurgeon.plan(model, 0.5)
    assert plan.num_sites == plan.num_gated == 4, plan.refused
    # each layer keeps its class and is rewritten alone; the stack's own code still runs
    assert [(r.path, r.cls) for r in plan.rewrites] == [
        ("encoder.layers.0", "TransformerEncoderLayer"), ("encoder.layers.1", "TransformerEncoderLayer")]
    injected = sdsurgeon.inject(model, 0.5).eval()
    assert type(injected.encoder) is nn.TransformerEncoder
    reference = _hand_scaled(model, linear_ps(4, 0.5))
    kept = ~padding.T.unsqueeze(-1)  # padded positions are whatever attention makes of nothing
    with torch.no_grad():
        for args in ((ids, mask, padding), (ids, None, padding), (ids,)):
            got, want, unscaled = injected(*args), reference(*args), model(*args)
            keep = kept if len(args) == 3 else True
            torch.testing.assert_close(got * keep, want * keep, rtol=1e-5, atol=1e-5)
            assert not torch.allclose(got * keep, unscaled * keep)
        folded, report = sdsurgeon.fold_with_report(injected)
        assert report.multiplies == []  # attention folds into out_proj, the feed-forward into linear2
        torch.testing.assert_close(folded(ids, mask, padding) * kept, reference(ids, mask, padding) * kept,
                                   rtol=1e-5, atol=1e-5)
        copied = copy.deepcopy(injected)  # its layers' graphs rebuilt from their code: the mask checks are calls
        torch.testing.assert_close(copied(ids, mask, padding), injected(ids, mask, padding))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # the original, on its fused path
def test_batch_first_in_eval_with_a_padding_mask_runs_the_gated_layers_not_the_fused_nested_path():
    torch.manual_seed(0)
    model = Tutorial(batch_first=True).eval()
    assert model.encoder.use_nested_tensor  # torch's default: eval + no_grad + a padding mask packs the input
    ids = torch.randint(0, 50, (2, 7))
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, 4:] = True
    injected = sdsurgeon.inject(model, 0.5).eval()
    assert not injected.encoder.use_nested_tensor and model.encoder.use_nested_tensor
    reference = _hand_scaled(model, linear_ps(4, 0.5))
    kept = ~padding.unsqueeze(-1)
    with torch.no_grad():
        got = injected(ids, None, padding)
        want = _without_fast_path(reference, ids, None, padding)
        fused = model(ids, None, padding)  # the original's fused path: unscaled
    torch.testing.assert_close(got * kept, want * kept, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got * kept, fused * kept)


def test_tracing_leaves_torch_as_it_found_it():
    canonical_mask, fast = F._canonical_mask, torch.backends.mha.get_fastpath_enabled()
    sdsurgeon.plan(Tutorial(), 0.5)
    assert F._canonical_mask is canonical_mask and torch.backends.mha.get_fastpath_enabled() == fast


def test_a_closed_gate_skips_the_layers_branch_in_training():
    torch.manual_seed(0)
    model = Tutorial().train()
    injected = sdsurgeon.inject(model, 0.5, overrides=["encoder.layers.0:add=1e-9"]).train()
    calls = []
    injected.encoder.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    out = injected(torch.randint(0, 50, (7, 2)))
    out.sum().backward()
    assert calls == []  # p = 1e-9 for the first attention branch: dropped, so never computed
    assert injected.encoder.layers[1].self_attn.in_proj_weight.grad is not None
