"""Train-step time, injected / original, of torchvision's ResNet-50 and the CIFAR ResNet-110, eager and compiled, in one run.

Run in the zoo tier's venv (torchvision): .venv-zoo/bin/python benchmarks/zoo_train_step.py
(--steps 3 --compile-warmup 2 for a smoke run; --no-compile for the eager ratios alone; --help for options)

Every variant takes one SGD step per round, rounds interleaved (the machine is shared: only ratios within one
run mean anything). Eager injected models are timed against the eager original, compiled ones against the
compiled original. Injected models are unseeded so compiled gates decide inside the graph (torch.cond).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch
import torch._dynamo

import sdsurgeon
from sdsurgeon.models import cifar_resnet
from train_step import interleave, make_step


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="batch size for both models (default 32)")
    ap.add_argument("--side", type=int, default=64, help="ResNet-50 image side (default 64; the CIFAR net takes 32)")
    ap.add_argument("--steps", type=int, default=10, help="timed rounds (default 10)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed eager rounds first (default 2)")
    ap.add_argument("--compile-warmup", type=int, default=6, help="untimed compiled rounds first (default 6)")
    ap.add_argument("--pL", type=float, default=0.5, help="survival probability of the last block (default 0.5)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (compiling takes minutes)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return ap.parse_args()


def models(args: argparse.Namespace) -> dict[str, tuple[torch.nn.Module, torch.Tensor, torch.Tensor, float]]:
    """name -> (original, x, y, expected train-FLOPs ratio) for both architectures, random weights."""
    import torchvision

    out = {}
    for name, build, side in (("resnet50", lambda: torchvision.models.resnet50(num_classes=10), args.side),
                              ("resnet110", lambda: cifar_resnet(110), 32)):
        torch.manual_seed(0)
        model = build().train()
        x, y = torch.randn(args.batch, 3, side, side), torch.randint(0, 10, (args.batch,))
        plan = sdsurgeon.plan(model, args.pL, example_inputs=x[:1])
        out[name] = (model, x, y, plan.expected_train_flops_ratio)
    return out


def ratios(times: dict[str, list[float]], pairs: dict[str, str]) -> dict[str, float]:
    return {name: round(statistics.median(t / t0 for t, t0 in zip(times[name], times[base])), 4)
            for name, base in pairs.items()}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    built = models(args)
    eager_steps, compiled_steps, pairs_eager, pairs_compiled = {}, {}, {}, {}
    for name, (model, x, y, _) in built.items():
        injected = sdsurgeon.inject(model, args.pL).train()
        eager_steps[f"{name} original"] = make_step(copy.deepcopy(model), x, y)
        eager_steps[f"{name} SD"] = make_step(copy.deepcopy(injected), x, y)
        pairs_eager[f"{name} SD"] = f"{name} original"
        if not args.no_compile:
            compiled_steps[f"{name} compiled original"] = make_step(torch.compile(copy.deepcopy(model)), x, y)
            compiled_steps[f"{name} compiled SD"] = make_step(torch.compile(injected), x, y)
            pairs_compiled[f"{name} compiled SD"] = f"{name} compiled original"
    times = interleave(eager_steps, tuple(eager_steps), args.warmup, args.steps)
    result = ratios(times, pairs_eager)
    first_steps = {}
    if compiled_steps:
        torch._dynamo.reset()
        for name, step in compiled_steps.items():
            start = time.perf_counter()
            step()
            first_steps[name] = round(time.perf_counter() - start, 1)
        ctimes = interleave(compiled_steps, tuple(compiled_steps), args.compile_warmup, args.steps)
        times.update(ctimes)
        result.update(ratios(ctimes, pairs_compiled))
    return {
        "batch": args.batch, "resnet50_side": args.side, "rounds": args.steps, "threads": torch.get_num_threads(),
        "p_L": args.pL, "torch": torch.__version__,
        "expected_train_flops_ratio": {name: round(b[3], 4) for name, b in built.items()},
        "median_seconds": {name: round(statistics.median(t), 4) for name, t in times.items()},
        "median_ratio": result, "compiled_first_step_s": first_steps,
    }


def print_table(res: dict) -> None:
    print(f"batch {res['batch']}, ResNet-50 at {res['resnet50_side']}x{res['resnet50_side']}, ResNet-110 at 32x32, "
          f"p_L {res['p_L']}, {res['threads']} threads, torch {res['torch']}, {res['rounds']} interleaved rounds")
    print(f"{'variant':<28} {'median step (s)':>16} {'ratio':>8}")
    for name, seconds in res["median_seconds"].items():
        ratio = res["median_ratio"].get(name)
        print(f"{name:<28} {seconds:>16.3f} {'' if ratio is None else f'{ratio:8.3f}'}")
    print(f"expected training-FLOPs ratio (plan): {res['expected_train_flops_ratio']}")
    print(f"first compiled step (s): {res['compiled_first_step_s']}")


def main() -> None:
    args = parse_args()
    res = run(args)
    if args.json:
        print(json.dumps(res))
    else:
        print_table(res)


if __name__ == "__main__":
    main()
