"""`export --fold` of a recorded .sd.pt on two checkouts, alternated: wall time and the walk's traces and captures.

Run: .venv/bin/python benchmarks/export_walk.py --base /tmp/base-export   (--rounds 1 for a quick smoke run)
     the base is a checkout of main: `git worktree add --detach /tmp/base-export main`
     (--models resnet110 for one model; --help for options)
     --format hf / safetensors: `export --format hf` (a save_pretrained folder; transformers models only, so
     --models llama8) or `--format safetensors` instead of ONNX: fold, write, load back and check

Models: CIFAR ResNet-110 (sdsurgeon.models, 54 blocks) and an 8-layer tiny random Llama (transformers, as
tests/hf_zoo.py builds it, 16 blocks), each injected once here and saved as .sd.pt; resnet110-compare is that
file exported with --compare. Each side is a fresh interpreter (the checkout on PYTHONPATH) that runs
pipeline.convert on the file and counts, by wrapping the functions where they are called: fx traces
(torch.fx.Tracer.trace), torch.export captures outside the ONNX exporter, ONNX exports, StochasticDepth gates
built, example inputs made (make_example_inputs) and residual searches (analysis.locate.locate). Wall time is
the convert call alone (load + fold + export + verify); the ratio is taken per round, after / before, so both
sides share the machine's state.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# One side: run in a subprocess with the checkout under test first on sys.path.
WORKER = r"""
import json, sys, time, functools
import torch, torch.fx, torch.export, torch.onnx
counts = {"fx_traces": 0, "exports": 0, "onnx_exports": 0, "gates_built": 0, "example_inputs": 0, "locates": 0}
inside_onnx = [0]

def counted(fn, key, skip_in_onnx=False):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        if not (skip_in_onnx and inside_onnx[0]):
            counts[key] += 1
        return fn(*a, **k)
    return wrapper

def onnx_export(fn):
    @functools.wraps(fn)
    def wrapper(*a, **k):
        counts["onnx_exports"] += 1
        inside_onnx[0] += 1
        try:
            return fn(*a, **k)
        finally:
            inside_onnx[0] -= 1
    return wrapper

torch.fx.Tracer.trace = counted(torch.fx.Tracer.trace, "fx_traces")
torch.export.export = counted(torch.export.export, "exports", skip_in_onnx=True)
torch.onnx.export = onnx_export(torch.onnx.export)
import sdsurgeon
from sdsurgeon import pipeline  # imports the rest of the export path
from sdsurgeon.gate import StochasticDepth
from sdsurgeon.capture import inputs as _inputs
from sdsurgeon.analysis import locate as _locate
init = StochasticDepth.__init__
def gate_init(self, *a, **k):
    counts["gates_built"] += 1
    init(self, *a, **k)
StochasticDepth.__init__ = gate_init
# functions imported by name: rebind them wherever the package holds them
wrapped = {id(_inputs.make_example_inputs): counted(_inputs.make_example_inputs, "example_inputs"),
           id(_locate.locate): counted(_locate.locate, "locates")}
for name, module in list(sys.modules.items()):
    if name.startswith("sdsurgeon") and module is not None:
        for attr, value in list(vars(module).items()):
            if id(value) in wrapped:
                setattr(module, attr, wrapped[id(value)])
path, out, compare, fmt = sys.argv[1], sys.argv[2], sys.argv[3] == "compare", sys.argv[4]
t = time.perf_counter()
result = pipeline.convert(pipeline.ModelRef(path=path), pipeline.ConvertOptions(compare=compare, format=fmt),
                          output=out)
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "gates": len(result.report.sites),
                  "nodes": getattr(result.exported, "nodes", None),
                  "original_nodes": result.original_nodes,
                  "max_abs_error": result.checked.max_abs, "file": sdsurgeon.__file__, **counts}))
"""

COUNTS = ("fx_traces", "exports", "onnx_exports", "gates_built", "example_inputs", "locates")
SUFFIX = {"onnx": ".onnx", "hf": "", "safetensors": ".safetensors"}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, required=True, help="the checkout measured as 'before' (main)")
    ap.add_argument("--after", type=Path, default=Path(__file__).resolve().parents[1],
                    help="the checkout measured as 'after' (default: this one)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds, one export of each side each")
    kinds = ["resnet110", "llama8", "resnet110-compare"]
    ap.add_argument("--models", nargs="+", default=kinds, choices=kinds,
                    help="resnet110-compare: the ResNet-110 file exported with --compare")
    ap.add_argument("--format", default="onnx", choices=["onnx", "hf", "safetensors"],
                    help="what export writes (hf: transformers models only, --models llama8)")
    ap.add_argument("--scaling", default="auto", choices=["auto", "paper", "inverted"],
                    help="inject's scaling (auto: inverted for the Llama, paper for the ResNet; paper folds p into the "
                         "weights, inverted scales nothing)")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    return ap.parse_args()


def make_models(folder: Path, names: list[str], scaling: str = "auto") -> dict[str, Path]:
    """Each model injected once (with the 'after' checkout, imported here) and saved as .sd.pt."""
    import torch

    import sdsurgeon
    from sdsurgeon.capture.hf_inputs import complete_specs
    from sdsurgeon.capture.inputs import InputSpec

    made = {}
    for name in names:
        if name.endswith("-compare"):
            continue
        torch.manual_seed(0)
        if name == "resnet110":
            model = sdsurgeon.load(arch="sdsurgeon.models:cifar_resnet", arch_kwargs={"depth": 110},
                                   remember_arch=False)
            specs = [InputSpec(None, (1, 3, 32, 32))]
        else:
            import transformers

            config = transformers.LlamaConfig(vocab_size=97, max_position_embeddings=64, hidden_size=32,
                                              intermediate_size=64, num_hidden_layers=8, num_attention_heads=2,
                                              num_key_value_heads=1)
            transformers.LlamaForCausalLM(config).save_pretrained(folder / "llama8")
            model = sdsurgeon.load(folder / "llama8")
            specs = [InputSpec.parse("input_ids:2,12:int64")]
        specs = complete_specs(model, specs)  # as the CLI's inject records them (a token input's range from the config)
        gated = sdsurgeon.inject(model, 0.5, inputs=specs, seed=0, scaling=scaling)
        made[name] = folder / f"{name}.sd.pt"
        sdsurgeon.save(gated, made[name])
    return made


def run_side(checkout: Path, model: Path, out: Path, compare: bool, fmt: str = "onnx") -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout), PYTHONDONTWRITEBYTECODE="1")  # nothing written into a checkout
    proc = subprocess.run([sys.executable, "-c", WORKER, str(model), str(out), "compare" if compare else "-", fmt],
                          capture_output=True, text=True, env=env, cwd=out.parent,
                          check=False)  # captured: the exporter's log, not the figures
    if proc.returncode:
        raise SystemExit(f"{checkout}: export of {model.name} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if not row["file"].startswith(str(checkout.resolve())):
        raise SystemExit(f"{checkout}: imported sdsurgeon from {row['file']}, not from the checkout")
    return row


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(args.after))  # the models are made with the 'after' checkout
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        made = make_models(work, list(dict.fromkeys(m.removesuffix("-compare") for m in args.models)), args.scaling)
        results = {}
        for name in args.models:
            path, compare = made[name.removesuffix("-compare")], name.endswith("-compare")
            sides: dict[str, list[dict]] = {"before": [], "after": []}
            for r in range(args.rounds):
                order = ("before", "after") if r % 2 == 0 else ("after", "before")  # alternated: no side always first
                for side in order:
                    checkout = args.base if side == "before" else args.after
                    out = work / f"{name}-{side}-{r}{SUFFIX[args.format]}"
                    sides[side].append(run_side(checkout, path, out, compare, args.format))
            ratios = [a["seconds"] / b["seconds"] for a, b in zip(sides["after"], sides["before"])]
            results[name] = {
                "before": {"median_s": round(statistics.median(s["seconds"] for s in sides["before"]), 3),
                           **{k: sides["before"][0][k] for k in COUNTS + ("gates", "nodes", "original_nodes")}},
                "after": {"median_s": round(statistics.median(s["seconds"] for s in sides["after"]), 3),
                          **{k: sides["after"][0][k] for k in COUNTS + ("gates", "nodes", "original_nodes")}},
                "median_ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
            }
    res = {"rounds": args.rounds, "format": args.format, "scaling": args.scaling, "torch": torch.__version__, "cpus": os.cpu_count(),
           "models": results}
    print(json.dumps(res))
    if args.json:
        return
    print(f"\n{'model':<18} {'side':<7} {'median s':>9} " + " ".join(f"{k:>14}" for k in COUNTS))
    for name, r in results.items():
        for side in ("before", "after"):
            s = r[side]
            print(f"{name:<18} {side:<7} {s['median_s']:>9.3f} " + " ".join(f"{s[k]:>14}" for k in COUNTS))
        print(f"{name:<18} ratio after/before (median of rounds): {r['median_ratio']:.3f}")


if __name__ == "__main__":
    main()
