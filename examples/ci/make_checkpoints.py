"""Write the small checkpoints examples/ci/sdsurgeon.yaml converts, so the example needs no downloads.

Plain state_dicts, as a training script would save them: three CIFAR ResNet-20s (seeds 0-2, matched by
the config's glob) and one small ViT (loaded with `arch` + `weights`). Existing files are left alone,
so re-running this does not make `sdsurgeon batch` redo up-to-date jobs; --force rewrites them.

Run from the repo root: .venv/bin/python examples/ci/make_checkpoints.py   (a second or two)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from sdsurgeon.models import cifar_resnet, vit

HERE = Path(__file__).resolve().parent

# name -> (factory, kwargs, seed). The ViT's kwargs must match `arch_kwargs` in sdsurgeon.yaml.
CHECKPOINTS = {
    "resnet20_seed0": (cifar_resnet, {"depth": 20}, 0),
    "resnet20_seed1": (cifar_resnet, {"depth": 20}, 1),
    "resnet20_seed2": (cifar_resnet, {"depth": 20}, 2),
    "vit_tiny": (vit, {"dim": 32, "depth": 4, "heads": 4}, 0),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "checkpoints", help="folder (default examples/ci/checkpoints)")
    ap.add_argument("--force", action="store_true", help="rewrite checkpoints that already exist")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name, (factory, kwargs, seed) in CHECKPOINTS.items():
        path = args.out / f"{name}.pt"
        if path.exists() and not args.force:
            print(f"kept  {path} (exists; --force rewrites it)")
            continue
        torch.manual_seed(seed)  # different seeds: different weights, the same architecture
        torch.save(factory(**kwargs).state_dict(), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
