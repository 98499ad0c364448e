"""Plan and export time per Hugging Face model (small configs, random weights) through the torch.export front-end.

For each model of tests/hf_zoo.py, saved with save_pretrained: load the folder, `plan` (capture with
torch.export, train/eval checks, detection, FLOP counting), `inject`, and `export` (fold, ONNX export,
onnxruntime verification); beside it, plain `torch.onnx.export` of the original model in eval, the
floor any export pays. Medians of --rounds rounds, models interleaved within each round.

Run: .venv/bin/python benchmarks/hf_models.py [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdsurgeon  # noqa: E402
from sdsurgeon.capture.inputs import InputSpec, make_example_inputs  # noqa: E402
from sdsurgeon.deploy.verify import export_verified
from sdsurgeon.io.quiet import quiet  # noqa: E402
from sdsurgeon.surgery.fold import fold_with_report  # noqa: E402
from sdsurgeon.capture.hf_inputs import complete_specs  # noqa: E402
from tests.hf_zoo import HF_ZOO, save  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def one_round(folder: Path, case) -> dict[str, float]:
    model, t_load = timed(lambda: sdsurgeon.load(folder))
    specs = complete_specs(model, [InputSpec.parse(s) for s in case.inputs])
    example = make_example_inputs(specs)
    plan, t_plan = timed(lambda: sdsurgeon.plan(model, 0.5, example_inputs=example))
    injected, t_inject = timed(lambda: sdsurgeon.inject(model, 0.5, inputs=specs))

    def export():
        folded, _ = fold_with_report(injected)
        return export_verified(folded, example, folder.parent / f"{case.name}.onnx", reference=injected)

    (exported, checked), t_export = timed(export)
    assert checked.ok and plan.num_sites == case.sites, (case.name, plan.num_sites)

    def plain():
        with quiet(False):
            model.eval()
            torch.onnx.export(model, example[0], str(folder.parent / f"{case.name}.plain.onnx"), kwargs=example[1],
                              dynamo=True, external_data=False)

    _, t_plain = timed(plain)
    return {"load": t_load, "plan": t_plan, "inject": t_inject, "export": t_export, "plain": t_plain,
            "sites": plan.num_sites, "nodes": exported.nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for case in HF_ZOO:
            folders[case.name] = Path(tmp) / case.name
            save(case, folders[case.name])
        one_round(folders[HF_ZOO[0].name], HF_ZOO[0])  # warm-up: imports, first-use compilation
        results: dict[str, list[dict]] = {c.name: [] for c in HF_ZOO}
        for _ in range(args.rounds):
            for case in HF_ZOO:
                results[case.name].append(one_round(folders[case.name], case))
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads, "
          f"median of {args.rounds} rounds\n")
    print("| model | input | sites | ONNX nodes | plan (s) | inject (s) | export --fold + verify (s) | plain torch.onnx.export (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for case in HF_ZOO:
        rows = results[case.name]
        med = {k: statistics.median(r[k] for r in rows) for k in ("plan", "inject", "export", "plain")}
        print(f"| {case.cls} | {', '.join(case.inputs)} | {rows[0]['sites']} | {rows[0]['nodes']} | {med['plan']:.2f} | "
              f"{med['inject']:.2f} | {med['export']:.2f} | {med['plain']:.2f} |")


if __name__ == "__main__":
    main()
