"""Train-step time of a CIFAR ResNet: original vs stochastic depth (batch, row, compiled batch), interleaved.

Run: .venv/bin/python benchmarks/train_step.py   (--steps 3 --depth 20 for a quick smoke run; --help for options)

Eager variants are timed against the eager original, the compiled one (torch.compile, inductor) against the
compiled original. Compilation happens in the warm-up rounds; graphs compiled during the timed rounds are
counted and reported (0 means no recompilation per drop pattern). "compiled batch, torch cond bw" is the
same injected model compiled with sdsurgeon.gate.cond_backward switched off: torch's own torch.cond backward,
which runs every kept branch's forward a second time.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

import sdsurgeon
from sdsurgeon.gate import cond_backward
from sdsurgeon.models import cifar_resnet

EAGER = ("original", "batch", "row")
COMPILED = ("compiled original", "compiled batch", "compiled batch, torch cond bw")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth, 6n+2 (default 110)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--steps", type=int, default=20, help="timed rounds, one step of each variant each (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    ap.add_argument("--pL", type=float, default=0.5, help="survival probability of the last block (default 0.5)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights, data and gate draws (default 0)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (compiling takes minutes)")
    ap.add_argument("--compile-warmup", type=int, default=12,
                    help="untimed compiled rounds first: each gate compiles a kept and a dropped continuation (default 12)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return ap.parse_args()


def build_variants(depth: int, p_L: float, seed: int) -> dict[str, nn.Module]:
    """The original model and two injected copies of it (same weights), all in training mode."""
    torch.manual_seed(seed)
    original = cifar_resnet(depth=depth)
    models = {
        "original": original,
        "batch": sdsurgeon.inject(original, p_L, rule="linear", mode="batch", seed=seed),
        "row": sdsurgeon.inject(original, p_L, rule="linear", mode="row", seed=seed),
    }
    for m in models.values():
        m.train()
    return models


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def interleave(steps: dict, names: tuple, warmup: int, rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(warmup + rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first each round
        round_times = {name: timed(steps[name]) for name in order}
        if r >= warmup:
            for name, t in round_times.items():
                times[name].append(t)
    return times


def ratios_to(times: dict[str, list[float]], base: str) -> dict[str, float]:
    return {name: statistics.median(t / t0 for t, t0 in zip(ts, times[base])) for name, ts in times.items()}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One SGD step (forward, cross-entropy, backward, update) as a zero-argument callable."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    models = build_variants(args.depth, args.pL, args.seed)
    plan = sdsurgeon.plan(models["original"], args.pL, example_inputs=torch.randn(1, 3, 32, 32))

    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    steps = {name: make_step(m, x, y) for name, m in models.items()}
    times = interleave(steps, EAGER, args.warmup, args.steps)
    ratios = ratios_to(times, "original")
    compiled: dict = {}
    if not args.no_compile:
        torch._dynamo.reset()
        # Unseeded (torch's global generator, seeded above): a seeded gate draws from its own generator
        # in Python, which breaks the graph; an unseeded one decides inside it with torch.cond.
        unseeded = sdsurgeon.inject(models["original"], args.pL, rule="linear", mode="batch").train()
        trio = {"compiled original": copy.deepcopy(models["original"]), "compiled batch": unseeded,
                "compiled batch, torch cond bw": copy.deepcopy(unseeded)}
        before = _graphs()
        csteps = {name: make_step(torch.compile(m), x, y) for name, m in trio.items()}
        for name in COMPILED:  # compile each alone first, to count its graphs
            start, graphs = time.perf_counter(), _graphs()
            cond_backward.enabled = "torch cond bw" not in name  # read while compiling only
            csteps[name]()
            cond_backward.enabled = True
            compiled[f"{name} first step s"] = round(time.perf_counter() - start, 1)
            compiled[f"{name} graphs after first step"] = _graphs() - graphs
        ctimes = interleave(csteps, COMPILED, args.compile_warmup, 0)  # the gates' other continuations compile here
        warm = _graphs()
        ctimes = interleave(csteps, COMPILED, 0, args.steps)
        compiled["graphs compiled during timed rounds"] = _graphs() - warm
        compiled["graphs total"] = _graphs() - before
        times.update(ctimes)
        ratios.update(ratios_to(ctimes, "compiled original"))
    return {
        "depth": args.depth, "batch": args.batch, "rounds": args.steps, "warmup": args.warmup,
        "threads": torch.get_num_threads(), "p_L": args.pL, "torch": torch.__version__,
        "num_sites": plan.num_sites, "expected_depth": round(plan.expected_depth, 2),
        "expected_train_flops_ratio": round(plan.expected_train_flops_ratio, 4),
        "median_seconds": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "median_ratio": {name: round(r, 4) for name, r in ratios.items()},
        "compile": compiled,
    }


def print_table(res: dict) -> None:
    print(f"CIFAR ResNet-{res['depth']}, batch {res['batch']}, SGD(lr=0.1, momentum=0.9), "
          f"{res['threads']} threads, torch {res['torch']}")
    print(f"{res['rounds']} interleaved rounds after {res['warmup']} warm-up; p_L = {res['p_L']} (linear), "
          f"{res['num_sites']} sites, expected depth {res['expected_depth']}")
    print()
    print(f"{'variant':<32} {'median step (s)':>16} {'median ratio':>13}")
    for name in res["median_seconds"]:
        label = name if "original" in name else f"{name} SD"
        print(f"{label:<32} {res['median_seconds'][name]:>16.3f} {res['median_ratio'][name]:>13.3f}")
    print()
    print(f"expected training-FLOPs ratio (sdsurgeon.plan): {res['expected_train_flops_ratio']:.3f}")
    print("(ratios: eager variants to the eager original, compiled to the compiled original; batch mode skips")
    print(" dropped blocks, row mode runs each branch on its kept samples only)")
    for key, value in res["compile"].items():
        print(f"{key}: {value}")


def main() -> None:
    args = parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)


if __name__ == "__main__":
    main()
