"""Train an injected model sharded with FSDP2 on 2 ranks, with a Progressive Layer Dropping schedule.

Run: python examples/fsdp2_train.py [--steps 20] [--backend gloo|nccl]

Gloo on the CPU as written; on a machine with GPUs pass --backend nccl (each rank takes its own GPU).
The model is sharded the usual way (each residual block, then the root). sdsurgeon makes every rank
draw the same gates, and a block whose gate dropped is not called at all: FSDP2 neither gathers its
weights nor reduce-scatters its gradients that step. Rank 0 prints, per step, how many blocks ran and
how many all-gathers FSDP2 made, then resumes the last steps from a checkpoint with the same draws.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard

import sdsurgeon
from sdsurgeon.analysis.schedule import ScheduleSpec
from sdsurgeon.models import cifar_resnet

GATHERS = [0]


def _count_gathers() -> None:
    real = dist.all_gather_single  # what FSDP2 calls for each unit it gathers (torch 2.13, 2.14)

    def counted(*args, **kwargs):
        GATHERS[0] += 1
        return real(*args, **kwargs)

    dist.all_gather_single = counted


def local(value: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a parameter (a DTensor); a buffer (batch-norm statistics) is whole on every rank."""
    return value.to_local() if hasattr(value, "to_local") else value


def build(device: torch.device) -> tuple[torch.nn.Module, sdsurgeon.schedules.Schedule]:
    torch.manual_seed(0)  # the same weights on every rank
    model = sdsurgeon.inject(cifar_resnet(20, width=8), 0.5, seed=0).to(device)  # seeded: resumable draws
    for block in model.layers:  # FSDP2, the usual way: each block, then the root
        fully_shard(block)
    fully_shard(model)
    sched = sdsurgeon.schedules.schedule(model, ScheduleSpec("pld", p_L=0.5, gamma=0.05))
    return model, sched


def rank_main(rank: int, world: int, init: str, args: argparse.Namespace, folder: str) -> None:
    dist.init_process_group(args.backend, init_method=init, rank=rank, world_size=world)
    device = torch.device("cuda", rank) if args.backend == "nccl" else torch.device("cpu")
    torch.set_num_threads(1)
    _count_gathers()
    model, sched = build(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own samples
    batches = [(torch.randn(16, 3, 32, 32, generator=data), torch.randint(0, 10, (16,), generator=data))
               for _ in range(args.steps)]
    checkpoint = os.path.join(folder, f"rank{rank}.pt")
    for step, (x, y) in enumerate(batches):
        if step == args.steps - 3:  # a checkpoint three steps before the end: this rank's shards and the draws
            torch.save({"model": {k: local(v) for k, v in model.state_dict().items()},
                        "sdsurgeon": sdsurgeon.training_state(model, sched)}, checkpoint)
        GATHERS[0] = 0
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x.to(device)), y.to(device))
        loss.backward()
        optimizer.step()
        ran = sum(bool(g.p >= 1 or g._last_draw < g.p) for g in sdsurgeon.gates(model))
        if rank == 0:
            print(f"step {step:2d}  theta {sched.spec.theta(sched.last_step):.3f}  blocks run {ran:2d} of "
                  f"{len(sdsurgeon.gates(model))}  all-gathers {GATHERS[0]:3d}  loss {loss.item():.3f}")
        sched.step()
    final = {k: local(v).clone() for k, v in model.state_dict().items()}

    # resume from the checkpoint in a fresh model: the same draws, the same weights
    model, sched = build(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)  # plain SGD: no optimizer state to restore
    saved = torch.load(checkpoint, weights_only=True)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            local(v).copy_(saved["model"][k])
    sdsurgeon.load_training_state(model, saved["sdsurgeon"], sched)
    for x, y in batches[args.steps - 3:]:
        optimizer.zero_grad()
        F.cross_entropy(model(x.to(device)), y.to(device)).backward()
        optimizer.step()
        sched.step()
    same = all(torch.equal(local(v), final[k]) for k, v in model.state_dict().items())
    if rank == 0:
        print(f"resumed from step {args.steps - 3}: weights {'identical' if same else 'DIFFERENT'} to the run")
    dist.destroy_process_group()
    if not same:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(rank_main, args=(2, f"file://{folder}/rendezvous", args, folder), nprocs=2, join=True)


if __name__ == "__main__":
    main()
