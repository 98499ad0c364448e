"""Survival probabilities over training steps, and resuming a run with the same draws and weights."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import sdsurgeon
from sdsurgeon import gates, inject
from sdsurgeon.analysis.schedule import ScheduleSpec
from sdsurgeon.cli import app
from sdsurgeon.errors import ConfigError
from sdsurgeon.models import cifar_resnet
from sdsurgeon.schedules import Schedule, schedule


def _model(seed=3):
    torch.manual_seed(0)
    return inject(cifar_resnet(depth=8), 0.5, seed=seed)  # 3 gated blocks


def _by_hand(L, theta):
    """The paper's linear rule written out: p_l = 1 - l / L (1 - theta), l = 1..L."""
    return [1 - l / L * (1 - theta) for l in range(1, L + 1)]


@pytest.mark.parametrize("t", [0, 1, 10, 500, 1000, 10_000])
def test_pld_theta_is_deepspeeds_formula(t):
    spec = ScheduleSpec("pld", p_L=0.5, gamma=0.001)
    assert spec.theta(t) == pytest.approx((1 - 0.5) * math.exp(-0.001 * t) + 0.5)


@pytest.mark.parametrize("t,expected", [(0, 1.0), (4, 1.0), (5, 1.0), (10, 0.8), (15, 0.6), (20, 0.6), (99, 0.6)])
def test_warmup_keeps_every_block_then_ramps_linearly(t, expected):
    assert ScheduleSpec("warmup", p_L=0.6, warmup=5, ramp=10).theta(t) == pytest.approx(expected)


def test_fixed_is_the_paper_rule_at_every_step():
    model = _model()
    before = [g.p for g in gates(model)]
    sched = Schedule(model, ScheduleSpec("fixed", p_L=0.5))
    for _ in range(5):
        sched.step()
    assert [g.p for g in gates(model)] == before
    assert before == pytest.approx(_by_hand(3, 0.5))
    assert schedule(model).spec == ScheduleSpec("fixed", 0.5, "linear")  # no schedule recorded: the recipe's rule
    overridden = inject(cifar_resnet(depth=8), 0.5, overrides=["layers.1=0.9"])
    kept = [g.p for g in gates(overridden)]
    sched = schedule(overridden)
    sched.step()
    assert [g.p for g in gates(overridden)] == kept and 0.9 in kept


def test_stepping_sets_every_gates_p_through_the_depth_rule_and_reports_expected_depth():
    model = _model()
    sched = Schedule(model, ScheduleSpec("pld", p_L=0.5, gamma=0.1))
    for t in range(6):
        theta = 0.5 * math.exp(-0.1 * t) + 0.5
        assert [g.p for g in gates(model)] == pytest.approx(_by_hand(3, theta)), t
        assert sched.expected_depth() == pytest.approx(sum(_by_hand(3, theta)))
        sched.step()
    assert sched.last_step == 6


def test_expected_flops_at_theta_equal_to_pL_is_the_plans():
    torch.manual_seed(0)
    base = cifar_resnet(depth=8)
    model = inject(base, 0.5)
    plan = sdsurgeon.plan(base, 0.5, example_inputs=torch.randn(1, 3, 32, 32))
    sched = Schedule.from_plan(model, plan, ScheduleSpec("pld", p_L=0.5, gamma=1e9))  # theta(t > 0) = p_L
    assert sched.expected_flops_ratio(step=0) == pytest.approx(1.0)
    assert sched.expected_flops_ratio(step=1) == pytest.approx(plan.expected_train_flops_ratio)
    assert Schedule(model).expected_flops_ratio() is None  # no FLOPs known


def test_state_dict_round_trip_and_a_different_schedule_is_refused_in_one_line():
    model = _model()
    sched = Schedule(model, ScheduleSpec("pld", p_L=0.5, gamma=0.05))
    for _ in range(7):
        sched.step()
    other_model = _model()
    resumed = Schedule(other_model, ScheduleSpec("pld", p_L=0.5, gamma=0.05))
    resumed.load_state_dict(sched.state_dict())
    assert resumed.last_step == 7 and [g.p for g in gates(other_model)] == [g.p for g in gates(model)]
    with pytest.raises(ConfigError) as raised:
        Schedule(_model(), ScheduleSpec("warmup", p_L=0.5, warmup=3)).load_state_dict(sched.state_dict())
    assert "\n" not in str(raised.value) and "started with" in str(raised.value)


def test_unknown_schedule_keys_and_kinds_are_errors_that_list_the_valid_ones():
    with pytest.raises(ConfigError, match="valid keys: kind, p_L, rule, warmup, ramp, gamma"):
        ScheduleSpec.from_dict({"kind": "pld", "theta": 0.5})
    with pytest.raises(ConfigError, match="use one of: fixed, warmup, pld"):
        ScheduleSpec("cosine")
    with pytest.raises(ConfigError):
        Schedule(cifar_resnet(depth=8))  # not injected: no gates to schedule


def _run(model, sched, steps, data, optimizer, decisions):
    """Train ``steps`` steps, recording every gate's decision."""
    model.train()
    for x, y in data[:steps]:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        # (uniform draw, p) per gate: kept iff draw < p; None where p = 1 drew nothing
        decisions.append(tuple(None if g.p >= 1 else (float(g._last_draw), g.p) for g in gates(model)))
        sched.step()


@pytest.mark.parametrize("seed", [3, None], ids=["seeded gates", "global RNG"])
def test_a_run_stopped_and_resumed_draws_and_trains_exactly_as_the_uninterrupted_one(seed, tmp_path):
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(12)]
    spec = ScheduleSpec("pld", p_L=0.5, gamma=0.2)

    def fresh():
        model = _model(seed)
        return model, Schedule(model, spec), torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    torch.manual_seed(11)
    straight, sched, opt = fresh()
    whole: list = []
    _run(straight, sched, 12, data, opt, whole)

    torch.manual_seed(11)
    first, sched, opt = fresh()
    head: list = []
    _run(first, sched, 6, data, opt, head)
    torch.save({"model": first.state_dict(), "optimizer": opt.state_dict(),
                "sdsurgeon": sdsurgeon.training_state(first, sched)}, tmp_path / "step6.pt")
    torch.manual_seed(999)  # whatever the new process does first
    resumed, sched, opt = fresh()
    saved = torch.load(tmp_path / "step6.pt", weights_only=True)
    resumed.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sdsurgeon.load_training_state(resumed, saved["sdsurgeon"], sched)
    tail: list = []
    _run(resumed, sched, 12, data[6:], opt, tail)

    assert head + tail == whole
    assert any(d is not None and d[0] >= d[1] for step in whole for d in step)  # some gate did drop
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_inject_records_the_schedule_and_the_saved_model_steps_by_it(tmp_path):
    torch.save(cifar_resnet(depth=8).state_dict(), tmp_path / "w.pt")
    result = CliRunner().invoke(app, ["inject", str(tmp_path / "w.pt"), "--arch", "sdsurgeon.models:cifar_resnet",
                                      "--arch-kwargs", '{"depth": 8}', "--schedule", "pld", "--theta", "0.5",
                                      "--gamma", "0.001", "-o", str(tmp_path / "m.sd.pt")])
    assert result.exit_code == 0, result.output
    model = sdsurgeon.load(tmp_path / "m.sd.pt")
    assert model.sdsurgeon_recipe.schedule == {"kind": "pld", "p_L": 0.5, "rule": "linear", "warmup": 0,
                                               "ramp": 0, "gamma": 0.001}
    sched = schedule(model)
    assert sched.spec == ScheduleSpec("pld", 0.5, gamma=0.001)
    assert [g.p for g in gates(model)] == pytest.approx([1.0] * 3)  # theta(0) = 1: nothing drops yet
    for _ in range(1000):
        sched.step()
    assert [g.p for g in gates(model)] == pytest.approx(_by_hand(3, 0.5 * math.exp(-1) + 0.5))
    copy.deepcopy(model)  # a scheduled model still copies


@pytest.mark.parametrize("args,message", [
    (["--gamma", "0.01"], "--gamma applies to a schedule over training steps"),
    (["--schedule", "cosine"], "unknown schedule 'cosine'"),
    (["--schedule", "warmup", "--warmup", "-2"], "step counts"),
])
def test_schedule_options_errors_are_one_line(tmp_path, args, message):
    torch.save(cifar_resnet(depth=8).state_dict(), tmp_path / "w.pt")
    result = CliRunner().invoke(app, ["inject", str(tmp_path / "w.pt"), "--arch", "sdsurgeon.models:cifar_resnet",
                                      "--arch-kwargs", '{"depth": 8}', *args])
    assert result.exit_code == 1 and message in result.output, result.output
    assert not list(tmp_path.glob("*.sd.pt"))


@pytest.mark.slow  # Lightning's import and Trainer start take ~5 s of CPU
def test_lightning_callback_steps_the_gates_with_lightnings_global_step(tmp_path):
    """A LightningModule holding an injected model, trained by lightning.Trainer with lightning_callback: the p_l
    each batch trains with are the hand-computed ones of the recorded warmup schedule (two micro-batches per
    optimizer step, so the step advances every other batch), and sd_expected_depth is logged."""
    import lightning  # a test dependency (pyproject's test extra)

    from sdsurgeon.callbacks import lightning_callback

    torch.manual_seed(0)
    spec = ScheduleSpec("warmup", 0.5, "linear", warmup=1, ramp=2)
    injected = inject(cifar_resnet(8), 0.5, seed=0, schedule=spec)
    seen = []

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = injected

        def training_step(self, batch, batch_idx):
            seen.append([g.p for g in gates(self.net)])
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    data = torch.utils.data.TensorDataset(torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))
    trainer = lightning.Trainer(max_steps=4, accumulate_grad_batches=2, accelerator="cpu", logger=False,
                                enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                                callbacks=[lightning_callback()], default_root_dir=tmp_path)
    trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=2))
    L = len(gates(injected))
    thetas = [1.0, 1.0, 1 - 0.5 / 2, 0.5]  # optimizer steps 0..3: warm-up 1, then theta(t) ramps 1 -> p_L over 2
    expected = [[1 - l / L * (1 - theta) for l in range(1, L + 1)] for theta in thetas for _ in range(2)]
    assert len(seen) == 8
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want)
    assert float(trainer.callback_metrics["sd_expected_depth"]) == pytest.approx(sum(expected[-1]), abs=1e-5)


def test_lightning_callback_names_what_to_pass_when_the_module_holds_no_injected_model():
    from sdsurgeon.callbacks import injected_in

    with pytest.raises(ConfigError, match="holds 0 injected models; pass the one to schedule"):
        injected_in(torch.nn.Sequential(torch.nn.Linear(2, 2)))
