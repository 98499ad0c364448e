"""Train step of a Llama-style transformers model, injected / original, side by side (eager, labels loss, AdamW).

Run: .venv/bin/python benchmarks/hf_train_step.py [--layers 8] [--hidden 256] [--seq 128] [--batch 8] [--rounds 12]

Models, timed in the same interleaved rounds: the original LlamaForCausalLM (random weights), the model
injected at p_L = 0.5 (each decoder layer rewritten in place: the user's class), the same at p_L = 1
(gates that never drop: the overhead of the gates alone), and p_L = 0.5 through one whole-model
torch.export capture (how inject worked before surgery in place). A step is what transformers.Trainer
does per batch: forward with ``labels`` (the model's own loss), backward, AdamW step, zero_grad.
Ratios are to the original in the same rounds, of mean step times (training time is their sum; the
draws differ per step, so a median of few rounds depends on which steps dropped much) and of medians.
The fraction of branches each injected model really ran, and the expected-FLOPs ratio from
``sdsurgeon.plan``, are printed beside them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import sdsurgeon
from sdsurgeon.analysis import owners
from sdsurgeon.surgery import install as in_place


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 8 / 3) // 8 * 8,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    base = transformers.LlamaForCausalLM(config)
    example = {"input_ids": torch.randint(0, 1000, (2, 16))}
    plan = sdsurgeon.plan(base, 0.5, example_inputs={"input_ids": torch.randint(0, 1000, (args.batch, args.seq))})
    models = {
        "original": copy.deepcopy(base),
        "p_L 0.5, in place": sdsurgeon.inject(base, 0.5, seed=0, example_inputs=example),
        "p_L 1, in place": sdsurgeon.inject(base, 1.0, seed=0, example_inputs=example),
    }
    narrow = owners._blocks
    owners._blocks = lambda *a, **k: None  # no narrowing: the whole-model ATen capture, as before
    try:
        models["p_L 0.5, whole-model capture"] = sdsurgeon.inject(base, 0.5, seed=0, example_inputs=example)
    finally:
        owners._blocks = narrow
    assert type(models["p_L 0.5, in place"]) is type(base)
    assert len(in_place.rewritten(models["p_L 0.5, in place"])) == args.layers
    ran = {k: 0 for k in models}
    for name, model in models.items():  # count the branches that run (a dropped gate skips its branch)
        for gate in sdsurgeon.gates(model):
            gate.branch.register_forward_pre_hook(lambda *_, name=name: ran.__setitem__(name, ran[name] + 1))
    ids = torch.randint(0, 1000, (args.batch, args.seq))
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.warmup + args.rounds):
        for name, model in models.items():
            model.train()
            torch.manual_seed(r)  # the same draws for the models injected alike
            started = time.perf_counter()
            if name.endswith("capture"):  # a GraphModule takes no labels: the same causal-LM loss by hand
                logits = model(input_ids=ids)["logits"]
                loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
            else:
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - started)
    print(f"Llama-style, {args.layers} layers, hidden {args.hidden}, sequence {args.seq}, batch {args.batch}, "
          f"{args.threads} threads, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.rounds} interleaved rounds; expected-FLOPs ratio at p_L 0.5: {plan.expected_train_flops_ratio:.3f}")
    mean0, median0 = statistics.mean(times["original"]), statistics.median(times["original"])
    sites = len(sdsurgeon.gates(models["p_L 0.5, in place"]))
    for name, ts in times.items():
        share = "" if name == "original" else f"  branches run {ran[name] / (sites * (args.warmup + args.rounds)):.3f}"
        print(f"  {name:30s} mean {statistics.mean(ts):.3f} s/step  ratio {statistics.mean(ts) / mean0:.3f}  "
              f"(median ratio {statistics.median(ts) / median0:.3f}){share}")


if __name__ == "__main__":
    main()
