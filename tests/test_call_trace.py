"""Blocks rewritten on the calls they receive: a self-made model written the way transformers writes its layers."""

import copy
import functools
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdsurgeon import inject, plan
from sdsurgeon.surgery import install as in_place
from sdsurgeon.capture.call_trace import Call, DroppedOutput, record_calls, returned_submodule, trace_call
from sdsurgeon.errors import DroppedOutputError, SpecializedCallError
from sdsurgeon.surgery.fold import fold_with_report


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def keeps_kwargs(fn):
    """A decorator around forward, as transformers' ``deprecate_kwarg``: torch.fx sees ``*args, **kwargs``."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapped


class Attention(nn.Module):
    """torch.fx cannot trace it (``(*x.shape[:-1], ...)`` iterates a shape); returns (output, weights)."""

    def __init__(self, d, heads=2):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, mask=None, **kwargs):
        shape = (*x.shape[:-1], self.heads, self.head_dim)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) / kwargs.get("temperature", 1.0)
        if mask is not None:
            scores = scores.masked_fill(mask[:, None, None, :] == 0, -1e9)
        weights = scores.softmax(-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape)
        return self.o(out), weights


class Layer(nn.Module):
    """A decoder layer as transformers writes one: ``**kwargs`` passed on to its attention, a decorated forward,
    a test on an optional argument that only a cross-attention model may pass, a helper method."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = Attention(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.scale_attn = self.scale_ff = 1.0  # a hand-scaled reference sets them to p

    @keeps_kwargs
    def forward(self, hidden, mask=None, encoder_hidden=None, use_cache=False, **kwargs):
        h, _ = self.attn(self.norm1(hidden), mask=mask, **kwargs)
        hidden = hidden + self.scale_attn * h
        if encoder_hidden is not None:
            if not hasattr(self, "cross"):
                raise ValueError("this layer has no cross-attention")
            hidden = hidden + self.cross(encoder_hidden)
        return hidden + self.scale_ff * self.feed_forward(self.norm2(hidden))

    def feed_forward(self, x):
        return self.down(F.gelu(self.up(x)))


class TinyLM(nn.Module):
    """Its own forward does not trace with torch.fx (``(*ids.shape, ...)``); optional mask and labels."""

    def __init__(self, vocab=32, d=16, layers=3):
        super().__init__()
        self.d = d
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(Layer(d) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        hidden = self.embed(input_ids).view(*input_ids.shape, self.d)
        for layer in self.layers:
            hidden = layer(hidden, mask=attention_mask, output_attentions=False, **kwargs)
        logits = self.head(self.norm(hidden))
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten()), logits

    def greedy(self, input_ids, steps):
        """A user's own method (generation): it calls forward, as ``generate`` does."""
        for _ in range(steps):
            input_ids = torch.cat([input_ids, self(input_ids)[:, -1:].argmax(-1)], dim=1)
        return input_ids


def _ids(batch=2, length=6):
    return torch.randint(0, 32, (batch, length))


def _hand_scaled(model, ps):
    reference = copy.deepcopy(model)
    ps = iter(ps)
    for layer in reference.layers:
        layer.scale_attn, layer.scale_ff = next(ps), next(ps)
    return reference.eval()


def _injected(model=None):
    model = model or TinyLM()
    return model, inject(model, 0.5, example_inputs={"input_ids": _ids()})


def test_the_self_made_model_really_needs_the_export_capture():
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(TinyLM())
    with pytest.raises(Exception):
        torch.fx.symbolic_trace(TinyLM().layers[0].attn)


@pytest.mark.slow
def test_each_layer_is_rewritten_in_place_and_the_model_keeps_its_class():
    model, injected = _injected()
    assert type(injected) is TinyLM and injected.sdsurgeon_recipe.capture == "export"
    assert [p for p, _ in in_place.rewritten(injected)] == ["layers.0", "layers.1", "layers.2"]
    assert list(injected.state_dict()) == list(model.state_dict())
    record = plan(model, example_inputs={"input_ids": _ids()}).to_dict()
    assert [(r["module"], r["how"], r["class"], r["gates"]) for r in record["rewrites"]] == [
        (f"layers.{k}", "block", "Layer", 2) for k in range(3)]


def test_outside_the_layers_the_users_code_runs_labels_masks_any_length_and_its_methods():
    model, injected = _injected()
    reference = _hand_scaled(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    injected.eval()
    for batch, length in ((2, 6), (3, 11), (1, 4)):
        ids = _ids(batch, length)
        mask = torch.ones_like(ids)
        mask[0, : length // 2] = 0
        torch.testing.assert_close(injected(ids), reference(ids))
        torch.testing.assert_close(injected(ids, attention_mask=mask), reference(ids, attention_mask=mask))
        loss, _ = injected(ids, labels=ids)
        torch.testing.assert_close(loss, reference(ids, labels=ids)[0])
    assert not torch.allclose(injected(ids, attention_mask=mask), injected(ids))  # the mask reaches the layers
    prompt = _ids(2, 3)
    assert torch.equal(injected.greedy(prompt, 5), reference.greedy(prompt, 5))


def test_keywords_the_example_call_did_not_pass_reach_the_modules_the_layers_code_passes_them_to():
    model, injected = _injected()
    reference = _hand_scaled(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    injected.eval()
    ids = _ids(2, 7)
    hot = injected(ids, temperature=3.0)  # through each layer's **kwargs to its attention (a leaf)
    torch.testing.assert_close(hot, reference(ids, temperature=3.0))
    assert not torch.allclose(hot, injected(ids))
    again = copy.deepcopy(injected)  # where they go is part of the rewritten forward: it survives copies
    torch.testing.assert_close(again(ids, temperature=3.0), hot)
    assert not injected.layers[0].attn._forward_pre_hooks  # passed on for the call only


def test_a_layer_is_traced_with_the_argument_it_tests_fixed_and_nothing_else():
    model = TinyLM()
    calls = record_calls(model, ["layers.0"], {"input_ids": _ids()})
    gm = trace_call(model.layers[0], calls["layers.0"])
    placeholders = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    assert placeholders == ["hidden", "mask", "encoder_hidden", "use_cache", "output_attentions"]
    checks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target.__name__ == "expect_value"]
    assert [c.args[0].target for c in checks] == ["encoder_hidden"]  # the mask stays free: it may be None or not
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert "attn" in called and {"up", "down", "norm1", "norm2"} <= called  # only what fails is a leaf


def test_a_call_with_another_value_for_a_fixed_argument_fails_in_one_line():
    _, injected = _injected()
    hidden = torch.randn(2, 6, 16)
    with pytest.raises(SpecializedCallError) as raised:
        injected.layers[0](hidden, encoder_hidden=hidden)
    message = str(raised.value)
    assert "\n" not in message and "encoder_hidden" in message and "example inputs" in message
    buffer = io.BytesIO()
    torch.save(injected, buffer)
    buffer.seek(0)
    for again in (copy.deepcopy(injected), torch.load(buffer, weights_only=False)):
        with pytest.raises(SpecializedCallError):  # the check survives copies (their graphs are traced back from code)
            again.layers[0](hidden, encoder_hidden=hidden)


def test_training_runs_the_gates_and_the_loss_falls():
    _, injected = _injected()
    optimizer = torch.optim.AdamW(injected.parameters(), lr=1e-2)
    ids = _ids(4, 8)
    injected.train()
    losses = []
    for _ in range(30):
        loss, _ = injected(ids, labels=ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < sum(losses[:5]) / 2, losses
    outs = {tuple(injected(ids)[0, 0].tolist()) for _ in range(10)}
    assert len(outs) > 1  # the gates draw in training


def test_fold_scales_the_projection_the_attention_returns_and_gives_the_plain_class_back():
    model, injected = _injected()
    folded, report = fold_with_report(injected)
    assert [s.how for s in report.sites] == ["weights"] * 6
    assert report.sites[0].params == ("layers.0.attn.o.weight", "layers.0.attn.o.bias")
    assert report.sites[1].params == ("layers.0.down.weight", "layers.0.down.bias")
    assert type(folded) is TinyLM and not in_place.rewritten(folded)
    plain = TinyLM().eval()
    plain.load_state_dict(folded.state_dict())
    reference = _hand_scaled(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    ids = _ids(3, 9)
    torch.testing.assert_close(plain(ids), reference(ids))


class Returns(nn.Module):
    """What a module returns, against the submodule fold would scale for it."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.o, self.drop = nn.Linear(4, 4), nn.Dropout(0.1)

    def forward(self, x):
        if self.how == "dropout after":
            return self.drop(self.o(x)), x
        if self.how == "scaled after":
            return self.o(x) * 2, x
        if self.how == "called twice":
            return self.o(self.o(x)), x
        y = self.o(x)
        y.add_(1)  # "changed in place"
        return y, x


@pytest.mark.parametrize("how,expected", [
    ("dropout after", "o"), ("scaled after", None), ("called twice", None), ("changed in place", None)])
def test_the_returned_tensor_must_be_the_very_output_of_one_call_of_the_submodule(how, expected):
    module = Returns(how)
    assert returned_submodule(module, Call((torch.randn(2, 4),), {}), 0) == expected
    assert returned_submodule(module, Call((torch.randn(2, 4),), {}), 1) is None  # the input itself


class _Core(nn.Module):
    """Attention's inner part, which torch.fx cannot trace (it iterates a shape)."""

    def __init__(self, d):
        super().__init__()
        self.value = nn.Linear(d, d)

    def forward(self, x):
        return torch.tanh(self.value(x)).view(*x.shape[:-1], x.shape[-1])


class _SelfOutput(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dense, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        self.scale = 1.0

    def forward(self, h, input_tensor):
        return self.norm(self.scale * self.dense(h) + input_tensor)


class _OptionalQueryAttention(nn.Module):
    """DeBERTa-v2's shape: the skip is an optional argument (None at call time) replaced inside by the input; and
    its inner attention is a child named ``self``."""

    def __init__(self, d):
        super().__init__()
        self.self = _Core(d)
        self.output = _SelfOutput(d)

    def forward(self, hidden, query_states=None):
        out = self.self(hidden)
        if query_states is None:
            query_states = hidden
        return self.output(out, query_states)


class _OptionalQueryLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attention = _OptionalQueryAttention(d)
        self.up, self.down, self.norm = nn.Linear(d, 2 * d), nn.Linear(2 * d, d), nn.LayerNorm(d)
        self.scale = 1.0

    def forward(self, hidden, query_states=None, output_attentions=False):
        hidden = self.attention(hidden, query_states=query_states)
        hidden = self.norm(hidden + self.scale * self.down(F.gelu(self.up(hidden))))
        if output_attentions:  # a flag tested in Python: the layer traces only with it fixed
            return hidden, None
        return hidden


class _OptionalQueryModel(nn.Module):
    def __init__(self, d=16, layers=2):
        super().__init__()
        self.d = d
        self.embed = nn.Embedding(32, d)
        self.layers = nn.ModuleList(_OptionalQueryLayer(d) for _ in range(layers))

    def forward(self, input_ids):
        hidden = self.embed(input_ids).view(*input_ids.shape, self.d)  # torch.fx cannot: export captures it
        for layer in self.layers:
            hidden = layer(hidden, query_states=None, output_attentions=False)
        return hidden


def test_a_skip_passed_as_an_optional_argument_is_the_value_that_really_flows_into_the_add():
    # Traced with query_states as a placeholder, the attention takes the `is not None` path and adds the argument
    # (None at run time): transformers' DeBERTa-v2 injected that way crashed on its first forward; here the layers
    # could not be rewritten at all and the model was replaced whole. A trace must give what the layer gives on its
    # recorded call, and depth comes before fewer constants: query_states is fixed to None, checked every call.
    model = _OptionalQueryModel().eval()
    ids = _ids()
    injected = inject(model, 0.5, example_inputs={"input_ids": ids}).eval()
    assert [path for path, _ in in_place.rewritten(injected)] == ["layers.0", "layers.1"]
    reference = copy.deepcopy(model)
    ps = iter([1 - l / 4 * 0.5 for l in range(1, 5)])
    for layer in reference.layers:
        layer.attention.output.scale, layer.scale = next(ps), next(ps)
    with torch.no_grad():
        torch.testing.assert_close(injected(ids), reference(ids))
        assert not torch.allclose(injected(ids), model(ids))
    injected.train()
    injected(ids).sum().backward()
    with pytest.raises(SpecializedCallError):
        injected.layers[0](torch.randn(2, 6, 16), query_states=torch.randn(2, 6, 16))


class _Config:
    """A transformers-style config: a plain object with use_cache."""

    def __init__(self) -> None:
        self.use_cache = True


class _Cache:
    """Generation state that no capture can return (no pytree is registered for it)."""

    def __init__(self, value) -> None:
        self.value = value


class _CachedStack(nn.Module):
    """A stack that reads a config copy of its own, as T5's encoder and decoder stacks do."""

    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = x + self.fc(x)
        return (y, _Cache(y)) if self.config.use_cache else (y,)


class _EncoderDecoderLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = _Config()
        self.stack = _CachedStack()

    def forward(self, x):
        return self.stack(x)


def test_capture_switches_off_the_cache_in_every_config_the_modules_hold_and_puts_them_back():
    """T5's stacks read their own config copies: with use_cache off in the top config alone, the decoder still
    built an EncoderDecoderCache, torch.export refused it in the output, and the model had no site."""
    import sdsurgeon

    model = _EncoderDecoderLike()
    plan = sdsurgeon.plan(model, 0.5, capture="export", example_inputs=torch.randn(2, 8))
    assert plan.capture == "export" and plan.num_sites == 1
    assert model.config.use_cache is True and model.stack.config.use_cache is True  # as they were


# --- issue 29: an encoder-decoder's layers (BART's) are the owners, not the whole model ---------------------------


class _ClampedLayer(nn.Module):
    """Ends as BART's encoder layer does: a branch on the dtype of a value the layer computed (clamping float16
    overflow), which torch.fx cannot take on a traced value."""

    def __init__(self, d):
        super().__init__()
        self.fc, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        self.scale = 1.0  # a hand-scaled reference sets it to p

    def forward(self, hidden):
        hidden = self.norm(hidden + self.scale * self.fc(hidden))
        if hidden.dtype == torch.float16 and not torch.isfinite(hidden).all():
            hidden = hidden.clamp(-1e4, 1e4)
        return hidden


class _DropoutLayer(nn.Module):
    """Drops out as BART's layers do: functional dropout with ``training=self.training`` in its own forward, so its
    train-mode and eval-mode traces differ in the layer's own code."""

    def __init__(self, d):
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)
        self.scale = 1.0

    def forward(self, hidden):
        h = F.dropout(F.gelu(self.up(hidden)), p=0.5, training=self.training)
        return hidden + self.scale * F.dropout(self.down(h), p=0.5, training=self.training)


class _Stack(nn.Module):
    """Its own forward does not trace with torch.fx (``(*ids.shape, ...)``): its layers are traced on their calls."""

    def __init__(self, layer, d=16, vocab=32, layers=2):
        super().__init__()
        self.d = d
        self.embed = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(layer(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, input_ids):
        hidden = self.embed(input_ids).view(*input_ids.shape, self.d)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden)


def _scaled_by_hand(model, ps):
    reference = copy.deepcopy(model)
    for layer, p in zip(reference.layers, ps, strict=True):
        layer.scale = p
    return reference.eval()


@pytest.mark.parametrize("layer", [_ClampedLayer, _DropoutLayer])
def test_layers_that_branch_on_a_dtype_or_drop_out_on_their_own_flag_are_rewritten_each_in_place(layer):
    model = _Stack(layer)
    record = plan(model, example_inputs={"input_ids": _ids()}).to_dict()
    assert [(r["module"], r["how"], r["gates"]) for r in record["rewrites"]] == [
        ("layers.0", "block", 1), ("layers.1", "block", 1)]
    injected = inject(model, 0.5, example_inputs={"input_ids": _ids()})
    assert type(injected) is _Stack and [p for p, _ in in_place.rewritten(injected)] == ["layers.0", "layers.1"]
    reference = _scaled_by_hand(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    injected.eval()
    for batch, length in ((2, 6), (3, 9)):
        ids = _ids(batch, length)
        torch.testing.assert_close(injected(ids), reference(ids))


def test_a_call_whose_dtype_decides_the_branch_otherwise_fails_in_one_line_in_copies_too():
    model = _Stack(_ClampedLayer)
    injected = inject(model, 0.5, example_inputs={"input_ids": _ids()}).eval()
    reference = _scaled_by_hand(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    folded, _ = fold_with_report(copy.deepcopy(injected))  # a copy's graph is traced back from its code, check and all
    ids = _ids(3, 7)
    torch.testing.assert_close(folded.eval()(ids), reference(ids))
    hidden = torch.randn(2, 6, 16)
    layer = injected.layers[0]
    torch.testing.assert_close(copy.deepcopy(layer).double()(hidden.double()).float(), layer(hidden))  # same branch
    for owner in (layer, copy.deepcopy(layer)):
        with pytest.raises(SpecializedCallError) as raised:
            owner.half()(hidden.half())
    message = str(raised.value)
    assert "\n" not in message and "hidden.dtype == torch.float16" in message and "example inputs" in message


def test_a_dropout_that_follows_the_layers_flag_reads_it_at_run_time_in_copies_too():
    model = _Stack(_DropoutLayer)
    injected = inject(model, 1.0, example_inputs={"input_ids": _ids()})  # gates always open: dropout alone draws
    hidden = torch.randn(2, 6, 16)
    for layer in (injected.layers[0], copy.deepcopy(injected).layers[0]):  # a copy's graph is traced back from code
        graph = in_place.graph_forward(layer).graph
        assert [n.target for n in graph.nodes if n.op == "get_attr"].count("training") == 1
        layer.train()
        torch.manual_seed(3)
        got = layer(hidden)
        torch.manual_seed(3)
        torch.testing.assert_close(got, model.layers[0].train()(hidden))  # the same masks, drawn alike
        layer.eval()
        torch.testing.assert_close(layer(hidden), model.layers[0].eval()(hidden))  # off: no dropout


# --- issue 29: a layer that returns its attention weights whatever its caller asks (transformers' Falcon, BLOOM) ---


class _WeightsAttention(nn.Module):
    """Returns ``(out, weights)``: the softmax weights after dropout, computed inside the branch."""

    def __init__(self, d):
        super().__init__()
        self.qkv, self.o, self.dropout = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Dropout(0.5)

    def forward(self, hidden):
        q, k, v = self.qkv(hidden).chunk(3, dim=-1)
        weights = self.dropout((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).softmax(-1))
        return self.o(weights @ v), weights


class _WeightsLayer(nn.Module):
    """``return output, attn_weights`` whatever ``output_attentions`` says, as transformers' Falcon and BLOOM layers."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(d), _WeightsAttention(d)
        self.scale = 1.0  # a hand-scaled reference sets it to p

    def forward(self, hidden, output_attentions=False):
        out, weights = self.attn(self.norm(hidden))
        return hidden + self.scale * out, weights


class _WeightsStack(_Stack):
    """Reads its layers' weights only when asked (``output_attentions``), as transformers' stacks do."""

    def forward(self, input_ids, output_attentions=False):
        hidden = self.embed(input_ids).view(*input_ids.shape, self.d)
        attentions = ()
        for layer in self.layers:
            hidden, weights = layer(hidden, output_attentions=output_attentions)
            if output_attentions:
                attentions += (weights,)
        logits = self.head(hidden)
        return (logits, attentions) if output_attentions else logits


def test_outputs_the_model_drops_are_found_on_the_recorded_forward():
    model = _WeightsStack(_WeightsLayer)
    calls = record_calls(model, ["layers.0", "layers.1"], {"input_ids": _ids()}, outputs=True)
    assert [calls[p].dropped for p in ("layers.0", "layers.1")] == [frozenset({"[1]"})] * 2
    asked = record_calls(model, ["layers.0"], {"input_ids": _ids(), "output_attentions": True}, outputs=True)
    assert asked["layers.0"].dropped == frozenset()  # read by the stack (and returned): kept


def test_attention_weights_the_stack_drops_leave_each_layer_rewritten_in_place():
    model = _WeightsStack(_WeightsLayer)
    record = plan(model, example_inputs={"input_ids": _ids()}).to_dict()
    assert [(r["module"], r["how"], r["gates"]) for r in record["rewrites"]] == [
        ("layers.0", "block", 1), ("layers.1", "block", 1)]
    injected = inject(model, 0.5, example_inputs={"input_ids": _ids()})
    assert type(injected) is _WeightsStack and len(injected.sdsurgeon_recipe.sites) == 2
    assert [p for p, _ in in_place.rewritten(injected)] == ["layers.0", "layers.1"]
    reference = _scaled_by_hand(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    injected.eval()
    ids = _ids(3, 7)
    torch.testing.assert_close(injected(ids), reference(ids))
    out, weights = injected.layers[0](torch.randn(2, 6, 16))
    assert out.shape == (2, 6, 16) and isinstance(weights, DroppedOutput)  # the structure kept
    # a caller that reads them after all fails in one line, not on a None the layer never returned
    logits, attentions = injected(ids, output_attentions=True)
    torch.testing.assert_close(logits, reference(ids, output_attentions=True)[0])
    for use in (lambda w: w.shape, lambda w: torch.stack([w]), lambda w: torch.ones(1) + w, lambda w: w.sum()):
        with pytest.raises(DroppedOutputError, match=r"output \[1\] is not computed"):
            use(attentions[0])
    assert getattr(attentions[0], "shape", None) is None and copy.deepcopy(attentions[0]).position == "[1]"


def test_attention_weights_the_stack_drops_change_nothing_at_p_one_in_train_and_eval():
    model = _WeightsStack(_WeightsLayer)
    injected = inject(copy.deepcopy(model), 1.0, example_inputs={"input_ids": _ids()})
    assert type(injected) is _WeightsStack and [p for p, _ in in_place.rewritten(injected)] == ["layers.0", "layers.1"]
    ids = _ids(2, 5)
    for training in (True, False):
        injected.train(training), model.train(training)
        torch.manual_seed(4)
        got = injected(ids)
        torch.manual_seed(4)
        torch.testing.assert_close(got, model(ids))  # the same dropout masks, drawn alike
