"""Quickstart: add stochastic depth to an existing ResNet-110 checkpoint, then train and evaluate it.

Walks through the whole sdsurgeon workflow on the built-in CIFAR ResNet-110, in a folder it keeps
(`demo/` unless --workdir names another): save a plain state_dict, `sdsurgeon plan` it, `sdsurgeon
inject` it, load the result, train a few steps on a synthetic task, compare step time with the
original, check that eval is deterministic, and `sdsurgeon export --fold` the trained weights to
ONNX, verified with onnxruntime. Every file it names is left there to look at.

Run: .venv/bin/python examples/quickstart.py [--workdir DIR]   (about a minute on 2 idle CPU cores)
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import sdsurgeon
from sdsurgeon.models import cifar_resnet

ARCH = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 110}']
CHECKPOINT, INJECTED, TRAINED, ONNX = "resnet110.pt", "resnet110.sd.pt", "trained.pt", "resnet110.onnx"
BATCH, TRAIN_STEPS, TIMING_STEPS = 32, 15, 24


def heading(text: str) -> None:
    print(f"\n== {text}")


def sdsurgeon_cli(workdir: Path, *args: str) -> str:
    """Run the `sdsurgeon` command (as `python -m sdsurgeon`) in ``workdir``; return its stdout."""
    note = "   # prints one JSON object; the lines below are read from it" if "--json" in args else ""
    print("$ " + shlex.join(["sdsurgeon", *args]) + note)
    done = subprocess.run([sys.executable, "-m", "sdsurgeon", *args], cwd=workdir, check=True,
                          stdout=subprocess.PIPE, text=True)
    return done.stdout


def save_checkpoint(workdir: Path) -> None:
    heading("1. A plain PyTorch checkpoint: CIFAR ResNet-110, saved as a state_dict")
    torch.manual_seed(0)
    model = cifar_resnet(depth=110)
    torch.save(model.state_dict(), workdir / CHECKPOINT)
    params = sum(p.numel() for p in model.parameters())
    print(f"saved {CHECKPOINT}: {params:,} parameters, {len(model.state_dict())} state_dict entries")


def show_plan(workdir: Path) -> dict:
    heading("2. Plan: which residual blocks were found, and what stochastic depth would save")
    plan = json.loads(sdsurgeon_cli(workdir, "plan", CHECKPOINT, *ARCH, "--pL", "0.5",
                                    "--input-shape", "1,3,32,32", "--json"))
    first, last = plan["sites"][0], plan["sites"][-1]
    print(f"residual sites found: {plan['num_sites']} ({plan['num_gated']} gated, {plan['rule']} rule, "
          f"p_L = {plan['p_L']})")
    print(f"survival probability: {first['p']} for the first block ({first['id']}) "
          f"down to {last['p']} for the last ({last['id']})")
    print(f"expected depth: {plan['expected_depth']:.2f} of {plan['num_sites']} blocks per training step")
    print(f"expected training FLOPs: {plan['expected_train_flops_ratio']:.3f} of the original")
    print("(without --json, `sdsurgeon plan` prints a table of every site)")
    return plan


def inject_checkpoint(workdir: Path) -> None:
    heading("3. Inject: gate every residual block and write a model to train")
    out = sdsurgeon_cli(workdir, "inject", CHECKPOINT, *ARCH, "--pL", "0.5", "--input-shape", "1,3,32,32",
                        "-o", INJECTED)
    print("".join(f"  {line}\n" for line in out.splitlines()), end="")


def synthetic_task(seed: int = 0):
    """Random images whose label is a fixed random linear function of their mean colour (learnable)."""
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(3, 10, generator=gen)

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        colour = torch.randn(n, 3, generator=gen)
        images = colour[:, :, None, None] + 0.5 * torch.randn(n, 3, 32, 32, generator=gen)
        return images, (colour @ weights).argmax(dim=1)

    return batch


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def train_injected(workdir: Path) -> nn.Module:
    heading(f"4a. Load {INJECTED} and train it as usual ({TRAIN_STEPS} steps, batch {BATCH})")
    print(f'model = sdsurgeon.load("{INJECTED}")   # no --arch needed: the file records it')
    model = sdsurgeon.load(workdir / INJECTED)
    gates = sdsurgeon.gates(model)
    print(f"{len(gates)} gates; model.train() makes each block survive a step with its own p_l")
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    batch = synthetic_task()
    for step in range(1, TRAIN_STEPS + 1):
        loss = sgd_step(model, opt, *batch(BATCH))
        if step == 1 or step % 3 == 0:
            print(f"  step {step:2d}  loss {loss:.3f}")
    return model


def measure_step_time(workdir: Path, injected: nn.Module) -> float:
    heading(f"4b. Step time: injected vs original ({TIMING_STEPS} interleaved steps each, after 1 warm-up)")
    original = sdsurgeon.load(workdir / CHECKPOINT, arch=ARCH[1], arch_kwargs={"depth": 110}).train()
    x, y = synthetic_task(seed=1)(BATCH)
    opts = {m: torch.optim.SGD(m.parameters(), lr=0.02, momentum=0.9) for m in (original, injected)}
    times: dict[nn.Module, list[float]] = {original: [], injected: []}
    for step in range(TIMING_STEPS + 1):
        for model in (original, injected) if step % 2 else (injected, original):
            start = time.perf_counter()
            sgd_step(model, opts[model], x, y)
            if step:  # step 0 is the warm-up
                times[model].append(time.perf_counter() - start)
    # Means over many steps: each injected step drops a random number of blocks, so one step (or a median of
    # a few) can land far from the average; the spread of the per-pair ratios shows how far.
    t_orig, t_sd = (statistics.fmean(times[m]) for m in (original, injected))
    ratio = t_sd / t_orig
    pairs = sorted(a / b for a, b in zip(times[injected], times[original]))
    low, high = pairs[len(pairs) // 10], pairs[-1 - len(pairs) // 10]
    print(f"original: {1000 * t_orig:.0f} ms/step   injected: {1000 * t_sd:.0f} ms/step   (means of {TIMING_STEPS})")
    print(f"step-time ratio {ratio:.2f} (single steps ranged {low:.2f} to {high:.2f}, 10th to 90th percentile): "
          f"a saving of {100 * (1 - ratio):.0f}%; gates are random, so this varies from run to run")
    return ratio


def check_eval_deterministic(model: nn.Module) -> None:
    heading("5. Evaluate: model.eval() runs every block, scaled by p_l, so outputs are deterministic")
    model.eval()
    x, _ = synthetic_task(seed=2)(8)
    with torch.no_grad():
        a, b = model(x), model(x)
    if not torch.equal(a, b):
        raise SystemExit("error: two eval forward passes differ")
    print(f"two forward passes on the same batch are identical: {torch.equal(a, b)}")


def export_trained(workdir: Path, model: nn.Module) -> dict:
    heading("6. Export: fold each p_l into the trained weights; ONNX verified with onnxruntime")
    torch.save(model.state_dict(), workdir / TRAINED)
    print(f'torch.save(model.state_dict(), "{TRAINED}")   # the keys of the original architecture')
    record = json.loads(sdsurgeon_cli(workdir, "export", INJECTED, "--weights", TRAINED, "-o", ONNX, "--json"))
    print(f"folded {record['folded']} of {record['gates']} gates into weights; "
          f"{len(record['multiplies'])} kept as a multiply")
    print(f"ONNX: {record['nodes']} nodes, {record['file_bytes'] / 1e6:.1f} MB, batch axis dynamic")
    print(f"onnxruntime vs the trained model in eval: max abs error {record['max_abs_error']:.2g} "
          f"(batch sizes {record['verify']['batch_sizes']})")
    return record


def summary(plan: dict, ratio: float, export: dict, workdir: Path) -> None:
    heading("Summary")
    print(f"residual sites gated:       {plan['num_gated']} of {plan['num_sites']}")
    print(f"expected depth (training):  {plan['expected_depth']:.2f} blocks")
    print(f"expected train FLOPs ratio: {plan['expected_train_flops_ratio']:.3f}")
    saving = f"{100 * (1 - ratio):.0f}% of each training step saved" if ratio <= 1 else "no saving this time (a busy machine?)"
    print(f"measured step-time ratio:   {ratio:.2f}: {saving}")
    print(f"injected model:             {workdir / INJECTED}")
    print(f"trained weights:            {workdir / TRAINED}")
    print(f"ONNX (folded, verified):    {workdir / ONNX}, max abs error {export['max_abs_error']:.2g}")
    print(f"all of it stays in {workdir}")


def run(workdir: Path) -> None:
    print(f"working in {workdir}")
    save_checkpoint(workdir)
    plan = show_plan(workdir)
    inject_checkpoint(workdir)
    model = train_injected(workdir)
    ratio = measure_step_time(workdir, model)
    check_eval_deterministic(model)
    export = export_trained(workdir, model)
    summary(plan, ratio, export, workdir)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("demo"),
                    help="folder to work in and keep (default: demo/ in the current folder; its files are replaced)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    try:
        args.workdir.mkdir(parents=True, exist_ok=True)
        run(args.workdir.resolve())
    except subprocess.CalledProcessError as exc:
        print(f"error: `{shlex.join(exc.cmd)}` failed with exit status {exc.returncode}", file=sys.stderr)
        sys.exit(exc.returncode or 1)


if __name__ == "__main__":
    main()
