"""Wall time of sdsurgeon.plan on CIFAR ResNets (goal: ResNet-1202, 600 blocks, <= 3 s).

Run: .venv/bin/python benchmarks/plan_time.py [--depths 110 1202] [--repeats 3]
Reports the best of N runs of plan() without an input (capture + detect + schedule) and with a
1x3x32x32 input (adds the per-branch FLOP count), plus the CLI's own wall time for ResNet-1202.
"""

import argparse
import json
import subprocess
import sys
import time

import torch

import sdsurgeon
from sdsurgeon.models import cifar_resnet


def best_of(repeats, fn):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[110, 1202])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rows = []
    x = torch.randn(1, 3, 32, 32)
    for depth in args.depths:
        model = cifar_resnet(depth)
        sites = sdsurgeon.plan(model, 0.5).num_sites
        rows.append({
            "depth": depth, "sites": sites,
            "plan_s": round(best_of(args.repeats, lambda: sdsurgeon.plan(model, 0.5)), 3),
            "plan_with_flops_s": round(best_of(args.repeats, lambda: sdsurgeon.plan(model, 0.5, example_inputs=x)), 3),
        })
    cmd = [sys.executable, "-m", "sdsurgeon", "plan", "--arch", "sdsurgeon.models:cifar_resnet",
           "--arch-kwargs", json.dumps({"depth": max(args.depths)}), "--json"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    cli = time.perf_counter() - t
    print(f"{'depth':>6} {'sites':>6} {'plan (s)':>9} {'with FLOPs (s)':>15}")
    for r in rows:
        print(f"{r['depth']:>6} {r['sites']:>6} {r['plan_s']:>9.3f} {r['plan_with_flops_s']:>15.3f}")
    print(f"CLI `sdsurgeon plan` (process start, import, build, plan) for depth {max(args.depths)}: {cli:.2f} s")


if __name__ == "__main__":
    main()
