"""Eager train step: gates rewritten in each block (in place) against one graph for the whole model, side by side.

Run: .venv/bin/python benchmarks/in_place_step.py [--depth 110] [--rounds 20]

Both injected models have the same sites, probabilities and seeded draws; only where the gated graph
lives differs (each BasicBlock's own forward, or one graph forward on the root, as a fully traced model
was rewritten before surgery in place). Ratios are to the original model, timed in the same rounds.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import sdsurgeon
from sdsurgeon.analysis import owners
from sdsurgeon.surgery import install as in_place
from sdsurgeon.models import cifar_resnet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=110)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = cifar_resnet(depth=args.depth)
    blocks = sdsurgeon.inject(base, 0.5, seed=0)
    narrow = owners._blocks
    owners._blocks = lambda *a, **k: None  # no narrowing: the captured part (the root) is rewritten whole
    try:
        whole = sdsurgeon.inject(base, 0.5, seed=0)
    finally:
        owners._blocks = narrow
    models = {"original": copy.deepcopy(base), "in place, per block": blocks, "one root graph": whole}
    print(f"CIFAR ResNet-{args.depth}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}; "
          f"rewritten modules: {len(in_place.rewritten(blocks))} vs {len(in_place.rewritten(whole))}")
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.warmup + args.rounds):
        for name, model in models.items():
            model.train()
            torch.manual_seed(r)  # the same draws for both injected models
            started = time.perf_counter()
            optimizers[name].zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizers[name].step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - started)
    reference = statistics.median(times["original"])
    for name, t in times.items():
        print(f"{name:22s} median step {statistics.median(t):.3f} s   ratio {statistics.median(t) / reference:.3f}")


if __name__ == "__main__":
    main()
