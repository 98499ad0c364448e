"""Training at speed and scale: torch.compile, row mode on kept samples, autocast, checkpointing, DDP."""

import copy
import os
import sys
import textwrap
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sdsurgeon import gates, inject
from sdsurgeon.gate import cond_backward
from sdsurgeon.models import cifar_resnet
from zoo import MaskedProjection, PlusBlock, Seq


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_row_mode_runs_the_branch_on_kept_samples_only_and_matches_the_full_computation():
    model = Seq(PlusBlock(8)).train()
    injected = inject(model, 0.5, mode="row", seed=3)
    (gate,) = gates(injected)
    batch_sizes = []
    block = model.blocks[0]
    gate.branch.register_forward_pre_hook(lambda _m, args: batch_sizes.append(args[0].shape[0]))
    x = torch.randn(64, 8)
    out = injected(x)
    with torch.no_grad():
        full = x + block.f(x)  # every branch computed, by hand
    kept = [torch.allclose(o, f, atol=1e-6) for o, f in zip(out, full)]
    dropped = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(k != d for k, d in zip(kept, dropped)), "each row is either x + f(x) or x"
    assert 0 < sum(kept) < 64
    assert batch_sizes == [sum(kept)], "the branch ran on the kept rows only"


def test_row_mode_gradients_reach_only_kept_rows():
    injected = inject(Seq(PlusBlock(8)), 0.5, mode="row", seed=1).train()
    x = torch.randn(32, 8, requires_grad=True)
    out = injected(x)
    out.sum().backward()
    (gate,) = gates(injected)
    kept = (gate._last_draw < gate.p)
    ones = torch.ones(8)
    assert all(torch.allclose(g, ones) for g in x.grad[~kept])  # d(x)/dx only
    assert not any(torch.allclose(g, ones) for g in x.grad[kept])


@pytest.mark.compile
def test_compiled_model_draws_afresh_every_call_without_recompiling_per_pattern():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    model = Seq(*(PlusBlock(8) for _ in range(4)))
    injected = inject(model, 0.5).train()
    compiled = torch.compile(injected)
    x = torch.randn(4, 8)
    outs = [compiled(x).detach() for _ in range(24)]
    distinct = {tuple(o.flatten().tolist()) for o in outs}
    assert len(distinct) > 3, "train-mode outputs must vary across calls with fixed weights and input"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs == 1, graphs  # batch mode decides inside the graph (torch.cond): one graph, no breaks
    torch.testing.assert_close(compiled.eval()(x), injected.eval()(x))


@pytest.mark.compile
def test_compiled_row_mode_still_draws_afresh_with_a_bounded_number_of_graphs():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    injected = inject(Seq(*(PlusBlock(8) for _ in range(3))), 0.5, mode="row").train()
    compiled = torch.compile(injected)
    x = torch.randn(6, 8)
    outs = {tuple(compiled(x).detach().flatten().tolist()) for _ in range(16)}
    assert len(outs) > 3
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs <= 2 * 3 + 1, graphs  # row mode decides in Python: at most two continuations per gate


class _Registry:
    """Stands for a Python object a library's forward sets (transformers' output collector, a kernel hub's
    registry of active kernels): a side effect dynamo cannot put inside a torch.cond."""

    last_batch = None


REGISTRY = _Registry()


class RecordingProjection(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = torch.nn.Linear(d, d)

    def forward(self, x, mask=None):
        REGISTRY.last_batch = x.shape[0]
        out = self.proj(x)
        return out if mask is None else out * mask


class _Layer(torch.nn.Module):
    def __init__(self, child):
        super().__init__()
        self.ln, self.attn = torch.nn.LayerNorm(8), child

    def forward(self, x, mask=None):
        return x + self.attn(self.ln(x), mask)


def _compiled_layers(child_cls, p_L: float, calls: int = 1):
    """Gated layers whose child (kept a call: --leaf) gets the mask None, compiled: the original's output, the
    outputs of ``calls`` train forwards, the graph count and sdsurgeon's warnings."""
    import warnings

    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    model = torch.nn.Sequential(*(_Layer(child_cls(8)) for _ in range(3)))
    reference = copy.deepcopy(model)
    injected = inject(model, p_L, rule="uniform", leaves=[child_cls.__name__]).train()
    compiled = torch.compile(injected)
    x = torch.randn(4, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [compiled(x) for _ in range(calls)]
    outs[-1].sum().backward()
    said = [str(w.message) for w in caught if "sdsurgeon" in str(w.message)]
    return reference(x), outs, torch._dynamo.utils.counters["stats"]["unique_graphs"], said


@pytest.mark.compile
def test_a_branch_input_that_is_none_is_no_operand_of_the_cond_and_the_gate_still_decides_in_graph():
    # torch.cond takes tensors only: the None the layer passes its child is a constant of the branch
    expected, outs, graphs, said = _compiled_layers(MaskedProjection, 1 - 1e-7)
    assert graphs == 1 and said == []
    torch.testing.assert_close(outs[0], expected)  # every gate kept: the original model


@pytest.mark.compile
def test_a_branch_dynamo_cannot_take_inside_a_cond_falls_back_to_the_python_decision_with_one_warning():
    # the user's compile does not fail: the gates decide in Python (a graph break each), said once
    _, outs, graphs, said = _compiled_layers(RecordingProjection, 0.5, calls=12)
    assert len(said) == 1 and "decide in Python" in said[0]
    assert graphs > 1  # the graph breaks at each Python decision
    assert len({tuple(o.detach().flatten().tolist()) for o in outs}) > 2  # still drawn afresh every call
    assert REGISTRY.last_batch == 4


def _compiled_resnet_step(p_L: float):
    """One compiled train step of an injected ResNet-20 and the same step of the original, eagerly."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # reset() keeps the counters
    original = cifar_resnet(20).train()
    reference = copy.deepcopy(original)
    injected = inject(original, p_L, rule="uniform").train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    compiled = torch.compile(injected)
    F.cross_entropy(compiled(x), y).backward()
    F.cross_entropy(reference(x), y).backward()
    return injected, reference, torch._dynamo.utils.counters["stats"]["unique_graphs"]


@pytest.mark.compile
@pytest.mark.parametrize("path", ["saved-activations", "torch-recompute", "partition-fails"])
def test_compiled_gate_that_always_keeps_matches_the_eager_original_with_batch_norm_statistics(path, monkeypatch):
    saved = path == "saved-activations"
    monkeypatch.setattr(cond_backward, "enabled", path != "torch-recompute")
    if path == "partition-fails":  # whatever goes wrong in the partition, torch's own backward takes over
        monkeypatch.setattr(cond_backward._Plan, "build", staticmethod(lambda *a: 1 / 0))
    built = cond_backward.plans_built
    injected, reference, graphs = _compiled_resnet_step(1 - 1e-7)  # p < 1 takes the torch.cond path; keeps
    assert graphs == 1
    assert (cond_backward.plans_built > built) == saved  # the gates' conds were (not) partitioned
    got, want = injected.state_dict(), reference.state_dict()
    for key in want:  # running means/vars and num_batches_tracked moved as in the eager original
        torch.testing.assert_close(got[key].float(), want[key].float(), rtol=1e-4, atol=1e-5, msg=key)
    grads = dict(reference.named_parameters())
    for name, p in injected.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


class SqueezeBottleneck(torch.nn.Module):
    """torchvision's Bottleneck with a squeeze-excite: 1x1 convolutions, a (B, C, 1, 1) gate, a conv+BN
    projection and ``out += identity; return relu(out)``: the layouts inductor's channels-last meets at a cond."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        nn = torch.nn
        mid = cout // 2
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.se_reduce, self.se_expand = nn.Conv2d(mid, 4, 1), nn.Conv2d(4, mid, 1)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        out = out * torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(out.mean((2, 3), keepdim=True)))))
        out = self.bn3(self.conv3(out))
        out += identity
        return torch.relu(out)


@pytest.mark.compile
@pytest.mark.parametrize("grad", [True, False], ids=["train-step", "no-grad"])
def test_compiled_torchvision_style_blocks_train_like_the_eager_original(grad):
    # inductor lays convolutions (and, in training, their weights) out channels-last; a cond's subgraphs were
    # compiled for the strides traced: torch 2.13/2.14 crashed here (assert_size_stride, branch strides)
    import torch._dynamo

    torch._dynamo.reset()
    stem = torch.nn.Conv2d(3, 8, 3, padding=1)
    original = Seq(SqueezeBottleneck(8, 16, 2), SqueezeBottleneck(16, 16, 1), stem=stem)
    reference = copy.deepcopy(original).train()
    injected = inject(original, 1 - 1e-7).train()  # p < 1: every gate goes through torch.cond, and keeps
    compiled = torch.compile(injected)
    for step in range(2):
        x = torch.randn(4, 3, 16, 16)
        with torch.set_grad_enabled(grad):
            got, want = compiled(x), reference(x)
            if grad:
                got.square().mean().backward()
                want.square().mean().backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(injected.state_dict()[key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)
    if grad:
        grads = dict(reference.named_parameters())
        for name, p in injected.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


class LayerNorm2d(torch.nn.LayerNorm):
    """timm's channels-first LayerNorm: permute to NHWC, normalise, permute back."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtStyleBlock(torch.nn.Module):
    """Depthwise conv, a permuting LayerNorm, 1x1 MLP and a layer scale: the values crossing the gate's cond
    are laid out by inductor otherwise than traced (timm's ConvNeXt crashed in ``assert_size_stride``)."""

    def __init__(self, c):
        super().__init__()
        nn = torch.nn
        self.conv_dw, self.norm = nn.Conv2d(c, c, 7, padding=3, groups=c), LayerNorm2d(c)
        self.fc1, self.act, self.fc2 = nn.Conv2d(c, 4 * c, 1), nn.GELU(), nn.Conv2d(4 * c, c, 1)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x):
        out = self.fc2(self.act(self.fc1(self.norm(self.conv_dw(x)))))
        return x + out.mul(self.gamma.reshape(1, -1, 1, 1))


@pytest.mark.compile
def test_compiled_convnext_style_blocks_train_like_the_eager_original():
    import torch._dynamo

    cond_backward.uninstall()  # inductor's own cond lowering: this test's compile must wrap it again
    nn = torch.nn
    original = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), ConvNeXtStyleBlock(16), LayerNorm2d(16),
                             nn.Conv2d(16, 32, 2, stride=2), ConvNeXtStyleBlock(32), nn.AdaptiveAvgPool2d(1),
                             nn.Flatten(), nn.Linear(32, 10))
    reference = copy.deepcopy(original).train()
    injected = inject(original, 1 - 1e-7, example_inputs=torch.randn(2, 3, 32, 32)).train()  # every gate keeps
    assert len(gates(injected)) == 2
    torch._dynamo.reset()  # clears dynamo's callbacks too (it once left the lowering unwrapped)
    compiled = torch.compile(injected)
    for _ in range(2):
        x = torch.randn(2, 3, 32, 32)
        got, want = compiled(x), reference(x)
        got.square().mean().backward()
        want.square().mean().backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    grads = dict(reference.named_parameters())
    for name, p in injected.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.compile
def test_cond_subgraph_views_become_reshapes_that_run_on_inductors_layouts():
    # inductor rewrites views as reshapes (its layouts may differ from the traced ones) in cond subgraphs
    # too, but only in their graphs: the cond's fake propagation ran the stale code, whose view failed on a
    # channels-last saved convolution output (timm's PoolFormerV2, torchvision's ConvNeXt, backward cond).
    from torch._inductor import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx

    def branchy(pred, x):
        return torch.cond(pred, lambda x: (x * 2).view(2, 36).sum(1), lambda x: x.view(2, 36).sum(1), (x,))

    gm = make_fx(branchy)(torch.tensor(True), torch.randn(2, 4, 3, 3))
    assert cond_backward.install()
    cond_backward._wrap_cond_lowering()
    compile_fx.view_to_reshape(gm)
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)  # C and H cannot be merged by a view
    torch.testing.assert_close(gm.true_graph_0(x)[0], (x * 2).reshape(2, 36).sum(1))
    torch.testing.assert_close(gm.false_graph_0(x)[0], x.reshape(2, 36).sum(1))


@pytest.mark.compile
def test_compiled_gate_that_always_drops_leaves_the_branch_statistics_and_gives_zero_gradients():
    injected, reference, graphs = _compiled_resnet_step(1e-7)
    assert graphs == 1
    fresh = cifar_resnet(20).state_dict()
    for key, value in injected.state_dict().items():
        if key.startswith("layers.") and ".bn" in key and ("running" in key or "num_batches" in key):
            torch.testing.assert_close(value, fresh[key], msg=key)  # a dropped branch's BN never saw the batch
    branch_params = [p for g in gates(injected) for p in g.branch.parameters()]
    assert branch_params and all(p.grad is None or not p.grad.any() for p in branch_params)


def _convolutions_in_one_compiled_step(saved: bool) -> int:
    """aten convolutions (forward kernels only) that one compiled train step of an always-kept ResNet-8 runs."""
    import torch._dynamo
    from torch.profiler import ProfilerActivity, profile

    torch._dynamo.reset()
    cond_backward.enabled = saved
    try:
        injected = inject(cifar_resnet(8, width=4), 1 - 1e-7, rule="uniform").train()
        compiled = torch.compile(injected)
        x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
        F.cross_entropy(compiled(x), y).backward()  # compiles forward and backward
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            F.cross_entropy(compiled(x), y).backward()
    finally:
        cond_backward.enabled = True
    return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")


@pytest.mark.compile
def test_compiled_gate_backward_does_not_run_the_kept_branch_forward_again():
    # ResNet-8 has 7 convolutions: the stem and two per block. torch's own cond backward reruns each kept
    # branch's forward (6 more); the partitioned one saves its activations instead.
    assert _convolutions_in_one_compiled_step(saved=True) == 7
    assert _convolutions_in_one_compiled_step(saved=False) == 13


@pytest.mark.compile
def test_compiled_gates_follow_a_new_batch_size_with_the_same_gradients_as_the_original():
    import torch._dynamo

    torch._dynamo.reset()
    original = cifar_resnet(8, width=4).train()
    reference = copy.deepcopy(original)
    injected = inject(original, 1 - 1e-7, rule="uniform").train()
    compiled = torch.compile(injected)
    built = cond_backward.plans_built
    for batch in (8, 6, 5):  # the second size recompiles with a symbolic batch; the third reuses it
        x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
        for model in (injected, reference):
            model.zero_grad(set_to_none=True)
        F.cross_entropy(compiled(x), y).backward()
        F.cross_entropy(reference(x), y).backward()
        grads = dict(reference.named_parameters())
        for name, p in injected.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=f"{batch}: {name}")
    assert cond_backward.plans_built > built


@pytest.mark.compile
def test_a_cond_outside_any_gate_keeps_torchs_own_backward():
    import torch._dynamo

    torch._dynamo.reset()
    built = cond_backward.plans_built

    def f(x, w):
        return torch.cond(x.sum() > 0, lambda x, w: (x * w).sin(), lambda x, w: x.cos() * w, (x, w))

    x, w = torch.randn(5), torch.randn(5, requires_grad=True)
    torch.compile(f)(x, w).sum().backward()
    got = w.grad.clone()
    w.grad = None
    f(x, w).sum().backward()
    torch.testing.assert_close(got, w.grad)
    assert cond_backward.plans_built == built


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_autocast_bf16_trains(mode):
    model = cifar_resnet(8, width=4)
    injected = inject(model, 0.5, mode=mode, seed=0).train()
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(injected(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None for p in injected.parameters())


@pytest.mark.parametrize("mode", ["batch", "row"])
def test_activation_checkpointing_replays_the_same_draws(mode):
    model = Seq(*(PlusBlock(8) for _ in range(4)))
    a = inject(model, 0.5, mode=mode, seed=5).train()
    b = copy.deepcopy(a)
    x = torch.randn(16, 8)
    plain = a(x)
    plain.sum().backward()
    checkpointed = checkpoint(b, x, use_reentrant=False)
    checkpointed.sum().backward()
    torch.testing.assert_close(checkpointed, plain)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert (pa.grad is None) == (pb.grad is None)
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad)


def _draws_of(model):
    """Every gate call's draw, in call order, as the model runs (a list that the hooks fill)."""
    calls = []
    for g in gates(model):
        g.register_forward_hook(lambda m, _i, _o: calls.append(m._last_draw.clone()))
    return calls


def _micro_batch_grads(model, xs, *, ckpt, reentrant, summed):
    """Each micro-batch forward (checkpointed or not); one backward of their sum, or one backward each."""
    torch.manual_seed(1)  # the global RNG (unseeded gates draw from it) starts alike for either run
    inputs = [x.clone().requires_grad_() for x in xs]  # reentrant checkpoints need an input that wants grad
    losses = []
    for x in inputs:
        out = checkpoint(model, x, use_reentrant=reentrant) if ckpt else model(x)
        losses.append(out.square().sum())  # nonlinear: the gradients depend on what the forward computed
        if not summed:
            losses.pop().backward()
    if summed:
        sum(losses).backward()
    return {n: p.grad for n, p in model.named_parameters()}, [x.grad for x in inputs]


@pytest.mark.parametrize("summed", [True, False], ids=["one-backward", "backward-each"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("seed", [None, 5], ids=["global-rng", "seeded"])
@pytest.mark.parametrize("mode", ["batch", "row"])
def test_checkpointed_micro_batches_replay_their_own_draws(mode, seed, reentrant, summed):
    # Two micro-batches forward before one backward: each recompute must see its own micro-batch's draws
    # (a gate that replayed its last draw gave the first recompute the second's: wrong gradients or a
    # CheckpointError); forward+backward per micro-batch likewise.
    original = Seq(*(PlusBlock(8) for _ in range(6)))
    reference = inject(original, 0.5, mode=mode, seed=seed).train()  # the same gates, built independently
    checkpointed = inject(original, 0.5, mode=mode, seed=seed).train()
    xs = [torch.randn(16, 8), torch.randn(16, 8)]
    calls = _draws_of(reference)
    want, want_x = _micro_batch_grads(reference, xs, ckpt=False, reentrant=reentrant, summed=summed)
    n = len(gates(reference))
    first, second = calls[:n], calls[n:]
    assert any(not torch.equal(a < 0.5, b < 0.5) for a, b in zip(first, second)), "micro-batches must differ"
    got, got_x = _micro_batch_grads(checkpointed, xs, ckpt=True, reentrant=reentrant, summed=summed)
    for name, grad in want.items():
        assert (grad is None) == (got[name] is None), name
        if grad is not None:
            torch.testing.assert_close(got[name], grad, msg=name)
    for g, w in zip(got_x, want_x):
        torch.testing.assert_close(g, w)


class _Shared(torch.nn.Module):
    """One gate called twice in a forward (a shared block)."""

    def __init__(self, gate):
        super().__init__()
        self.gate = gate

    def forward(self, x):
        y = self.gate(x, x)
        return self.gate(y, y)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("seed", [None, 11], ids=["global-rng", "seeded"])
def test_a_gate_called_twice_in_a_checkpointed_forward_replays_each_calls_draw(seed, reentrant):
    from sdsurgeon import StochasticDepth

    torch.manual_seed(0)
    branch = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    models = [_Shared(StochasticDepth(0.5, copy.deepcopy(branch), seed=seed)).train() for _ in range(2)]
    for m in models:
        m.branch_params = torch.nn.ModuleList([m.gate.branch])  # registered: named_parameters sees them
    x = torch.randn(4, 8)
    draws = []
    models[0].gate.register_forward_hook(lambda m, _i, _o: draws.append(bool(m._last_draw < 0.5)))
    grads = []
    for model, ckpt in zip(models, (False, True)):
        torch.manual_seed(0)  # the first call keeps, the second drops (with seed 11 too)
        x_in = x.clone().requires_grad_()
        out = checkpoint(model, x_in, use_reentrant=reentrant) if ckpt else model(x_in)
        out.square().sum().backward()
        grads.append([x_in.grad, *(p.grad for p in model.parameters())])
    assert draws[0] != draws[1], "the two calls must decide differently for the test to mean anything"
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch, torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel as DDP
    import sdsurgeon
    from sdsurgeon.models import cifar_resnet

    rank, world, init, out, sync = int(sys.argv[1]), 2, sys.argv[2], sys.argv[3], sys.argv[4] == "sync"
    variant = sys.argv[5]  # plain | static (static_graph=True) | accumulate (two micro-batches, no_sync on the first)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)  # same weights on both ranks
    model = sdsurgeon.inject(cifar_resnet(8, width=4), 0.5, sync_ranks=sync)
    torch.manual_seed(100 + rank)  # different data (and global RNG state) per rank
    ddp = DDP(model, static_graph=variant == "static")
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    draws = []
    for step in range(6):
        opt.zero_grad()
        micro = 2 if variant == "accumulate" else 1
        for k in range(micro):
            x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
            if k < micro - 1:
                with ddp.no_sync():  # gradients accumulate locally; the last micro-batch all-reduces
                    F.cross_entropy(ddp(x), y).backward()
            else:
                F.cross_entropy(ddp(x), y).backward()
            draws.append([bool(g._last_draw < g.p) for g in sdsurgeon.gates(model)])
        opt.step()
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    json.dump({"draws": draws, "params": params.tolist()}, open(out, "w"))
    dist.destroy_process_group()
""")


def _run_ddp(tmp_path, sync: bool, variant: str = "plain"):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    init = f"file://{tmp_path / 'rendezvous'}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init, str(tmp_path / f"r{r}.json"),
                               "sync" if sync else "free", variant], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    for p in procs:
        try:
            _, err = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("DDP run did not finish in 180 s")
        assert p.returncode == 0, err[-2000:]
    import json

    return [json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("variant", ["plain", "static", "accumulate"],
                         ids=["default", "static_graph", "no_sync accumulation"])
def test_ddp_two_ranks_skip_the_same_blocks_and_stay_identical(tmp_path, variant):
    r0, r1 = _run_ddp(tmp_path, sync=True, variant=variant)
    assert r0["draws"] == r1["draws"]
    flat = [d for step in r0["draws"] for d in step]
    assert any(flat) and not all(flat), "some blocks must be dropped for the test to mean anything"
    torch.testing.assert_close(torch.tensor(r0["params"]), torch.tensor(r1["params"]))


@pytest.mark.multiprocess
def test_ddp_per_rank_draws_differ_and_parameters_still_agree(tmp_path):
    r0, r1 = _run_ddp(tmp_path, sync=False)
    assert r0["draws"] != r1["draws"]
    torch.testing.assert_close(torch.tensor(r0["params"]), torch.tensor(r1["params"]))


@pytest.mark.multiprocess
@pytest.mark.compile  # in its subprocess, where --check-marks cannot see it
def test_the_private_torch_names_cond_backward_needs_are_all_here_and_it_is_installed_by_gates_only():
    # run on both tiers' torch (2.13 and 2.14.1): each must take the fast path
    assert cond_backward.missing() == []
    code = textwrap.dedent("""
        import importlib, pickle, sys, torch, sdsurgeon
        from sdsurgeon.gate import cond_backward
        c = importlib.import_module("torch._higher_order_ops.cond")
        seen = lambda: c.CondAutogradOp.__module__
        class Block(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.f = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
            def forward(self, x):
                return x + self.f(x)
        torch.manual_seed(0)
        # a head with parameters: with both blocks dropped (1 step in 8 at p_L 0.5) the loss still has a gradient
        model = torch.nn.Sequential(Block(), Block(), torch.nn.Linear(4, 2))
        out = [seen()]
        sdsurgeon.plan(model, 0.5)
        injected = sdsurgeon.inject(model, 0.5).train()
        pickle.loads(pickle.dumps(injected))
        out.append(seen())
        injected(torch.randn(3, 4)).sum().backward()  # eager training
        out += [seen(), str("torch._inductor.lowering" in sys.modules)]
        built = cond_backward.plans_built
        torch.compile(injected)(torch.randn(3, 4)).sum().backward()
        out += [seen(), str(cond_backward.plans_built > built)]
        cond_backward.uninstall()
        out.append(seen())
        print(" ".join(out))
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    out = run.stdout.split()
    # import, plan, inject, unpickling and eager training patch nothing (nor load inductor); a compiled
    # training step does, and builds plans; uninstall puts torch's class back
    cond = "torch._higher_order_ops.cond"
    assert out == [cond] * 3 + ["False", "sdsurgeon.gate.cond_backward", "True", cond], out


@pytest.mark.compile
def test_a_torch_without_a_name_cond_backward_needs_keeps_its_own_backward_with_one_warning(monkeypatch):
    built = cond_backward.plans_built
    cond_backward.uninstall()
    monkeypatch.setattr(cond_backward, "REQUIRED", {**cond_backward.REQUIRED, "torch": ("no_such_private_name",)})
    monkeypatch.setattr(cond_backward, "_warned", False)
    try:
        with pytest.warns(RuntimeWarning, match="no_such_private_name") as caught:
            assert cond_backward.install() is False
            assert cond_backward.install() is False
        assert len(caught) == 1
        injected, reference, graphs = _compiled_resnet_step(1 - 1e-7)  # gates made now install nothing either
        assert graphs == 1 and cond_backward.plans_built == built and not cond_backward.installed()
        grads = dict(reference.named_parameters())
        for name, p in injected.named_parameters():
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)
    finally:
        monkeypatch.undo()
        assert cond_backward.install()


FSDP2_RUN = Path(__file__).resolve().parent / "fsdp2_run.py"


def _run_fsdp2(tmp_path, world: int, mode: str = "sync"):
    """Run tests/fsdp2_run.py on ``world`` ranks (gloo); the processes and their JSON records, bounded in time."""
    init = f"file://{tmp_path / f'rendezvous{world}{mode}'}"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(FSDP2_RUN), str(r), str(world), init,
                               str(tmp_path / f"{mode}{world}r{r}.json"), mode],
                              env=env, stderr=subprocess.PIPE, text=True) for r in range(world)]
    errors = []
    for p in procs:
        try:
            errors.append(p.communicate(timeout=180)[1])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("the FSDP2 run did not finish in 180 s (a hang)")
    return procs, errors


@pytest.mark.multiprocess
def test_fsdp2_units_whose_gates_drop_are_neither_gathered_nor_reduced_and_training_equals_one_process(tmp_path):
    import json

    procs, errors = _run_fsdp2(tmp_path, 1)
    assert procs[0].returncode == 0, errors[0][-2000:]
    procs, errors = _run_fsdp2(tmp_path, 2)
    for p, err in zip(procs, errors):
        assert p.returncode == 0, err[-2000:]
    single, r0, r1 = (json.loads((tmp_path / name).read_text()) for name in ("sync1r0.json", "sync2r0.json",
                                                                              "sync2r1.json"))
    assert r0["draws"] == r1["draws"] == single["draws"]  # seeded gates: the same draws on every rank and alone
    ran = [sum(d is None or d for d in step) for step in r0["draws"]]  # units with their gate kept (p 1: no draw)
    assert [step[2] for step in r0["draws"]] == [False] * 6  # unit 2 skipped in every step
    assert r0["draws"][0][0] is False and r0["draws"][-1][1] is False  # unit 0 first step, unit 1 last step
    # FSDP2 gathers the root's weights once and each unit that runs twice (forward, backward), and
    # reduce-scatters the root's and each running unit's gradients: a skipped unit costs nothing
    assert r0["gathers"] == r1["gathers"] == [1 + 2 * k for k in ran], (r0["gathers"], ran)
    assert r0["scatters"] == r1["scatters"] == [1 + k for k in ran], (r0["scatters"], ran)
    for name, value in single["params"].items():  # the same global batch, split over the two ranks
        torch.testing.assert_close(torch.tensor(r0["params"][name]), torch.tensor(value), rtol=1e-5, atol=1e-6)


@pytest.mark.multiprocess
def test_fsdp2_with_per_rank_draws_is_refused_in_one_line_on_every_rank(tmp_path):
    procs, errors = _run_fsdp2(tmp_path, 2, mode="per-rank")
    for p, err in zip(procs, errors):
        assert p.returncode != 0
        line = next(line for line in err.splitlines() if "sdsurgeon.errors.ConfigError:" in line)
        assert "Block is sharded with FSDP2" in line and "sync_ranks=False" in line and "hang" in line, err[-2000:]


@pytest.mark.multiprocess
def test_the_fsdp2_example_skips_gathers_of_dropped_blocks_and_resumes_two_ranks_bit_exactly():
    import re

    example = Path(__file__).resolve().parents[1] / "examples" / "fsdp2_train.py"
    result = subprocess.run([sys.executable, str(example), "--steps", "8"], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]
    steps = re.findall(r"blocks run +(\d+) of +(\d+) +all-gathers +(\d+)", result.stdout)
    assert len(steps) == 8
    assert all(int(g) == 1 + 2 * int(ran) for ran, _, g in steps)  # the root once; each block run twice
    assert any(int(ran) < int(total) for ran, total, _ in steps), "some block must drop for the test to mean anything"
    assert "weights identical to the run" in result.stdout
