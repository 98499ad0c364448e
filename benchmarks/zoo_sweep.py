"""The timm sweep: the smallest model of every timm family through plan, inject, fold, ONNX and onnxruntime.

A family is the ``timm.models.<module>`` a registered model name comes from; its smallest variant is
the one with the fewest parameters, counted on the meta device (cached in ``<out>/sizes.json``). Per
family, in a subprocess with a timeout (a hang or crash costs that family only):

  build    random weights with every branch live (tests_zoo/oracle.liven), ``drop_path_rate=0.1``
           (without it if the model does not take one), ``num_classes=10``; a 64x64 input if the
           model takes one (else ``img_size=64``, else its default input size), batch 2
  oracle   drop-path modules called in one eval forward (tests_zoo/oracle.py; never sdsurgeon's output)
  plan     ``sdsurgeon.plan`` at p_L 0.5: the sites found
  inject   ``sdsurgeon.inject`` at p_L 1, then eval equal to the original with drop rates 0
  fold     ``sdsurgeon.fold`` of that, eval equal to the same original
  onnx     ``sdsurgeon.export_onnx`` of the fold (dynamic batch)
  ort      onnxruntime equal to the original on a fresh input
  fold 0.5 (where found == expected) inject at p_L 0.5 and fold, equal to the hand-scaled original

Writes ``<out>/zoo_sweep.json`` and ``<out>/zoo_sweep.md`` (a Markdown table and a summary).

Run: .venv-zoo/bin/python benchmarks/zoo_sweep.py [--out zoo-sweep] [--families resnet,levit]
     [--limit N] [--timeout 600] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests_zoo"))

STAGES = ("build", "oracle", "plan", "inject", "eval", "fold", "onnx", "ort")
DROP = 0.1
SIDE = 64
RTOL, ATOL = 1e-4, 1e-5


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


# --- families and sizes ---------------------------------------------------------------------------------


def families() -> dict[str, list[str]]:
    import timm
    from timm.models import _registry

    out: dict[str, list[str]] = collections.defaultdict(list)
    for name in timm.list_models():
        out[_registry._model_to_module[name]].append(name)
    return dict(sorted(out.items()))


def size_worker(family: str) -> dict:
    """Parameter count of every model of a family, built on the meta device (no memory, no init)."""
    import timm
    import torch

    sizes = {}
    for name in families()[family]:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False)
            sizes[name] = sum(p.numel() for p in model.parameters())
        except Exception as exc:  # noqa: BLE001 - recorded, the family goes on
            sizes[name] = one_line(exc)
    return sizes


# --- one family's pipeline ------------------------------------------------------------------------------


def close(got, want) -> tuple[bool, str]:
    import torch
    from torch.utils import _pytree

    got = [t for t in _pytree.tree_leaves(got) if isinstance(t, torch.Tensor)]
    want = [t for t in _pytree.tree_leaves(want) if isinstance(t, torch.Tensor)]
    if len(got) != len(want):
        return False, f"{len(got)} outputs, expected {len(want)}"
    worst = 0.0
    for g, w in zip(got, want):
        if g.shape != w.shape:
            return False, f"shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        err = (g.double() - w.double()).abs().max().item()
        scale = w.double().abs().max().item()
        if not err <= ATOL + RTOL * scale:
            return False, f"max abs error {err:.3g} (output scale {scale:.3g})"
        worst = max(worst, err / (ATOL + RTOL * scale))
    return True, f"{worst:.2g}x tolerance"


def build(name: str):
    """The model and its input: (model, input, took drop_path_rate)."""
    import timm
    import torch

    def create(**kw):
        torch.manual_seed(0)
        try:
            return timm.create_model(name, pretrained=False, num_classes=10, drop_path_rate=DROP, **kw).eval(), True
        except TypeError as exc:
            if "drop_path_rate" not in str(exc):
                raise
            torch.manual_seed(0)
            return timm.create_model(name, pretrained=False, num_classes=10, **kw).eval(), False

    def works(model, x) -> bool:
        try:
            with torch.no_grad():
                model(x)
            return True
        except Exception:  # noqa: BLE001 - try the next input size
            return False

    small = torch.randn(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    model, dp = create()
    if works(model, small):
        return model, small, dp
    try:
        resized, dp2 = create(img_size=SIDE)
        if works(resized, small):
            return resized, small, dp2
    except Exception:  # noqa: BLE001 - no img_size argument
        pass
    c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(2, c, h, w, generator=torch.Generator().manual_seed(0))
    if not works(model, x):
        with torch.no_grad():
            model(x)  # raises the model's own error for the report
    return model, x, dp


def run_worker(family: str, name: str, partial: Path) -> dict:
    import torch

    import sdsurgeon
    from oracle import called, drop_path_modules, fill_empty_slots, liven, reference

    rec: dict = {"family": family, "model": name, "stage": "build", "ok": False, "reason": "",
                 "expected": None, "found": None, "fold05": None, "seconds": {}}

    def save():
        partial.write_text(json.dumps(rec))

    def stage(what: str):
        rec["stage"] = what
        save()
        return time.perf_counter()

    def done(what: str, started: float):
        rec["seconds"][what] = round(time.perf_counter() - started, 2)

    try:
        t = stage("build")
        model, x, has_dp = build(name)
        liven(model, torch.randn(8, *x.shape[1:], generator=torch.Generator().manual_seed(99))).eval()
        rec["params"] = sum(p.numel() for p in model.parameters())
        rec["input"] = list(x.shape)
        rec["drop_path_rate"] = has_dp
        done("build", t)

        t = stage("oracle")
        probe = copy.deepcopy(model)
        fill_empty_slots(probe)
        calls = called(probe, drop_path_modules(probe), x)
        rec["expected"] = len(calls) if has_dp else None
        done("oracle", t)

        t = stage("plan")
        plan = sdsurgeon.plan(copy.deepcopy(model), p_L=0.5, example_inputs=x)
        rec["found"] = plan.num_sites
        rec["capture"] = plan.capture
        rec["untraced"] = len(plan.untraced)
        done("plan", t)

        original = reference(model, drop_path_modules, x)  # drop rates 0, nothing scaled
        fresh = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            want = original(fresh)

        t = stage("inject")
        gated = sdsurgeon.inject(copy.deepcopy(model), p_L=1.0, example_inputs=x)
        done("inject", t)
        t = stage("eval")
        with torch.no_grad():
            ok, why = close(gated.eval()(fresh), want)
        if not ok:
            raise AssertionError(f"injected (p_L 1) eval vs original: {why}")
        done("eval", t)

        t = stage("fold")
        folded = sdsurgeon.fold(gated).eval()
        with torch.no_grad():
            ok, why = close(folded(fresh), want)
        if not ok:
            raise AssertionError(f"fold vs original: {why}")
        done("fold", t)

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            t = stage("onnx")
            sdsurgeon.export_onnx(folded, x, path)
            done("onnx", t)
            t = stage("ort")
            import onnxruntime as ort

            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            (inp,) = session.get_inputs()
            got = [torch.from_numpy(o) for o in session.run(None, {inp.name: fresh.numpy()})]
            ok, why = close(got, want)
            if not ok:
                raise AssertionError(f"onnxruntime vs original: {why}")
            done("ort", t)
        rec["stage"], rec["ok"], rec["reason"] = "done", True, why
    except Exception as exc:  # noqa: BLE001 - the first failing stage and why, for the table
        rec["reason"] = one_line(exc)
        rec["traceback"] = traceback.format_exc()[-3000:]
    save()

    # The fold at p_L 0.5 against the hand-scaled original, where the oracle and sdsurgeon agree.
    if rec["expected"] and rec["expected"] == rec["found"] and rec["stage"] not in ("build", "oracle", "plan"):
        try:
            t = time.perf_counter()
            folded = sdsurgeon.fold(sdsurgeon.inject(copy.deepcopy(model), p_L=0.5, example_inputs=x)).eval()
            scaled = reference(model, drop_path_modules, x, p_L=0.5).eval()
            with torch.no_grad():
                ok, why = close(folded(fresh), scaled(fresh))
            rec["fold05"] = "ok" if ok else f"differs: {why}"
            rec["seconds"]["fold05"] = round(time.perf_counter() - t, 2)
        except Exception as exc:  # noqa: BLE001
            rec["fold05"] = f"error: {one_line(exc)}"
        save()
    return rec


# --- driver ---------------------------------------------------------------------------------------------


def child(args: list[str], timeout: float, threads: int) -> tuple[int | None, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), SDSURGEON_SWEEP_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        proc = subprocess.run([sys.executable, __file__, *args], env=env, timeout=timeout,
                              capture_output=True, text=True)
        return proc.returncode, proc.stderr[-2000:]
    except subprocess.TimeoutExpired:
        return None, ""


def smallest(sizes: dict[str, object]) -> str | None:
    counted = [(n, s) for n, s in sizes.items() if isinstance(s, int)]
    return min(counted, key=lambda ns: (ns[1], ns[0]))[0] if counted else None


def classify(rec: dict) -> str:
    if rec.get("timeout"):
        return f"timeout ({rec['stage']})"
    if not rec["ok"]:
        return rec["stage"]
    if rec["expected"] is None:
        return "ok (no oracle)"
    return "ok" if rec["expected"] == rec["found"] else "ok, count differs"


def markdown(records: list[dict], command: str, started: str) -> str:
    lines = [f"`{command}` ({started})", "",
             "| family | model | params | input | expected | found | capture | result | fold p_L 0.5 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        exp = "–" if r["expected"] is None else r["expected"]
        found = "–" if r["found"] is None else r["found"]
        params = f"{r['params'] / 1e6:.2f}M" if r.get("params") else "–"
        shape = "×".join(map(str, r["input"][1:])) if r.get("input") else "–"
        result = "ok" if r["ok"] else f"**{r['stage']}**: {r['reason']}"
        result = result.replace("|", "\\|").replace("\n", " ")
        fold05 = (r["fold05"] or "–").replace("|", "\\|")
        lines.append(f"| {r['family']} | {r['model']} | {params} | {shape} | {exp} | {found} | "
                     f"{r.get('capture', '–')} | {result} | {fold05} |")
    with_oracle = [r for r in records if r["expected"] is not None and r["found"] is not None]
    match = sum(r["expected"] == r["found"] for r in with_oracle)
    stages = collections.Counter(classify(r) for r in records)
    lines += ["", f"{len(records)} families; site count equals the drop-path oracle in {match} of the "
              f"{len(with_oracle)} with both counts; whole chain (p_L 1) ok in "
              f"{sum(r['ok'] for r in records)}; "
              f"fold at p_L 0.5 equal to the hand-scaled original in "
              f"{sum(r['fold05'] == 'ok' for r in records)} of {sum(r['fold05'] is not None for r in records)} tried.",
              "", "| outcome (first failing stage) | families |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in stages.most_common()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="zoo-sweep", help="folder for sizes.json, zoo_sweep.json/.md")
    ap.add_argument("--families", default="", help="comma-separated timm module names (default: all)")
    ap.add_argument("--limit", type=int, default=0, help="at most this many families")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per family's run (and per family's sizing)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=3, metavar=("KIND", "FAMILY", "FILE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        import torch

        torch.set_num_threads(int(os.environ.get("SDSURGEON_SWEEP_THREADS", "1")))
        kind, family, file = args.worker
        import warnings

        warnings.filterwarnings("ignore")
        if kind == "size":
            Path(file).write_text(json.dumps(size_worker(family)))
        else:
            fam, _, name = family.partition("/")
            run_worker(fam, name, Path(file))
        return 0

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    started = time.strftime("%Y-%m-%d")
    command = "python benchmarks/zoo_sweep.py " + " ".join(a for a in (argv or sys.argv[1:]))
    fams = families()
    chosen = [f for f in args.families.split(",") if f] or list(fams)
    unknown = [f for f in chosen if f not in fams]
    if unknown:
        print(f"unknown families: {', '.join(unknown)}", file=sys.stderr)
        return 2
    if args.limit:
        chosen = chosen[: args.limit]

    sizes_file = out / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else {}
    records = []
    for i, fam in enumerate(chosen, 1):
        if fam not in sizes:
            tmp = out / "runs" / f"{fam}.sizes.json"
            rc, err = child(["--worker", "size", fam, str(tmp)], args.timeout, args.threads)
            sizes[fam] = json.loads(tmp.read_text()) if rc == 0 and tmp.exists() else {}
            sizes_file.write_text(json.dumps(sizes, indent=1, sort_keys=True))
        name = smallest(sizes[fam])
        if name is None:
            rec = {"family": fam, "model": "–", "stage": "size", "ok": False, "reason": "no model could be sized",
                   "expected": None, "found": None, "fold05": None}
        else:
            partial = out / "runs" / f"{fam}.json"
            partial.unlink(missing_ok=True)
            t = time.perf_counter()
            rc, err = child(["--worker", "run", f"{fam}/{name}", str(partial)], args.timeout, args.threads)
            rec = json.loads(partial.read_text()) if partial.exists() else {
                "family": fam, "model": name, "stage": "start", "ok": False, "reason": "", "expected": None,
                "found": None, "fold05": None}
            if rc is None:
                rec.update(ok=False, timeout=True, reason=f"timed out after {args.timeout:g} s in stage {rec['stage']}")
            elif rc != 0 and rec.get("stage") != "done":
                rec.update(ok=False, reason=f"worker died (exit {rc}): {err.strip().splitlines()[-1] if err.strip() else ''}")
            rec["wall_s"] = round(time.perf_counter() - t, 1)
        records.append(rec)
        print(f"[{i}/{len(chosen)}] {fam}: {rec['model']} expected={rec['expected']} found={rec['found']} "
              f"-> {classify(rec)} {rec['reason'][:120]}", flush=True)
        (out / "zoo_sweep.json").write_text(json.dumps(records, indent=1))
        (out / "zoo_sweep.md").write_text(markdown(records, command, started))
    return 0


if __name__ == "__main__":
    sys.exit(main())
