"""inject over the zoo: eval equals a hand-scaled reference, state_dict keys survive, modules behave."""

import copy
import io

import pytest
import torch

import sdsurgeon
from sdsurgeon import StochasticDepth, gates, inject
from zoo import POSITIVE, linear_ps

WITH_REFERENCE = [e for e in POSITIVE if e.scale is not None]


def _forward(model, inputs):
    out = model(*inputs)
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("entry", WITH_REFERENCE, ids=lambda e: e.name)
def test_eval_matches_hand_scaled_reference(entry, dtype):
    model = entry.build().to(dtype).eval()
    inputs = tuple(i.to(dtype) if i.is_floating_point() else i for i in entry.inputs())
    injected = inject(model, 0.5).eval()
    reference = copy.deepcopy(model)
    entry.scale(reference, linear_ps(entry.num_sites, 0.5))
    with torch.no_grad():
        expected = _forward(reference, inputs)
        got = _forward(injected, inputs)
        unscaled = _forward(model, inputs)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert not torch.allclose(got, unscaled), "the reference must differ from the unscaled model"


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_train_mode_at_pL_1_equals_original(entry):
    model = entry.build().train()
    injected = inject(model, 1.0).train()
    inputs = entry.inputs()
    torch.testing.assert_close(_forward(injected, inputs), _forward(copy.deepcopy(model), inputs))


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_state_dict_keys_and_tensors_survive_both_ways(entry):
    model = entry.build()
    injected = inject(model, 0.5)
    original, after = model.state_dict(), injected.state_dict()
    assert set(after) == set(original)
    for k in original:
        assert torch.equal(original[k], after[k]), k
    # trained weights go back into the original architecture, pretrained ones into the injected model
    with torch.no_grad():
        for p in injected.parameters():
            p.add_(1.0)
    fresh = entry.build()
    fresh.load_state_dict(injected.state_dict(), strict=True)
    for k, v in injected.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    injected.load_state_dict(model.state_dict(), strict=True)
    reloaded = injected.state_dict()
    assert all(torch.equal(reloaded[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_injected_model_has_one_gate_per_site_and_input_is_untouched(entry):
    model = entry.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    code_before = type(model)
    injected = inject(model, 0.5)
    assert len(gates(injected)) == entry.num_sites
    assert not any(isinstance(m, StochasticDepth) for m in model.modules())
    assert type(model) is code_before
    for p in injected.parameters():
        p.data.zero_()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_train_step_reaches_every_parameter(entry):
    injected = inject(entry.build(), 1.0).train()  # p = 1: every branch runs
    _forward(injected, entry.inputs()).float().sum().backward()
    missing = [n for n, p in injected.named_parameters() if p.grad is None]
    assert not missing


def test_deepcopy_to_and_pickle_keep_branches_bound_to_the_model():
    from zoo import ZOO

    entry = next(e for e in ZOO if e.name == "layerscale")
    model = inject(entry.build(), 0.5).eval()
    x = entry.inputs()
    expected = model(*x)

    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone(*x), expected)
    with torch.no_grad():  # the copy's branches must use the copy's weights, not the original's
        for p in clone.parameters():
            p.mul_(0)
    assert not torch.allclose(model(*x), clone(*x))
    torch.testing.assert_close(model(*x), expected)

    double = copy.deepcopy(model).to(torch.float64)
    torch.testing.assert_close(double(*(t.double() for t in x)), expected.double(), rtol=1e-5, atol=1e-6)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(restored(*x), expected)
    with torch.no_grad():
        for p in restored.parameters():
            p.mul_(0)
    assert torch.allclose(restored(*x), x[0]), "restored branches must read the restored weights"


def test_an_unpickled_model_still_draws_its_gates_afresh_each_call():
    """torch.fx re-traces a GraphModule's code on unpickling: the draw must not be made then and frozen in."""
    from zoo import ZOO

    entry = next(e for e in ZOO if e.name == "layerscale")
    buffer = io.BytesIO()
    torch.save(inject(entry.build(), 0.5, rule="uniform"), buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False).train()
    x = entry.inputs()
    torch.manual_seed(0)
    outputs = {restored(*x).detach().sum().item() for _ in range(20)}
    assert len(outputs) > 1, "every call gave the same output: the gates' decisions were frozen when unpickled"


def test_train_and_eval_switch_gates_and_layers():
    from zoo import ZOO

    entry = next(e for e in ZOO if e.name == "projection")
    model = inject(entry.build(), 0.5)
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules())


def test_in_place_relu_after_a_dropped_block_keeps_autograd_sound():
    """torchvision-style `out += identity; relu_(out)`: a dropped gate must not hand back an alias."""
    from zoo import ZOO

    entry = next(e for e in ZOO if e.name == "projection")
    model = inject(entry.build(), 0.5, overrides=[".*=0.0001"], seed=1).train()
    assert all(g.copy_skip for g in gates(model))
    model(*entry.inputs()).sum().backward()  # raises if an in-place op clobbered a saved tensor


class _WritesIntoBlockOutput(torch.nn.Module):
    """`x = x + f(x)` then `x[:, 0] = 0` (torch.export captures it): the original never writes into its input."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.f(x)
        x[:, 0] = 0
        return x


def test_an_item_write_after_a_dropped_block_leaves_the_callers_input_alone():
    model = inject(_WritesIntoBlockOutput(), 0.5, overrides=[".*=0.0001"], seed=1, example_inputs=torch.ones(2, 4)).train()
    x = torch.ones(2, 4)
    out = model(x)  # the gate drops: without a copy, the write would land in x
    assert torch.equal(x, torch.ones(2, 4)) and torch.equal(out[:, 0], torch.zeros(2))


def test_nested_outer_gate_calls_inner_gate():
    from zoo import ZOO

    entry = next(e for e in ZOO if e.name == "nested")
    model = inject(entry.build(), 0.5)
    outer = gates(model)[1]
    assert "sd_gate_1" in outer.branch.code  # the outer branch runs the inner gate


def test_recipe_redoes_the_same_surgery():
    from sdsurgeon.models import cifar_resnet

    model = cifar_resnet(20)
    injected = inject(model, 0.3, rule="uniform", overrides=["layers\\.8:.*=0.9"], exclude=["layers\\.0:"], seed=4)
    again = sdsurgeon.apply_recipe(cifar_resnet(20), injected.sdsurgeon_recipe)
    summary = lambda m: [(g.site_id, g.p, g.mode, g.scaling, g.seed) for g in gates(m)]
    assert summary(again) == summary(injected)
    assert summary(injected)[-1][:2] == ("layers.8:add", 0.9)
    assert len(summary(injected)) == 8


@pytest.mark.parametrize("captured_in", ["eval", "train"])
@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_injected_model_switches_train_eval_like_the_original_whatever_mode_it_was_traced_in(entry, captured_in):
    # tracing runs forward's Python once: a module deciding on self.training must still decide at run time
    model = entry.build().train(captured_in == "train")
    injected = inject(model, 1.0)
    original = copy.deepcopy(model)
    for module in original.modules():  # inject switches a model's own LayerDrop off: the gates replace it
        if getattr(module, "layerdrop", 0.0):
            module.layerdrop = 0.0
    inputs = entry.inputs()
    for training in (True, False, True):
        injected.train(training)
        original.train(training)
        torch.testing.assert_close(_forward(injected, inputs), _forward(original, inputs))
    for (name, got), (_, expected) in zip(injected.named_buffers(), original.named_buffers()):
        torch.testing.assert_close(got, expected, msg=name)  # batch statistics moved alike


def _module_state(model):
    return [(dict(vars(m)), {k: copy.copy(v) for k, v in vars(m).items() if isinstance(v, (dict, list, set))})
            for m in model.modules()]


@pytest.mark.parametrize("entry", [pytest.param(e, marks=pytest.mark.slow) if e.name in {
    "projection", "prenorm", "postnorm", "data_dependent_top", "shape_read_projection", "bn_act_out", "preact_bn_act"}
    else e for e in POSITIVE],
    ids=lambda e: e.name)
def test_plan_and_inject_leave_no_state_on_the_model(entry):
    for training in (False, True):
        model = entry.build().train(training)
        before = _module_state(model)
        buffers = [b.clone() for b in model.buffers()]
        sdsurgeon.plan(model, 0.5, example_inputs=entry.inputs())
        inject(model, 0.5)
        after = _module_state(model)
        assert [set(a) for a, _ in after] == [set(b) for b, _ in before]
        assert all(a[k] is b[k] for (a, _), (b, _) in zip(after, before) for k in b)
        assert [c for _, c in after] == [c for _, c in before]  # caches (dicts, lists) hold what they held
        assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
        inject(model, 0.5)(*entry.inputs())  # a second surgery of the same object works


def test_export_capture_keeps_batch_norm_without_running_statistics_on_batch_statistics():
    # BatchNorm2d(track_running_stats=False) has no running mean: it normalises with the batch's statistics in
    # eval too (timm's hybrid ViT backbones). The export capture made its train flag follow the model's mode,
    # and eval then failed: "running_mean must be defined in evaluation mode".
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.norm = nn.BatchNorm2d(4, track_running_stats=False)

        def forward(self, x):
            return x + self.norm(self.conv(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), Block(), Block()).eval()
    x = torch.randn(2, 3, 8, 8)
    injected = inject(copy.deepcopy(model), 1.0, example_inputs=x, capture="export")
    assert len(gates(injected)) == 2
    for training in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(injected.train(training)(x), model.train(training)(x))
