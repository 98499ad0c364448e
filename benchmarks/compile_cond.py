"""What the torch.cond gates cost under torch.compile: compiled original vs injected at p_L 0.5 vs always kept.

"always kept" gates every block with p = 1 - 1e-7 (uniform), so each still goes through torch.cond but
(almost) never drops: its ratio to the compiled original is the cost of the cond boundaries alone.
The "torch cond bw" variants are compiled with sdsurgeon.gate.cond_backward switched off: torch's own
torch.cond backward, which runs each kept branch's forward again.
Train step (forward, cross-entropy, backward) at batch 64, 2 threads, 10 interleaved rounds after 3 warm-up.

Run: .venv/bin/python benchmarks/compile_cond.py [DEPTH]   (default 56; compiling takes a few minutes)
"""
from __future__ import annotations

import copy
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import sdsurgeon
from sdsurgeon.gate import cond_backward
from sdsurgeon.models import cifar_resnet


def step_time(model, x, y) -> float:
    start = time.perf_counter()
    for p in model.parameters():
        p.grad = None
    F.cross_entropy(model(x), y).backward()
    return time.perf_counter() - start


def main() -> None:
    depth = int(sys.argv[1]) if len(sys.argv) > 1 else 56
    torch.set_num_threads(2)
    torch.manual_seed(0)
    original = cifar_resnet(depth).train()
    p_half = sdsurgeon.inject(original, 0.5).train()
    kept = sdsurgeon.inject(original, 1 - 1e-7, rule="uniform").train()
    variants = {
        "compiled original": torch.compile(copy.deepcopy(original)),
        "compiled, p_L 0.5": torch.compile(p_half),
        "compiled, always kept": torch.compile(kept),
        "p_L 0.5, torch cond bw": torch.compile(copy.deepcopy(p_half)),
        "always kept, torch cond bw": torch.compile(copy.deepcopy(kept)),
    }
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    for name, model in variants.items():  # compiles happen here
        start = time.perf_counter()
        cond_backward.enabled = "torch cond bw" not in name  # read while compiling only
        for _ in range(3):
            step_time(model, x, y)
        cond_backward.enabled = True
        print(f"{name}: warm-up (compiling) {time.perf_counter() - start:.1f} s", flush=True)
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(10):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first each round
            times[name].append(step_time(variants[name], x, y))
    base = times["compiled original"]
    print(f"\nCIFAR ResNet-{depth}, batch 64, 2 threads, median of 10 interleaved rounds")
    for name in names:
        ratio = statistics.median(t / b for t, b in zip(times[name], base))
        print(f"{name:28s} {statistics.median(times[name]):.4f} s   ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
