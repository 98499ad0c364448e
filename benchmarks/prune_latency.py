"""onnxruntime latency of pruned ResNet-110 exports against the unpruned folded export, beside their FLOPs ratios.

Run: .venv/bin/python benchmarks/prune_latency.py   (--rounds 5 --reps 3 for a quick smoke run; --help for options)

Each pruned model is `sdsurgeon.prune(injected, k)` (schedule order: the deepest blocks first), folded and
exported like `sdsurgeon export --drop k`. Latency: one onnxruntime session per model, interleaved rounds
(the order rotates every round), the median over rounds of each round's ratio to the unpruned export.
FLOPs ratio: the pruned model's forward FLOPs over the unpruned one's, from `sdsurgeon.plan`'s counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import sdsurgeon
from onnx_latency import per_run, session  # this folder: the same timing as the fold benchmark
from sdsurgeon.deploy.export import export_onnx
from sdsurgeon.models import cifar_resnet


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--drops", default="0,13,27", help="blocks removed per model, 0 first (default 0,13,27)")
    ap.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds (default 30)")
    ap.add_argument("--reps", type=int, default=10, help="consecutive runs per session per round (default 10)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per session first (default 5)")
    ap.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1: less noise)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    drops = [int(k) for k in args.drops.split(",")]
    if drops[0] != 0:
        raise SystemExit("--drops must start with 0 (the unpruned export every ratio is taken to)")
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    model = cifar_resnet(110).eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    injected = sdsurgeon.inject(model, 0.5, example_inputs=x[:1], seed=args.seed)
    plan = sdsurgeon.plan(model, 0.5, example_inputs=x[:1])
    flops = {s.id: s.flops for s in plan.sites}
    rows, sessions = {}, {}
    with tempfile.TemporaryDirectory() as d:
        for k in drops:
            pruned, report = sdsurgeon.prune(injected, k, calibration=x)
            path = Path(d) / f"drop{k}.onnx"
            nodes = export_onnx(pruned, x, path).nodes
            rows[k] = {"nodes": nodes, "dropped": len(report.dropped),
                       "flops_ratio": 1 - sum(flops[s] for s in report.dropped) / plan.total_flops,
                       "params": report.params_after}
            sessions[k] = session(path, args.threads)
        feed = {sessions[0].get_inputs()[0].name: x.numpy()}
        for s in sessions.values():
            per_run(s, feed, args.warmup)
        times: dict[int, list[float]] = {k: [] for k in drops}
        for r in range(args.rounds):
            order = drops[r % len(drops):] + drops[: r % len(drops)]
            for k in order:
                times[k].append(per_run(sessions[k], feed, args.reps))
    for k in drops:
        row = rows[k]
        row["median_ms"] = round(1e3 * statistics.median(times[k]), 3)
        row["latency_ratio"] = round(statistics.median(a / b for a, b in zip(times[k], times[0])), 4)
        row["flops_ratio"] = round(row["flops_ratio"], 4)
        row["latency_over_flops"] = round(row["latency_ratio"] / row["flops_ratio"], 4)
    print(f"ResNet-110 (54 blocks), batch {args.batch} at 32x32, onnxruntime {ort.__version__} (CPU, {args.threads} "
          f"thread(s)), {args.rounds} interleaved rounds x {args.reps} runs; torch {torch.__version__}")
    print(f"{'removed':>7} {'nodes':>6} {'params':>10} {'ms':>8} {'latency ratio':>14} {'FLOPs ratio':>12} "
          f"{'latency/FLOPs':>14}  (goal: within 5% of the FLOPs ratio)")
    for k, r in rows.items():
        print(f"{k:>7} {r['nodes']:>6} {r['params']:>10,} {r['median_ms']:>8.3f} {r['latency_ratio']:>14.3f} "
              f"{r['flops_ratio']:>12.3f} {r['latency_over_flops']:>14.3f}")
    print(json.dumps({"rows": rows, "batch": args.batch, "rounds": args.rounds, "reps": args.reps,
                      "threads": args.threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
                      "total_s": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
