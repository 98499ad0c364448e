"""onnxruntime latency of folded exports vs the original architecture, and `sdsurgeon export` vs torch.onnx.export wall time.

Run: .venv/bin/python benchmarks/onnx_latency.py   (--rounds 5 --reps 3 --export-rounds 1 for a quick smoke run; --help for options)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime as ort
import torch

import sdsurgeon
from sdsurgeon.deploy.export import export_onnx
from sdsurgeon.models import cifar_resnet, vit

# A plain user's export of the same ResNet-110, with the same dynamic batch axis sdsurgeon gives.
PLAIN_EXPORT = """
import sys, torch
from sdsurgeon.models import cifar_resnet
m = cifar_resnet(110).eval()
torch.onnx.export(m, (torch.randn(2, 3, 32, 32),), sys.argv[1], dynamo=True,
                  dynamic_shapes=({0: torch.export.Dim("batch")},))
"""


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30, help="interleaved latency rounds per model (default 30)")
    ap.add_argument("--reps", type=int, default=10, help="consecutive runs per session per round (default 10)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs per session first (default 5)")
    ap.add_argument("--batch", type=int, default=8, help="batch size of the latency runs (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1: less noise)")
    ap.add_argument("--export-rounds", type=int, default=3, help="alternating export runs of each side (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed for weights, inputs and gates (default 0)")
    return ap.parse_args()


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def per_run(sess: ort.InferenceSession, feed: dict, reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        sess.run(None, feed)
    return (time.perf_counter() - start) / reps


def latency(name: str, model: torch.nn.Module, x: torch.Tensor, tmp: Path, args: argparse.Namespace) -> dict:
    inj = sdsurgeon.inject(model, 0.5, example_inputs=x, seed=args.seed)
    # remove_gates gives the same traced architecture without gates, so both sides go through one exporter path.
    variants = {"folded": sdsurgeon.fold(inj), "original": sdsurgeon.remove_gates(inj)}
    nodes, sessions = {}, {}
    for v, m in variants.items():
        nodes[v] = export_onnx(m, x, tmp / f"{name}_{v}.onnx").nodes
        sessions[v] = session(tmp / f"{name}_{v}.onnx", args.threads)
    # A second session on the original file: its ratio to the original is the noise floor of this run.
    sessions["control"] = session(tmp / f"{name}_original.onnx", args.threads)
    feed = {sessions["folded"].get_inputs()[0].name: x.numpy()}
    for s in sessions.values():
        per_run(s, feed, args.warmup)

    times: dict[str, list[float]] = {v: [] for v in sessions}
    for r in range(args.rounds):
        order = list(sessions)[r % 3:] + list(sessions)[: r % 3]  # rotate who goes first
        for v in order:
            times[v].append(per_run(sessions[v], feed, args.reps))
    ratio = statistics.median(f / o for f, o in zip(times["folded"], times["original"]))
    control = statistics.median(c / o for c, o in zip(times["control"], times["original"]))
    return {"nodes": nodes, "median_ms": {v: round(1e3 * statistics.median(t), 3) for v, t in times.items()},
            "median_ratio": round(ratio, 4), "control_ratio": round(control, 4)}


def timed_subprocess(cmd: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)  # captured: hides the exporter's chatter
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... exited {proc.returncode}:\n{proc.stderr}")
    return seconds


def export_time(tmp: Path, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    inj = sdsurgeon.inject(cifar_resnet(110).eval(), 0.5, example_inputs=torch.randn(1, 3, 32, 32), seed=args.seed)
    sd_path = tmp / "r110.sd.pt"
    sdsurgeon.save(inj, sd_path, arch="sdsurgeon.models:cifar_resnet", arch_kwargs={"depth": 110})
    commands = {
        "sdsurgeon": [sys.executable, "-m", "sdsurgeon", "export", str(sd_path), "-o", str(tmp / "a.onnx")],
        "plain": [sys.executable, "-c", PLAIN_EXPORT, str(tmp / "b.onnx")],
    }
    # End to end, python and torch import included on both sides: that is what a user waits for.
    times: dict[str, list[float]] = {"sdsurgeon": [], "plain": []}
    for r in range(args.export_rounds):
        for side in (("sdsurgeon", "plain") if r % 2 == 0 else ("plain", "sdsurgeon")):
            times[side].append(timed_subprocess(commands[side]))
    ratio = statistics.median(a / b for a, b in zip(times["sdsurgeon"], times["plain"]))
    return {"median_s": {k: round(statistics.median(t), 2) for k, t in times.items()}, "median_ratio": round(ratio, 3)}


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    models = {"resnet110": cifar_resnet(110).eval(), "vit": vit().eval()}
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(args.seed))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = {"latency": {name: latency(name, m, x, tmp, args) for name, m in models.items()},
                   "export": export_time(tmp, args)}
    results.update(batch=args.batch, rounds=args.rounds, reps=args.reps, threads=args.threads,
                   export_rounds=args.export_rounds, torch=torch.__version__, onnxruntime=ort.__version__,
                   total_s=round(time.perf_counter() - started, 1))

    print(f"onnxruntime {ort.__version__} (CPU, {args.threads} thread(s)), batch {args.batch}, "
          f"{args.rounds} interleaved rounds x {args.reps} runs; torch {torch.__version__}")
    print(f"{'model':<10} {'nodes folded/orig':>18} {'folded ms':>10} {'orig ms':>9} {'ratio':>7} {'control':>8}  (goal 1.00 ± 0.03; control: original vs itself)")
    for name, r in results["latency"].items():
        nodes = f"{r['nodes']['folded']}/{r['nodes']['original']}"
        print(f"{name:<10} {nodes:>18} {r['median_ms']['folded']:>10.3f} {r['median_ms']['original']:>9.3f} "
              f"{r['median_ratio']:>7.3f} {r['control_ratio']:>8.3f}")
    e = results["export"]
    print(f"\nResNet-110 export, end to end, {args.export_rounds} alternating rounds: sdsurgeon export "
          f"{e['median_s']['sdsurgeon']:.2f} s, plain torch.onnx.export {e['median_s']['plain']:.2f} s, "
          f"ratio {e['median_ratio']:.3f}  (goal <= 1.3)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
