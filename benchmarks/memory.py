"""Time and peak memory (RSS) of `plan`, `inject` and `export --format hf` against model size.

Builds Llama-style causal LMs (Qwen2-0.5B-shaped: hidden 896, intermediate 4864, 14 heads / 2 kv heads,
vocab 151936, untied head; random init) of a few depths and dtypes, saves each with save_pretrained
(safetensors), then runs each CLI step as its own process and records its wall time and its peak RSS:

    python -m sdsurgeon plan FOLDER --json
    python -m sdsurgeon inject FOLDER -o m.sd.pt --json
    python -m sdsurgeon export m.sd.pt --format hf -o out --json

Beside them, the floor: transformers itself loading the same folder (from_pretrained) and saving it again
(save_pretrained). Each step's peak is that one process's own (os.wait4 gives a child's rusage alone). This
process imports no torch and holds no model, so no child starts its life with a large parent's pages (Linux
carries the hiwater RSS of the image a child execs from into its ru_maxrss). The CLI's example input for a
causal LM is input_ids 1x16 (capture.hf_inputs), so activations are negligible next to the weights.

``--stages`` also runs inject and export in-process with a progress reporter that prints RSS at each stage
boundary (where the memory goes). ``--before DIR`` also runs ``export --format hf`` with the sdsurgeon of another
checkout (e.g. the commit before a change) on the same files, right after this one's: before and after in one run.
``--steps`` measures some steps only (inject runs whenever export does: it writes the file export reads).

Run: .venv/bin/python benchmarks/memory.py [--layers 4,12,24] [--dtypes bfloat16,float32] [--out DIR]
     [--onnx] [--json FILE] [--before DIR] [--steps plan,inject,export,baseline]
Peak memory is about 1.5-4x the largest model's weights: mind the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
             vocab_size=151936, max_position_embeddings=4096, tie_word_embeddings=False)

BUILD = """
import json, sys, torch, transformers
layers, dtype, folder, shape = int(sys.argv[1]), getattr(torch, sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
config = transformers.LlamaConfig(num_hidden_layers=layers, **shape)
torch.manual_seed(0)
with torch.device("meta"):
    model = transformers.LlamaForCausalLM(config)
model = model.to_empty(device="cpu").to(dtype)
with torch.no_grad():  # random init, small enough that a forward stays finite
    for p in model.parameters():
        p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
model.config.torch_dtype = dtype
model.save_pretrained(folder)
n = sum(p.numel() for p in model.parameters())
b = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"params": n, "weight_bytes": b}))
"""

BASELINE = """
import sys, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype="auto")
model.save_pretrained(sys.argv[2])
"""

STAGES = """
import resource, sys, time, psutil
from pathlib import Path
from sdsurgeon import pipeline
from sdsurgeon.progress import Progress

proc, t0 = psutil.Process(), time.perf_counter()
def mb(): return proc.memory_info().rss / 2**20
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

class Rss(Progress):
    def start(self, name, total=None):
        print(f"  {time.perf_counter() - t0:6.1f}s  start {name:<40} rss {mb():7.0f} MB  peak {peak():7.0f} MB", flush=True)
        return name
    def end(self, name):
        print(f"  {time.perf_counter() - t0:6.1f}s  end   {name:<40} rss {mb():7.0f} MB  peak {peak():7.0f} MB", flush=True)

step, src, out = sys.argv[1:4]
if step == "inject":
    pipeline.inject(pipeline.ModelRef(Path(src)), output=Path(out), progress=Rss())
else:
    pipeline.convert(pipeline.ModelRef(Path(src)), pipeline.ConvertOptions(format="hf"), output=Path(out),
                     progress=Rss())
print(f"  done: peak {peak():.0f} MB", flush=True)
"""


def run(argv: list[str], env: dict | None = None) -> dict:
    """One child process: wall seconds, its own peak RSS (bytes), its stdout."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as err:  # stderr to a file: one pipe read to its end cannot block on the other
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, cwd=(env or {}).get("PYTHONPATH", SOURCE),
                                env=env)
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)  # not communicate(): its waitpid would lose the child's rusage
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        err = err.read()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    return {"seconds": round(seconds, 2), "peak_rss": usage.ru_maxrss * 1024, "stdout": out.decode()}


SOURCE = ROOT  # the sdsurgeon measured (--source: another checkout, e.g. the commit before a change)
BEFORE: Path | None = None  # --before: another checkout whose export is measured beside this one's
SCALING: str | None = None  # --scaling: inject's, passed on (None: its own default)
STEPS = ("plan", "inject", "export", "baseline")


def env(source: Path | None = None) -> dict:
    e = dict(os.environ, PYTHONPATH=str(source or SOURCE), TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    e.pop("TTY_COMPATIBLE", None)
    return e


def measure(layers: int, dtype: str, work: Path, onnx: bool, stages: bool, chosen: tuple[str, ...] = STEPS) -> dict:
    py = sys.executable
    folder = work / f"llama-{layers}-{dtype}"
    built = run([py, "-c", BUILD, str(layers), dtype, str(folder), json.dumps(SHAPE)], env())
    row = {"layers": layers, "dtype": dtype, **json.loads(built["stdout"].strip().splitlines()[-1]), "steps": {}}
    sd, out = work / f"m-{layers}-{dtype}.sd.pt", work / f"out-{layers}-{dtype}"
    export = [py, "-m", "sdsurgeon", "export", str(sd), "--format", "hf", "-o", str(out), "--json"]
    steps = {
        "plan": ("plan", [py, "-m", "sdsurgeon", "plan", str(folder), "--json"], None),
        "inject": ("inject", [py, "-m", "sdsurgeon", "inject", str(folder), "-o", str(sd), "--json",
                              *(["--scaling", SCALING] if SCALING else [])], None),
        "export --format hf": ("export", export, None),
        f"export --format hf (before: {BEFORE})": ("export", export, BEFORE),
        "transformers load + save": ("baseline", [py, "-c", BASELINE, str(folder),
                                                  str(work / f"resaved-{layers}-{dtype}")], None),
    }
    if BEFORE is None:
        del steps[f"export --format hf (before: {BEFORE})"]
    if onnx:
        steps["export (ONNX)"] = ("export", [py, "-m", "sdsurgeon", "export", str(sd), "-o",
                                             str(work / f"m-{layers}.onnx"), "--json"], None)
    for name, (key, argv, source) in steps.items():
        if key not in chosen:
            continue
        if source is not None:
            subprocess.run(["rm", "-rf", str(out)], check=True)  # a fresh output folder, as this one's had
        r = run(argv, env(source))
        row["steps"][name] = {"seconds": r["seconds"], "peak_rss": r["peak_rss"],
                              "ratio": round(r["peak_rss"] / row["weight_bytes"], 2)}
        print(f"{layers:>3} layers {dtype:<8} {name:<26} {r['seconds']:7.1f} s  {r['peak_rss'] / 2**30:6.2f} GiB  "
              f"{r['peak_rss'] / row['weight_bytes']:.2f}x", flush=True)
    if stages:
        for step, src, dst in (("inject", folder, work / "stages.sd.pt"), ("export", sd, work / "stages-hf")):
            print(f"{step}, RSS at each stage:")
            print(run([py, "-c", STAGES, step, str(src), str(dst)], env())["stdout"], end="")
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| layers | params | dtype | weights | step | time (s) | peak RSS | RSS / weights |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for name, s in r["steps"].items():
            lines.append(f"| {r['layers']} | {r['params'] / 1e9:.3f} B | {r['dtype']} | {r['weight_bytes'] / 2**30:.2f} GiB "
                         f"| {name} | {s['seconds']:.1f} | {s['peak_rss'] / 2**30:.2f} GiB | {s['ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="4,12,24", help="depths, comma-separated")
    parser.add_argument("--dtypes", default="bfloat16,float32", help="torch dtypes, comma-separated")
    parser.add_argument("--out", type=Path, help="work folder (default: a temporary one, removed after)")
    parser.add_argument("--onnx", action="store_true", help="also export ONNX (the smallest model only)")
    parser.add_argument("--stages", action="store_true", help="also print RSS at each stage of inject and export")
    parser.add_argument("--json", type=Path, help="write the rows here as JSON")
    parser.add_argument("--source", type=Path, default=ROOT,
                        help="the checkout whose sdsurgeon is measured (default: this one)")
    parser.add_argument("--before", type=Path, help="also measure export --format hf with this checkout's sdsurgeon, "
                                                    "on the same files")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"the steps measured, of {','.join(STEPS)}")
    parser.add_argument("--scaling", choices=["paper", "inverted"],
                        help="inject's --scaling (default: its own, inverted for this model; paper makes export fold "
                             "p into the weights and check against the recipe with a multiply per site)")
    args = parser.parse_args()
    global SOURCE, BEFORE, SCALING
    SCALING = args.scaling
    SOURCE = args.source.resolve()
    BEFORE = args.before.resolve() if args.before else None
    chosen = tuple(args.steps.split(","))
    if set(chosen) - set(STEPS):
        parser.error(f"--steps: unknown {sorted(set(chosen) - set(STEPS))}; choose from {','.join(STEPS)}")
    if "export" in chosen and "inject" not in chosen:
        chosen += ("inject",)  # it writes the file export reads
    rows = []
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        depths = [int(n) for n in args.layers.split(",")]
        for dtype in args.dtypes.split(","):
            for n in depths:
                work = Path(tmp) / f"{n}-{dtype}"
                work.mkdir()
                rows.append(measure(n, dtype, work, args.onnx and n == min(depths), args.stages, chosen))
                subprocess.run(["rm", "-rf", str(work)], check=True)  # the disk holds one model's files at a time
    print()
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
