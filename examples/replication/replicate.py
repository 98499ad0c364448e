"""Replication: constant depth against stochastic depth (Huang et al. 2016) on scikit-learn's 8x8 digits.

A CIFAR-style ResNet (default ResNet-110: 54 residual blocks, 16/32/64 channels) is trained on the
1,797 8x8 digit images that ship inside scikit-learn (no download), on one fixed stratified split
(1,437 train, 360 test). Two arms, same initial weights, data order and augmentation per seed:

- constant depth: the plain model;
- stochastic depth: ``sdsurgeon.inject(model, 0.5)``: linear rule, p_L = 0.5, batch mode (a dropped
  block is not computed), paper scaling (``model.eval()`` scales each branch by its p_l).

The runs alternate (seed 0 constant, seed 0 stochastic, seed 1 constant, ...) so that load from
other processes on a shared machine falls on both arms alike. Each run records the wall time of
every training epoch (evaluation excluded) and the test error after every epoch; the summary gives
mean +- std over seeds of the final test error and of the median epoch time.

Training follows the paper's recipe scaled to the data: SGD with Nesterov momentum 0.9, weight
decay 1e-4, batch 64, the learning rate divided by 10 at 50% and 75% of the epochs (and a tenth of
it in the first epoch, as He et al. did for ResNet-110), random shifts of up to 1 pixel (CIFAR's 4
of 32). The learning rate is 0.02, not the paper's 0.1: in trial runs at 0.1 and 0.05 ResNet-110
diverged on these 1,437 images in both arms (loss stuck near 2.1, test error ~80%).
The gray digits are repeated to 3 channels so the stock ``sdsurgeon.models.cifar_resnet`` fits.

After training, every run is pruned (``sdsurgeon.prune``, schedule order: the deepest blocks first, in
both arms alike) by 0, 6, 12, ... blocks, up to two thirds of them, and its test error measured again: the
paper's claim (and Veit et al.'s) is that a network trained with stochastic depth loses whole blocks more
gracefully. The constant-depth arm is gated with p = 1 for this (nothing scaled), so both arms lose the same
blocks. Last, the pruned exports' onnxruntime latency (1 thread, interleaved rounds) against blocks removed.

Run:   python examples/replication/replicate.py              (the default: 14 minutes on a busy 2-core machine)
Smoke: python examples/replication/replicate.py --quick --out /tmp/rep   (ResNet-20, 3 epochs, 2 seeds)
Writes results.md, results.json, replication.png and pruning.png to --out (default: this folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sdsurgeon
from sdsurgeon.models import cifar_resnet

ARMS = ("constant depth", "stochastic depth")
HERE = Path(__file__).resolve().parent
P_L, BATCH, LR, WEIGHT_DECAY = 0.5, 64, 0.02, 1e-4


@dataclass
class Run:
    arm: str
    seed: int
    epoch_seconds: list[float] = field(default_factory=list)
    test_error: list[float] = field(default_factory=list)  # after each epoch, as a fraction
    train_loss: list[float] = field(default_factory=list)
    pruned_error: list[float] = field(default_factory=list)  # after training, per entry of the prune steps

    @property
    def final_error(self) -> float:
        return self.test_error[-1]

    @property
    def seconds_per_epoch(self) -> float:
        # The median: an epoch slowed by another process on a shared machine would skew a mean.
        return statistics.median(self.epoch_seconds)


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y): 8x8 digits as (N, 3, 8, 8), standardised with the train set's mean/std."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None].expand(-1, 3, -1, -1) / 16.0
    y = torch.tensor(data.target)
    idx_train, idx_test = train_test_split(range(len(y)), test_size=0.2, stratify=data.target, random_state=0)
    x_train, x_test = x[idx_train], x[idx_test]
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y[idx_train], (x_test - mean) / std, y[idx_test]


def shift(x: torch.Tensor, gen: torch.Generator, background: float) -> torch.Tensor:
    """Each image moved by -1, 0 or +1 pixel along each axis (padding with the background value)."""
    padded = F.pad(x, (1, 1, 1, 1), value=background)
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=gen)
    out = torch.empty_like(x)
    for i in range(3):
        for j in range(3):
            rows = ((dy == i) & (dx == j)).nonzero().flatten()
            out[rows] = padded[rows, :, i:i + 8, j:j + 8]
    return out


def test_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()  # stochastic depth: every block on, each branch scaled by its p_l
    with torch.no_grad():
        return (model(x).argmax(1) != y).float().mean().item()


def build(arm: str, depth: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)  # the same initial weights in both arms
    model = cifar_resnet(depth)
    if arm == "stochastic depth":
        model = sdsurgeon.inject(model, P_L, rule="linear", mode="batch", seed=seed,
                                 example_inputs=torch.randn(1, 3, 8, 8))
    return model


def prunable(model: nn.Module, arm: str) -> nn.Module:
    """The trained model with gates to prune: the stochastic-depth arm has them; the constant arm gets gates that
    always keep (p = 1: nothing is scaled), so both lose the same blocks (all p equal: the deepest first)."""
    if arm == "stochastic depth":
        return model
    return sdsurgeon.inject(model, 1.0, example_inputs=torch.randn(1, 3, 8, 8))


def pruned_errors(model: nn.Module, arm: str, steps: list[int], x: torch.Tensor, y: torch.Tensor) -> list[float]:
    gated = prunable(model, arm)
    return [test_error(sdsurgeon.prune(gated, k, calibration=x)[0], x, y) for k in steps]


def train(arm: str, seed: int, depth: int, epochs: int, data, log, steps: list[int] = ()) -> tuple[Run, nn.Module]:
    x_train, y_train, x_test, y_test = data
    model = build(arm, depth, seed)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(seed)  # the same batches and shifts in both arms
    background = x_train.min().item()
    run = Run(arm, seed)
    for epoch in range(epochs):
        warm_up = epoch == 0 and epochs > 2
        lr = LR * (0.1 if warm_up else 0.01 if epoch >= 0.75 * epochs else 0.1 if epoch >= 0.5 * epochs else 1.0)
        for group in opt.param_groups:
            group["lr"] = lr
        model.train()
        order = torch.randperm(len(y_train), generator=gen)
        losses = []
        start = time.perf_counter()
        for b in range(0, len(order), BATCH):
            rows = order[b:b + BATCH]
            loss = F.cross_entropy(model(shift(x_train[rows], gen, background)), y_train[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        run.epoch_seconds.append(time.perf_counter() - start)
        run.train_loss.append(statistics.fmean(losses))
        run.test_error.append(test_error(model, x_test, y_test))
        if epoch + 1 == epochs or (epoch + 1) % 10 == 0:
            log(f"  seed {seed} {arm}: epoch {epoch + 1}/{epochs}, train loss {run.train_loss[-1]:.3f}, "
                f"test error {100 * run.test_error[-1]:.2f}%, {run.epoch_seconds[-1]:.2f} s/epoch")
    if steps:
        run.pruned_error = pruned_errors(model, arm, list(steps), x_test, y_test)
        log(f"  seed {seed} {arm}: pruned by {', '.join(map(str, steps))} blocks: test error "
            f"{', '.join(f'{100 * e:.2f}%' for e in run.pruned_error)}")
    return run, model


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(runs: list[Run]) -> dict:
    arms = {}
    for arm in ARMS:
        mine = [r for r in runs if r.arm == arm]
        err, err_sd = mean_std([100 * r.final_error for r in mine])
        sec, sec_sd = mean_std([r.seconds_per_epoch for r in mine])
        arms[arm] = {"runs": len(mine), "test_error_pct": [err, err_sd], "seconds_per_epoch": [sec, sec_sd]}
    by_seed = {(r.arm, r.seed): r for r in runs}
    seeds = sorted({r.seed for r in runs})
    ratios = [by_seed[ARMS[1], s].seconds_per_epoch / by_seed[ARMS[0], s].seconds_per_epoch for s in seeds]
    return {"arms": arms, "time_ratio": list(mean_std(ratios)), "time_ratio_per_seed": ratios}


def prune_summary(runs: list[Run], steps: list[int]) -> dict:
    """Per arm, mean and std over seeds of the test error (%) after removing each step's number of blocks."""
    return {arm: [list(mean_std([100 * r.pruned_error[i] for r in runs if r.arm == arm])) for i in range(len(steps))]
            for arm in ARMS}


def onnx_latency(model: nn.Module, depth: int, steps: list[int], x: torch.Tensor, rounds: int, reps: int) -> dict:
    """onnxruntime (CPU, 1 thread) latency of the pruned exports, interleaved rounds, each over the unpruned one's;
    and the FLOPs ratio beside it (sdsurgeon.plan's per-block counts)."""
    import tempfile

    import onnxruntime as ort

    from sdsurgeon.deploy.export import export_onnx

    gated = model
    flops_plan = sdsurgeon.plan(cifar_resnet(depth), P_L, example_inputs=x[:1])  # the same architecture's counts
    flops = {s.id: s.flops for s in flops_plan.sites}
    sessions, ratio_flops = {}, {}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    with tempfile.TemporaryDirectory() as d:
        for k in steps:
            pruned, report = sdsurgeon.prune(gated, k, calibration=x)
            export_onnx(pruned, x, Path(d) / f"{k}.onnx")
            sessions[k] = ort.InferenceSession(str(Path(d) / f"{k}.onnx"), opts, providers=["CPUExecutionProvider"])
            ratio_flops[k] = 1 - sum(flops[s] for s in report.dropped) / flops_plan.total_flops
    feed = {sessions[steps[0]].get_inputs()[0].name: x.numpy()}
    times: dict[int, list[float]] = {k: [] for k in steps}
    for s in sessions.values():
        s.run(None, feed)
    for r in range(rounds):
        for k in steps[r % len(steps):] + steps[: r % len(steps)]:
            start = time.perf_counter()
            for _ in range(reps):
                sessions[k].run(None, feed)
            times[k].append((time.perf_counter() - start) / reps)
    base = times[steps[0]]
    return {"batch": len(x), "rounds": rounds, "reps": reps,
            "median_ms": [round(1e3 * statistics.median(times[k]), 3) for k in steps],
            "latency_ratio": [round(statistics.median(a / b for a, b in zip(times[k], base)), 4) for k in steps],
            "flops_ratio": [round(ratio_flops[k], 4) for k in steps]}


def prune_table(steps: list[int], summary: dict, latency: dict | None) -> str:
    lines = ["| blocks removed | constant depth: test error (%) | stochastic depth: test error (%) |"
             + (" ONNX latency ratio | FLOPs ratio |" if latency else ""),
             "|---|---|---|" + ("---|---|" if latency else "")]
    for i, k in enumerate(steps):
        (c, c_sd), (s, s_sd) = summary[ARMS[0]][i], summary[ARMS[1]][i]
        row = f"| {k} | {c:.2f} ± {c_sd:.2f} | {s:.2f} ± {s_sd:.2f} |"
        if latency:
            row += f" {latency['latency_ratio'][i]:.3f} | {latency['flops_ratio'][i]:.3f} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


def prune_plot(steps: list[int], summary: dict, latency: dict | None, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if latency else 1, figsize=(11 if latency else 6, 4.2), layout="constrained",
                             squeeze=False)
    ax = axes[0][0]
    for arm, colour in zip(ARMS, ("tab:blue", "tab:orange")):
        mean = torch.tensor([m for m, _ in summary[arm]])
        std = torch.tensor([s for _, s in summary[arm]])
        ax.errorbar(steps, mean, yerr=std, color=colour, marker="o", capsize=3, label=arm)
    ax.set(xlabel="blocks removed (deepest first)", ylabel="test error (%)", title="test error after pruning (mean ± std)")
    ax.set_ylim(bottom=0)
    ax.legend()
    if latency:
        ax2 = axes[0][1]
        ax2.plot(steps, latency["latency_ratio"], marker="o", label="onnxruntime latency (1 thread)")
        ax2.plot(steps, latency["flops_ratio"], marker="s", linestyle="--", label="FLOPs")
        ax2.set(xlabel="blocks removed", ylabel="ratio to the unpruned export", title="cost of the pruned export")
        ax2.set_ylim(0, 1.05)
        ax2.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def table(summary: dict, setup: str) -> str:
    lines = [f"{setup}", "",
             "| arm | runs | final test error (%) | training time per epoch (s) |", "|---|---|---|---|"]
    for arm, s in summary["arms"].items():
        (err, err_sd), (sec, sec_sd) = s["test_error_pct"], s["seconds_per_epoch"]
        lines.append(f"| {arm} | {s['runs']} | {err:.2f} ± {err_sd:.2f} | {sec:.3f} ± {sec_sd:.3f} |")
    ratio, ratio_sd = summary["time_ratio"]
    lines += ["", f"Time per epoch, stochastic / constant (paired by seed): {ratio:.3f} ± {ratio_sd:.3f}"]
    return "\n".join(lines) + "\n"


def plot(runs: list[Run], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for arm, colour in zip(ARMS, ("tab:blue", "tab:orange")):
        mine = [r for r in runs if r.arm == arm]
        for ax, values in ((ax_err, [[100 * e for e in r.test_error] for r in mine]),
                           (ax_time, [r.epoch_seconds for r in mine])):
            per_epoch = torch.tensor(values)
            mean = per_epoch.mean(0)
            std = per_epoch.std(0) if len(values) > 1 else torch.zeros_like(mean)
            epochs = range(1, len(mean) + 1)
            ax.plot(epochs, mean, color=colour, label=f"{arm} (mean of {len(values)} seeds)")
            ax.fill_between(epochs, mean - std, mean + std, color=colour, alpha=0.25, linewidth=0)
    ax_err.set(xlabel="epoch", ylabel="test error (%)", title="test error (mean ± std over seeds)")
    ax_err.set_ylim(0, min(100.0, 4 * max(100 * r.final_error for r in runs) + 2))
    ax_time.set(xlabel="epoch", ylabel="seconds", title="training time per epoch (mean ± std)")
    ax_time.set_ylim(bottom=0)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_err, ax_time):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_err.legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, help="ResNet depth, 6n+2 (default 110; 20 with --quick)")
    ap.add_argument("--epochs", type=int, help="epochs per run (default 40; 3 with --quick)")
    ap.add_argument("--seeds", type=int, help="seeds per arm (default 3; 2 with --quick)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: with 2 on a 2-core machine "
                    "shared with another process, every parallel op waits for the slower thread; an epoch took 79 s, not 2.5 s)")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few seconds: ResNet-20, 3 epochs, 2 seeds")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for results.md, results.json, replication.png")
    ap.add_argument("--prune-step", type=int, help="prune by 0, STEP, 2 STEP, ... blocks, up to two thirds of them "
                    "(default: a ninth of the blocks, 6 for ResNet-110; 0: no pruning)")
    ap.add_argument("--latency-rounds", type=int, default=20, help="interleaved onnxruntime rounds (default 20; 0: none)")
    args = ap.parse_args()
    depth = args.depth or (20 if args.quick else 110)
    epochs = args.epochs or (3 if args.quick else 40)
    seeds = args.seeds or (2 if args.quick else 3)
    if (depth - 2) % 6 or depth < 8 or epochs < 1 or seeds < 1:
        ap.error("--depth must be 6n+2 (20, 56, 110, ...); --epochs and --seeds at least 1")
    blocks = (depth - 2) // 2
    step = max(1, blocks // 9) if args.prune_step is None else args.prune_step
    steps = list(range(0, 2 * blocks // 3 + 1, step)) if step > 0 else []
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    data = digits()
    setup = (f"ResNet-{depth} ({(depth - 2) // 2} residual blocks) on sklearn digits 8x8 "
             f"({len(data[1])} train / {len(data[3])} test), {epochs} epochs, seeds 0-{seeds - 1}, "
             f"{args.threads} torch thread{'s' * (args.threads != 1)}; stochastic depth: linear rule, p_L = {P_L}, batch mode")
    print(setup, flush=True)
    started = time.perf_counter()
    runs = []
    for seed in range(seeds):
        for arm in ARMS:  # alternating, so machine noise hits both arms alike
            run, model = train(arm, seed, depth, epochs, data, log=lambda line: print(line, flush=True), steps=steps)
            runs.append(run)
    summary = summarise(runs)
    text = table(summary, setup)
    latency = pruned = None
    if steps:
        pruned = prune_summary(runs, steps)
        if args.latency_rounds > 0:  # the last stochastic-depth model: latency depends on the graph, not the weights
            latency = onnx_latency(model, depth, steps, data[2][:BATCH], args.latency_rounds, reps=10)
        text += ("\nPruned after training (schedule order, the deepest blocks first; each kept branch scaled by its "
                 "p_l, 1 in the constant arm), test error mean ± std over seeds"
                 + (f"; onnxruntime latency of the pruned stochastic-depth export over the unpruned one (batch "
                    f"{BATCH}, 1 thread, median of {args.latency_rounds} interleaved rounds) beside its FLOPs ratio"
                    if latency else "") + ":\n\n" + prune_table(steps, pruned, latency))
    print("\n" + text + f"\n(total {time.perf_counter() - started:.0f} s)")
    (args.out / "results.md").write_text(text)
    record = {"depth": depth, "epochs": epochs, "seeds": seeds, "threads": args.threads, "p_L": P_L,
              "torch": torch.__version__, "summary": summary, "prune_steps": steps, "pruned": pruned,
              "latency": latency, "runs": [asdict(r) for r in runs]}
    (args.out / "results.json").write_text(json.dumps(record, indent=1) + "\n")
    plot(runs, args.out / "replication.png", f"ResNet-{depth} on 8x8 digits: constant vs stochastic depth (p_L = {P_L})")
    written = [args.out / name for name in ("results.md", "results.json", "replication.png")]
    if steps:
        prune_plot(steps, pruned, latency, args.out / "pruning.png",
                   f"ResNet-{depth} on 8x8 digits, pruned after training: constant vs stochastic depth")
        written.append(args.out / "pruning.png")
    print(f"wrote {', '.join(map(str, written))}")


if __name__ == "__main__":
    main()
