"""DDP or FSDP2 train-step time, 2 ranks over gloo on this machine: original vs stochastic depth (batch mode), interleaved.

Run: .venv/bin/python benchmarks/ddp_step.py [--wrap ddp|fsdp2]   (--depth 20 --steps 3 for a quick smoke run)

Each rank holds both models, wrapped in DistributedDataParallel with its default settings
(find_unused_parameters=False) or sharded with FSDP2 the usual way (``fully_shard`` on each residual
block, then the root), and alternates one step of each; rank 0 reports the median per-round ratio.
The gates draw alike on both ranks (sdsurgeon's default), so no rank waits on another's blocks; under
FSDP2 a dropped block is not called, so its weights are neither gathered nor its gradients reduced.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import sdsurgeon
from sdsurgeon.models import cifar_resnet


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depth", type=int, default=110, help="CIFAR ResNet depth, 6n+2 (default 110)")
    ap.add_argument("--batch", type=int, default=32, help="per-rank batch size (default 32)")
    ap.add_argument("--steps", type=int, default=15, help="timed rounds (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    ap.add_argument("--pL", type=float, default=0.5, help="survival probability of the last block (default 0.5)")
    ap.add_argument("--wrap", choices=["ddp", "fsdp2"], default="ddp", help="how each rank holds the models")
    return ap.parse_args()


def rank_main(rank: int, world: int, init: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    original = cifar_resnet(args.depth)
    models = {"original": original, "batch": sdsurgeon.inject(original, args.pL)}
    torch.manual_seed(rank)  # each rank its own data
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    steps = {}
    for name, m in models.items():
        if args.wrap == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in m.layers:
                fully_shard(block)
            ddp = fully_shard(m.train())
        else:
            ddp = DDP(m.train())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)

        def step(ddp=ddp, opt=opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(ddp(x), y).backward()
            opt.step()

        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.steps):
        for name in (("original", "batch") if r % 2 == 0 else ("batch", "original")):
            dist.barrier()  # both ranks start each step together
            start = time.perf_counter()
            steps[name]()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - start)
    if rank == 0:
        ratio = statistics.median(b / o for b, o in zip(times["batch"], times["original"]))
        with open(out, "w") as f:
            json.dump({"wrap": args.wrap, "depth": args.depth, "per_rank_batch": args.batch, "ranks": world, "rounds": args.steps,
                       "median_seconds": {k: round(statistics.median(v), 4) for k, v in times.items()},
                       "median_ratio": round(ratio, 4), "torch": torch.__version__}, f)
    dist.destroy_process_group()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(rank_main, args=(2, f"file://{tmp}/rendezvous", args, out), nprocs=2, join=True)
        res = json.load(open(out))
    print(f"{res['wrap'].upper()}, 2 ranks (gloo, 1 thread each), CIFAR ResNet-{res['depth']}, batch {res['per_rank_batch']} per rank, "
          f"{res['rounds']} interleaved rounds")
    print(f"original {res['median_seconds']['original']:.3f} s/step, stochastic depth (batch mode, p_L {args.pL}) "
          f"{res['median_seconds']['batch']:.3f} s/step: median ratio {res['median_ratio']:.3f}")
    print(json.dumps(res))


if __name__ == "__main__":
    sys.exit(main())
