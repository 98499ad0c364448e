"""A 2-rank FSDP2 run of an injected model (or its one-process reference), for tests/test_training.py.

Run: python tests/fsdp2_run.py RANK WORLD INIT_METHOD OUT.json sync|per-rank

Writes, per step, every gate's decision and how many all-gathers and reduce-scatters FSDP2 made, and the
full parameters at the end. Gate p's are set per step so that unit 0 is skipped on the first step only,
unit 1 on the last step only, unit 2 in every step, and unit 3 as its draw says.
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

COUNTS = {}


def _count(name: str) -> None:
    """Count calls of ``dist.<name>``: FSDP2 (torch 2.13, 2.14) looks these up on ``dist`` at every call."""
    real = getattr(dist, name)

    def counted(*args, **kwargs):
        COUNTS[name] += 1
        return real(*args, **kwargs)

    setattr(dist, name, counted)


for _name in ("all_gather_single", "reduce_scatter_single"):
    _count(_name)

import sdsurgeon  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

STEPS = 6
NEVER, ALWAYS = 1e-9, 1.0  # a p that (practically) always drops; one that never draws


class Block(nn.Module):
    """x + f(norm(x)): every weight lies inside the residual branch."""

    def __init__(self, d):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d=8, blocks=4):
        super().__init__()
        self.inp, self.out = nn.Linear(4, d), nn.Linear(d, 3)
        self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def ps(step: int) -> list[float]:
    return [NEVER if step == 0 else ALWAYS, NEVER if step == STEPS - 1 else ALWAYS, NEVER, 0.5]


def run(rank: int, world: int, out: str, mode: str) -> None:
    torch.manual_seed(0)
    model = sdsurgeon.inject(Net(), 0.5, seed=7, sync_ranks=mode != "per-rank")
    gates = sdsurgeon.gates(model)
    if world > 1:
        for block in model.blocks:  # the usual way: each block, then the root
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(1)
    record = {"draws": [], "gathers": [], "scatters": []}
    for step in range(STEPS):
        x, y = torch.randn(8, 4, generator=data), torch.randint(0, 3, (8,), generator=data)  # the global batch
        if world > 1:
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]
        for gate, p in zip(gates, ps(step)):
            gate.p = p
        COUNTS.update(all_gather_single=0, reduce_scatter_single=0)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        record["gathers"].append(COUNTS["all_gather_single"])
        record["scatters"].append(COUNTS["reduce_scatter_single"])
        record["draws"].append([None if g.p >= 1 else bool(g._last_draw < g.p) for g in gates])
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).tolist() for k, v in model.state_dict().items()}
    record["params"] = full
    with open(out, "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    rank, world, init, out, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    if world > 1:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        run(rank, world, out, mode)
    finally:
        if world > 1:
            dist.destroy_process_group()
