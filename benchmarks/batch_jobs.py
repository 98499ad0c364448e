"""Wall time of `sdsurgeon batch --jobs 2` against `--jobs 1` on eight CIFAR ResNet-20 checkpoints, alternating.

Run: .venv/bin/python benchmarks/batch_jobs.py   (--rounds 1 --checkpoints 4 for a quick smoke run; --help for options)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from sdsurgeon.models import cifar_resnet


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds, one run of each side each (default 2)")
    ap.add_argument("--checkpoints", type=int, default=8, help="ResNet-20 state_dicts to convert (default 8)")
    ap.add_argument("--jobs", type=int, default=2, help="the parallel side's --jobs (default 2)")
    ap.add_argument("--workdir", type=Path, default=None, help="keep checkpoints and outputs here (default: a temp dir)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    return ap.parse_args()


def make_checkpoints(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for seed in range(n):
        torch.manual_seed(seed)  # same architecture, different weights, as a sweep of training runs gives
        torch.save(cifar_resnet(20).state_dict(), folder / f"resnet20_seed{seed}.pt")


def write_config(path: Path, output_dir: str) -> None:
    # One config per run so each run writes its own output folder; the glob is the same for all.
    path.write_text(
        "defaults: {pL: 0.5, input_shape: [1, 3, 32, 32], fold: true, seed: 0, output_dir: " + output_dir + "}\n"
        "models:\n"
        "  - checkpoint: \"checkpoints/resnet20_*.pt\"\n"
        "    arch: \"sdsurgeon.models:cifar_resnet\"\n"
        "    arch_kwargs: {depth: 20}\n"
    )


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: the CLI and its workers
    return usage.ru_utime + usage.ru_stime


def timed_batch(work: Path, jobs: int, label: str, expected: int) -> dict:
    """One end-to-end `python -m sdsurgeon batch` (interpreter, torch import and worker start-up included)."""
    cfg = work / f"{label}.yaml"
    write_config(cfg, f"runs/{label}/out")
    report_dir = work / "runs" / label / "report"
    cmd = [sys.executable, "-m", "sdsurgeon", "batch", str(cfg), "--jobs", str(jobs), "--force",
           "--report-dir", str(report_dir)]
    load_before = os.getloadavg()[0]
    cpu_before = _children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # captured: plain progress lines, not timed output
    seconds = time.perf_counter() - start
    # CPU seconds of the run and its workers / wall time = cores it kept busy. Near cpu_count for both sides
    # means --jobs 1 already used every core; a side getting more than its share means other load was there.
    cpu = _children_cpu() - cpu_before
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:6])} ... exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    records = json.loads((report_dir / "report.json").read_text())["jobs"]
    ok = sum(r["status"] == "ok" for r in records)
    if ok != expected:  # --force: every job must really have run, or the timing means nothing
        raise RuntimeError(f"{label}: {ok} of {expected} jobs ok:\n{proc.stdout}")
    job_totals = [r["timings"]["total"] for r in records]
    return {"seconds": round(seconds, 2), "cpu_s": round(cpu, 2), "cores_used": round(cpu / seconds, 2),
            "load1_before": round(load_before, 2),
            "median_job_s": round(statistics.median(job_totals), 2), "max_job_s": round(max(job_totals), 2)}


def run(args: argparse.Namespace, work: Path) -> dict:
    make_checkpoints(work / "checkpoints", args.checkpoints)
    sides = {1: [], args.jobs: []}
    for r in range(args.rounds):
        # Alternate who goes first, so a drift in machine load does not favour one side.
        order = (1, args.jobs) if r % 2 == 0 else (args.jobs, 1)
        for jobs in order:
            sides[jobs].append(timed_batch(work, jobs, f"jobs{jobs}_r{r}", args.checkpoints))
    ratios = [p["seconds"] / s["seconds"] for p, s in zip(sides[args.jobs], sides[1])]
    return {
        "checkpoints": args.checkpoints, "rounds": args.rounds, "jobs": args.jobs, "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "median_ratio": round(statistics.median(ratios), 3),
        "ratios": [round(x, 3) for x in ratios],
        "seconds": {f"jobs{j}": [run_["seconds"] for run_ in runs] for j, runs in sides.items()},
        "runs": {f"jobs{j}": runs for j, runs in sides.items()},
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
    }


def print_table(res: dict) -> None:
    j = res["jobs"]
    print(f"sdsurgeon batch, {res['checkpoints']} CIFAR ResNet-20 state_dicts (inject, fold, export, verify), "
          f"--force, {res['cpu_count']} CPUs, torch {res['torch']}; {res['rounds']} alternating rounds")
    print(f"{'round':<6} {'--jobs 1 (s)':>13} {f'--jobs {j} (s)':>13} {'ratio':>7} {'cores used':>12} {'load1 before':>13}")
    for r, (a, b) in enumerate(zip(res["runs"]["jobs1"], res["runs"][f"jobs{j}"])):
        cores = f"{a['cores_used']:.2f} / {b['cores_used']:.2f}"
        loads = f"{a['load1_before']:.2f} / {b['load1_before']:.2f}"
        print(f"{r:<6} {a['seconds']:>13.2f} {b['seconds']:>13.2f} {b['seconds'] / a['seconds']:>7.3f} {cores:>12} {loads:>13}")
    print(f"\nmedian ratio --jobs {j} / --jobs 1: {res['median_ratio']:.3f}  (goal <= 0.65 on 2 cores)")
    print(f"(end to end: interpreter, torch import and worker start-up included; each worker gets cpu_count/jobs "
          f"torch threads; cores used and load: --jobs 1 / --jobs {j})")


def main() -> None:
    args = parse_args()
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        res = run(args, args.workdir.resolve())
    else:
        with tempfile.TemporaryDirectory() as d:
            res = run(args, Path(d))
    if not args.json:
        print_table(res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
