"""Where torch.compile's time goes with gates: whole-model and branch-only compilation against the compiled original.

Run: .venv/bin/python benchmarks/compile_variants.py   (--depth 20 for a quicker run; --help for options)

Variants (train step, SGD-free: forward, cross-entropy, backward), each a ratio to the compiled original:
whole model compiled with gates (p_L 0.5, and p_L 1 so that nothing is dropped but the graph breaks
remain), only each gate's branch compiled with gates and glue eager (p_L 0.5 and 1), and the eager
original and eager injected model. Measured side by side, interleaved, after warm-up.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch.nn.functional as F

import sdsurgeon
from sdsurgeon.models import cifar_resnet


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=56, help="CIFAR ResNet depth, 6n+2 (default 56)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--warmup", type=int, default=10, help="untimed steps per variant; compiles happen here (default 10)")
    ap.add_argument("--rounds", type=int, default=8, help="interleaved timed rounds (default 8)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    return ap.parse_args()


def branches_compiled(model: torch.nn.Module) -> torch.nn.Module:
    for gate in sdsurgeon.gates(model):
        object.__setattr__(gate, "branch", torch.compile(gate.branch))  # the gate holds its branch unregistered
    return model


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    original = cifar_resnet(args.depth).train()
    variants = {
        "compiled original": torch.compile(copy.deepcopy(original)),
        "compiled, p_L 0.5": torch.compile(sdsurgeon.inject(original, 0.5).train()),
        "compiled, p_L 1": torch.compile(sdsurgeon.inject(original, 1.0).train()),
        "branches compiled, p_L 0.5": branches_compiled(sdsurgeon.inject(original, 0.5).train()),
        "branches compiled, p_L 1": branches_compiled(sdsurgeon.inject(original, 1.0).train()),
        "eager original": copy.deepcopy(original),
        "eager, p_L 0.5": sdsurgeon.inject(original, 0.5).train(),
    }
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def step(model) -> float:
        start = time.perf_counter()
        for p in model.parameters():
            p.grad = None
        F.cross_entropy(model(x), y).backward()
        return time.perf_counter() - start

    for model in variants.values():
        for _ in range(args.warmup):
            step(model)
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
            times[name].append(step(variants[name]))
    base = times["compiled original"]
    result = {name: {"median_s": round(statistics.median(t), 4),
                     "ratio": round(statistics.median(a / b for a, b in zip(t, base)), 3)} for name, t in times.items()}
    print(f"CIFAR ResNet-{args.depth}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}; "
          f"{args.rounds} interleaved rounds after {args.warmup} warm-up steps each")
    print(f"{'variant':<28} {'median step (s)':>16} {'ratio to compiled original':>27}")
    for name, r in result.items():
        print(f"{name:<28} {r['median_s']:>16.4f} {r['ratio']:>27.3f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
