"""Replication: plain layer dropout against LayerSkip's early-exit loss (Elhoushi et al. 2024), byte-level, on the
Python standard library's own sources; then self-speculative decoding with transformers' ``assistant_early_exit``.

Data: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (sorted by path; every tenth file held out, the
rest for training), read as bytes: a vocabulary of 256, no tokenizer, nothing downloaded. The figures depend on the
Python installation that runs this (its stdlib is the corpus); results.json records its version and byte counts.

Model: ``transformers.LlamaForCausalLM`` from a small config, random init (seed 0). Two arms, trained the same way
from the same initial weights, data order and layer-dropout draws (the gates' seed):

- plain injection: ``sdsurgeon.inject(model, p_L=0.8, rule="exponential")``: layer dropout alone, LayerSkip's rate
  shape (rising exponentially with depth to 1 - p_L = 0.2 at the last layer);
- early exit: the same plus ``early_exit=True``: the LayerSkip loss at every layer through the model's own final
  norm and LM head, scale type "l" (layer l's loss weighted by l + 1, the last layer's being the task loss), no
  curriculum. Why: the LM head is 512 x 256 here, so an exit's loss costs little and a curriculum (which exists to
  save head compute on 100k-token vocabularies) would only thin each exit's signal in a short run; "l" gives the
  chosen exit (layer index 1 of 8, E = 2) 2/36 of the loss against the task's 8/36, where torchtune's default
  "sum_l" gives it 3/120 against 36/120 (0.45 of that share).

Both arms train with ``transformers.Trainer`` unchanged (AdamW, cosine schedule with warm-up, batch 16 x 128
bytes) with ``sdsurgeon.callbacks.schedule_callback()``, and are exported with sdsurgeon's ``--format hf`` path
(``sdsurgeon.pipeline.convert``). What is measured is the exported folders, loaded with plain
``AutoModelForCausalLM.from_pretrained``:

1. per exit layer, agreement with the full model on held-out text (``sdsurgeon.analysis.draft.exit_agreement``)
   and its predicted speed-up;
2. greedy generation at batch 1 from held-out prompts: plain ``generate`` against ``generate(assistant_early_exit=E)``
   against the CEILING (the same model with every layer after the exit made an identity, its ``o_proj`` and
   ``down_proj`` zeroed, so every draft is accepted at the same compute), and a model that is only the first E
   layers generating plainly; the two assisted ones again with transformers' confidence stop off
   (``assistant_confidence_threshold`` 0: every draft 20 tokens long); all variants of both arms interleaved in
   rounds (the order rotated each round), medians of per-round ratios; assisted outputs checked token for token
   against plain ``generate`` (the ceiling's against its own);
3. the draft loop's overhead: one profiled generation per variant, with the time inside the decoder's forward
   calls (draft and verify calls counted apart) and inside its layers.

Run:   python examples/replication/early_exit.py             (the default; its time is in README.md)
Smoke: python examples/replication/early_exit.py --quick --out /tmp/ee   (a tiny model, a few steps)
Writes early_exit_results.md and early_exit_results.json to --out (default: this folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import sysconfig
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import sdsurgeon
from sdsurgeon.analysis.draft import exit_agreement
from sdsurgeon.callbacks import schedule_callback
from sdsurgeon.pipeline import ConvertOptions, ModelRef, convert

ARMS = ("plain injection", "early exit")
HERE = Path(__file__).resolve().parent
P_L, RULE, SCALE_TYPE, SCALE, CURRICULUM = 0.8, "exponential", "l", 1.0, "none"


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    exit: int  # E = assistant_early_exit: the draft runs layers 0 .. E-1
    seq: int
    batch: int
    steps: int
    lr: float
    new_tokens: int
    prompts: int
    prompt_len: int
    rounds: int
    eval_chunks: int


DEFAULT = Size(hidden=512, layers=8, heads=8, intermediate=1376, exit=2, seq=128, batch=16, steps=240, lr=2e-3,
               new_tokens=64, prompts=2, prompt_len=64, rounds=5, eval_chunks=32)
QUICK = Size(hidden=64, layers=4, heads=2, intermediate=128, exit=1, seq=32, batch=4, steps=6, lr=3e-3,
             new_tokens=12, prompts=2, prompt_len=16, rounds=2, eval_chunks=4)


# --- data ----------------------------------------------------------------------------------------------------------

def stdlib_bytes() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, held-out bytes, what was read): the stdlib's .py files sorted, every tenth held out."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    train, held = bytearray(), bytearray()
    for i, path in enumerate(files):
        (held if i % 10 == 9 else train).extend(path.read_bytes() + b"\n")
    info = {"stdlib": str(root), "python": sys.version.split()[0], "files": len(files),
            "train_bytes": len(train), "heldout_bytes": len(held)}
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(held, dtype=torch.uint8).long(), info


def spread(stream: torch.Tensor, count: int, length: int, offset: int = 0) -> torch.Tensor:
    """``count`` windows of ``length`` bytes at evenly spaced starts of ``stream`` (a fixed choice, no randomness)."""
    step = (len(stream) - length - offset) // count
    return torch.stack([stream[offset + i * step: offset + i * step + length] for i in range(count)])


class Windows(torch.utils.data.Dataset):
    """The training stream cut into consecutive windows of ``seq`` bytes: input_ids = labels (the model shifts)."""

    def __init__(self, stream: torch.Tensor, seq: int) -> None:
        self.stream, self.seq = stream, seq

    def __len__(self) -> int:
        return len(self.stream) // self.seq

    def __getitem__(self, i: int) -> dict:
        x = self.stream[i * self.seq:(i + 1) * self.seq]
        return {"input_ids": x, "labels": x}


# --- the arms --------------------------------------------------------------------------------------------------------

def config(size: Size):
    import transformers

    return transformers.LlamaConfig(vocab_size=256, hidden_size=size.hidden, intermediate_size=size.intermediate,
                                    num_hidden_layers=size.layers, num_attention_heads=size.heads,
                                    num_key_value_heads=size.heads, max_position_embeddings=1024,
                                    bos_token_id=None, eos_token_id=None, pad_token_id=0, tie_word_embeddings=False)


def train_arm(arm: str, initial: dict, size: Size, train: torch.Tensor, folder: Path, seed: int, log) -> dict:
    """Train one arm with transformers.Trainer from ``initial`` weights; export it to ``folder`` (--format hf)."""
    import transformers

    model = transformers.LlamaForCausalLM(config(size))
    model.load_state_dict(initial)
    example = {"input_ids": train[:2 * size.seq].view(2, size.seq)}
    extra = dict(early_exit=True, exit_scale_type=SCALE_TYPE, exit_scale=SCALE, exit_curriculum=CURRICULUM) \
        if arm == "early exit" else {}
    injected = sdsurgeon.inject(model, p_L=P_L, rule=RULE, seed=seed, example_inputs=example, **extra)
    args = transformers.TrainingArguments(
        output_dir=str(folder.parent / f"trainer-{folder.name}"), max_steps=size.steps,
        per_device_train_batch_size=size.batch, learning_rate=size.lr, weight_decay=0.1, adam_beta2=0.95,
        lr_scheduler_type="cosine", warmup_steps=max(1, size.steps // 10), max_grad_norm=1.0,
        logging_steps=max(1, size.steps // 10), save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
        seed=seed, data_seed=seed, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=injected, args=args, train_dataset=Windows(train, size.seq),
                                   callbacks=[schedule_callback()])
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [(e["step"], round(e["loss"], 4)) for e in trainer.state.log_history if "loss" in e]
    log(f"  {arm}: {size.steps} steps in {seconds:.0f} s, logged training loss {losses[0][1]} -> {losses[-1][1]}")
    trained = folder.parent / f"trained-{folder.name}"
    trainer.save_model(str(trained))  # the training folder (recipe in config.json), then `export --format hf`
    convert(ModelRef(trained), ConvertOptions(format="hf"), output=folder, name=arm)
    return {"train_seconds": round(seconds, 1), "loss_log": losses}


def load(folder: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def ceiling_of(model, exit_: int):
    """The same model with every layer from ``exit_`` on an identity: its attention's and MLP's output projections
    zeroed (a residual block then adds exactly 0), so the full model's tokens are the exit's and every draft is
    accepted, at the same compute."""
    ceiling = copy.deepcopy(model)
    with torch.no_grad():
        for layer in ceiling.model.layers[exit_:]:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return ceiling


def truncated_of(model, exit_: int):
    """A model that is only the first ``exit_`` layers (the same embedding, final norm and head): the draft's compute
    generating plainly, with no draft loop around it."""
    import transformers

    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = exit_
    short = transformers.LlamaForCausalLM(cfg).eval()
    # the model's own generation settings: a config saved by the Trainer says use_cache false (set for training),
    # and a generation config made from it would decode without a cache, recomputing every position each step
    short.generation_config = copy.deepcopy(model.generation_config)
    missing, unexpected = short.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("model.layers.") for k in unexpected), (missing, unexpected)
    return short


# --- generation and its profile -------------------------------------------------------------------------------------

def generate(model, prompt: torch.Tensor, n: int, exit_: int | None, stop: bool = True) -> torch.Tensor:
    """Greedy, ``n`` new tokens; with ``exit_``, drafted by the first ``exit_`` layers. ``stop=False`` turns off
    transformers' confidence stop (assistant_confidence_threshold, 0.4 by default, ends a draft at the first token
    the draft's softmax gives less than that), so every draft is num_assistant_tokens (20) long. It is set on the
    model's generation_config: passed to generate(), transformers 5.25's draft loop did not see it (tried)."""
    kwargs = {} if exit_ is None else {"assistant_early_exit": exit_}
    saved = model.generation_config.assistant_confidence_threshold
    if not stop:
        model.generation_config.assistant_confidence_threshold = 0.0
    try:
        with torch.no_grad():
            out = model.generate(prompt[None], attention_mask=torch.ones_like(prompt)[None], max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, **kwargs)
    finally:
        model.generation_config.assistant_confidence_threshold = saved
    return out[0, len(prompt):]


class Profile:
    """Forward (pre-)hooks on the decoder (``model.model``) and its layers: seconds inside decoder calls (full-depth
    calls, i.e. plain steps and verifications, apart from draft calls run at ``assistant_early_exit`` layers) and
    inside the layers."""

    def __init__(self, model) -> None:
        self.decoder, self.handles = model.model, []
        self.calls = {"full": 0, "draft": 0}
        self.seconds = {"full": 0.0, "draft": 0.0, "layers": 0.0}
        self._start = self._layer_start = 0.0
        self.handles.append(self.decoder.register_forward_pre_hook(self._pre))
        self.handles.append(self.decoder.register_forward_hook(self._post))
        for layer in self.decoder.layers:
            self.handles.append(layer.register_forward_pre_hook(self._layer_pre))
            self.handles.append(layer.register_forward_hook(self._layer_post))

    def _kind(self) -> str:
        return "draft" if self.decoder.config.num_hidden_layers < len(self.decoder.layers) else "full"

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        kind = self._kind()
        self.seconds[kind] += time.perf_counter() - self._start
        self.calls[kind] += 1

    def _layer_pre(self, module, args):
        self._layer_start = time.perf_counter()

    def _layer_post(self, module, args, output):
        self.seconds["layers"] += time.perf_counter() - self._layer_start

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def profiled(model, exit_: int | None, stop: bool, prompts: torch.Tensor, n: int) -> dict:
    """One generation of every prompt under Profile: per generated token, ms in total, inside decoder calls, inside
    layers, and outside the decoder (generate's loop, logits processing, the draft loop's own work)."""
    prof = Profile(model)
    try:
        started = time.perf_counter()
        for p in prompts:
            generate(model, p, n, exit_, stop)
        total = time.perf_counter() - started
    finally:
        prof.close()
    tokens = len(prompts) * n
    inside = prof.seconds["full"] + prof.seconds["draft"]
    ms = lambda s: round(1e3 * s / tokens, 3)  # noqa: E731
    return {"ms_per_token": ms(total), "decoder_ms_per_token": ms(inside),
            "layers_ms_per_token": ms(prof.seconds["layers"]), "outside_decoder_ms_per_token": ms(total - inside),
            "outside_decoder_share": round((total - inside) / total, 4),
            "full_calls": prof.calls["full"], "draft_calls": prof.calls["draft"],
            "full_ms_per_call": round(1e3 * prof.seconds["full"] / max(1, prof.calls["full"]), 3),
            "draft_ms_per_call": round(1e3 * prof.seconds["draft"] / max(1, prof.calls["draft"]), 3),
            "tokens_per_verification": round(tokens / max(1, prof.calls["full"]), 2) if exit_ else None}


# --- measurement -----------------------------------------------------------------------------------------------------

# timed in the rounds; "ceiling plain" (the ceiling model's own plain generate, the reference its assisted tokens are
# checked against) is not: zeroed weights leave a dense matmul's cost as it is, so it costs what "plain" costs
VARIANTS = ("plain", "assisted", "ceiling assisted", "first E layers", "assisted, no confidence stop",
            "ceiling assisted, no confidence stop")


def measure(folders: dict[str, Path], size: Size, held: torch.Tensor, log) -> dict:
    E = size.exit
    calib = spread(held, size.eval_chunks, size.seq)
    prompts = spread(held, size.prompts, size.prompt_len, offset=size.seq // 2)
    models, result = {}, {}
    for arm in ARMS:
        model = load(folders[arm])
        ceiling = ceiling_of(model, E)
        report = exit_agreement(model, {"input_ids": calib})
        ceiling_report = exit_agreement(ceiling, {"input_ids": calib})
        result[arm] = {"agreement": [e.agreement for e in report.exits],
                       "predicted_speedup": [round(e.speedup, 4) for e in report.exits],
                       "positions": report.positions, "draft_tokens": report.draft_tokens,
                       "ceiling_agreement_at_exit": ceiling_report.exits[E - 1].agreement,
                       "ceiling_predicted_speedup": round(ceiling_report.exits[E - 1].speedup, 4)}
        log(f"  {arm}: agreement at exit {E} (after layer {E - 1}): {report.exits[E - 1].agreement:.4f}")
        models[arm] = {"plain": (model, None, True), "assisted": (model, E, True),
                       "ceiling plain": (ceiling, None, True),
                       "ceiling assisted": (ceiling, E, True), "first E layers": (truncated_of(model, E), None, True),
                       "assisted, no confidence stop": (model, E, False),
                       "ceiling assisted, no confidence stop": (ceiling, E, False)}
    keys = [(arm, v) for arm in ARMS for v in VARIANTS]
    outputs: dict = {}
    for key in [(arm, v) for arm in ARMS for v in models[arm]]:  # warm-up, and the reference outputs
        m, e, stop = models[key[0]][key[1]]
        outputs[key] = [generate(m, p, size.new_tokens, e, stop) for p in prompts]
    times: dict = {k: [] for k in keys}
    same = {k: True for k in keys}
    for r in range(size.rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:  # rotated: each variant takes every slot in turn
            m, e, stop = models[key[0]][key[1]]
            started = time.perf_counter()
            got = [generate(m, p, size.new_tokens, e, stop) for p in prompts]
            times[key].append(time.perf_counter() - started)
            same[key] &= all(torch.equal(a, b) for a, b in zip(got, outputs[key]))
        log(f"  round {r + 1}/{size.rounds}: " + ", ".join(f"{a[:5]}/{v} {times[a, v][-1]:.2f} s" for a, v in keys))
    tokens = size.prompts * size.new_tokens

    def ratio(num, den):  # the median of per-round ratios: a round's load falls on both
        return round(statistics.median(a / b for a, b in zip(times[den], times[num])), 4)

    for arm in ARMS:
        speed = {v: round(tokens / statistics.median(times[arm, v]), 2) for v in VARIANTS}
        def same_as(variant, reference):
            return all(torch.equal(a, b) for a, b in zip(outputs[arm, variant], outputs[arm, reference]))

        identical = same_as("assisted", "plain") and same_as("assisted, no confidence stop", "plain")
        ceiling_identical = (same_as("ceiling assisted", "ceiling plain")
                             and same_as("ceiling assisted, no confidence stop", "ceiling plain"))
        speedup = ratio((arm, "assisted"), (arm, "plain"))
        ceiling = ratio((arm, "ceiling assisted"), (arm, "plain"))
        result[arm]["generation"] = {  # the ceiling over plain: the ceiling model's compute is the model's
            "tokens_per_second": speed, "speedup": speedup, "ceiling": ceiling,
            "speedup_over_ceiling": round(speedup / ceiling, 4),
            "gain_over_ceiling_gain": round((speedup - 1) / (ceiling - 1), 4) if ceiling != 1 else None,
            "first_E_layers_over_plain": ratio((arm, "first E layers"), (arm, "plain")),
            "speedup_no_confidence_stop": ratio((arm, "assisted, no confidence stop"), (arm, "plain")),
            "ceiling_no_confidence_stop": ratio((arm, "ceiling assisted, no confidence stop"), (arm, "plain")),
            "identical": identical, "ceiling_identical": ceiling_identical,
            "repeatable": all(same[arm, v] for v in VARIANTS),
            "seconds": {v: [round(t, 6) for t in times[arm, v]] for v in VARIANTS}}
        assert identical and ceiling_identical, f"{arm}: assisted generate gave other tokens than plain generate"
        result[arm]["profile"] = {v: profiled(*models[arm][v], prompts, size.new_tokens) for v in VARIANTS}
    return result


# --- report ----------------------------------------------------------------------------------------------------------

def report(size: Size, result: dict, setup: str) -> str:
    E, L = size.exit, size.layers
    a = {arm: result[arm]["agreement"] for arm in ARMS}
    lines = [setup, "", "Agreement with the full model per exit (held-out text, `exit_agreement`), and the speed-up "
             f"it predicts (draft length {result[ARMS[0]]['draft_tokens']}, every draft token accepted with that "
             "probability):", "",
             "| assistant_early_exit (layers drafted) | plain injection: agreement | early exit: agreement "
             "| plain injection: predicted speed-up | early exit: predicted speed-up |", "|---|---|---|---|---|"]
    for l in range(L - 1):
        mark = " (chosen)" if l + 1 == E else ""
        lines.append(f"| {l + 1}{mark} | {a[ARMS[0]][l]:.4f} | {a[ARMS[1]][l]:.4f} | "
                     f"{result[ARMS[0]]['predicted_speedup'][l]:.3f} | {result[ARMS[1]]['predicted_speedup'][l]:.3f} |")
    d_plain, d_ee = 1 - a[ARMS[0]][E - 1], 1 - a[ARMS[1]][E - 1]
    ratio = d_ee / d_plain if d_plain else float("inf")
    lines += ["", f"Disagreement at exit {E}: plain injection {d_plain:.4f}, early exit {d_ee:.4f}: ratio "
              f"{ratio:.3f} (goal: at most 0.5; {'met' if ratio <= 0.5 else 'not met'}). The ceiling model's "
              f"agreement at exit {E}: {result[ARMS[0]]['ceiling_agreement_at_exit']:.4f} and "
              f"{result[ARMS[1]]['ceiling_agreement_at_exit']:.4f} (1 by construction).", "",
              f"Greedy generation, batch 1, {size.prompts} held-out prompts of {size.prompt_len} bytes, "
              f"{size.new_tokens} new tokens each; tokens/s = median over {size.rounds} interleaved rounds, ratios = "
              "median of per-round ratios:", "",
              "| arm | plain tok/s | assisted tok/s | ceiling assisted tok/s | speed-up | ceiling | speed-up / ceiling "
              "| (speed-up - 1) / (ceiling - 1) | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        g = result[arm]["generation"]
        t = g["tokens_per_second"]
        gain = "n/a" if g["gain_over_ceiling_gain"] is None else f"{g['gain_over_ceiling_gain']:.3f}"
        lines.append(f"| {arm} | {t['plain']:.1f} | {t['assisted']:.1f} | {t['ceiling assisted']:.1f} "
                     f"| {g['speedup']:.3f} | {g['ceiling']:.3f} | {g['speedup_over_ceiling']:.3f} | {gain} "
                     f"| {'yes' if g['identical'] and g['ceiling_identical'] else 'NO'} |")
    lines += ["", "The same with transformers' confidence stop off (`assistant_confidence_threshold=0`: every draft "
              "num_assistant_tokens = 20 long): speed-up and ceiling over plain generate: " + "; ".join(
                  f"{arm}: {result[arm]['generation']['speedup_no_confidence_stop']:.3f} and "
                  f"{result[arm]['generation']['ceiling_no_confidence_stop']:.3f}" for arm in ARMS)
              + f". A model of only the first {E} layers generates " + "; ".join(
                  f"{result[arm]['generation']['first_E_layers_over_plain']:.3f}" for arm in ARMS)
              + f" times as fast as plain generate (by layer count alone: {L}/{E} = {L / E:.2f})."]
    g = result[ARMS[1]]["generation"]
    lines += ["", f"Goal: the early-exit arm's speed-up at least 70% of the ceiling: {g['speedup_over_ceiling']:.3f} "
              f"({'met' if g['speedup_over_ceiling'] >= 0.7 else 'not met'}).", "",
              f"The draft loop's overhead (one profiled generation of the same prompts; ms per generated token; "
              f"'first {E} layers' is a model of only the draft's layers generating plainly):", "",
              "| arm | variant | ms/token | in decoder calls | in layers | outside the decoder (share) | "
              "full-depth calls | draft calls | ms per full call | ms per draft call | tokens per verification |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        for v, p in result[arm]["profile"].items():
            lines.append(f"| {arm} | {v} | {p['ms_per_token']:.2f} | {p['decoder_ms_per_token']:.2f} | "
                         f"{p['layers_ms_per_token']:.2f} | {p['outside_decoder_ms_per_token']:.2f} "
                         f"({100 * p['outside_decoder_share']:.0f}%) | {p['full_calls']} | {p['draft_calls']} | "
                         f"{p['full_ms_per_call']:.2f} | {p['draft_ms_per_call']:.2f} | "
                         f"{'-' if p['tokens_per_verification'] is None else p['tokens_per_verification']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: a 4-layer, 64-wide model, 6 steps")
    ap.add_argument("--steps", type=int,
                    help=f"training steps per arm (default {DEFAULT.steps}; {QUICK.steps} with --quick)")
    ap.add_argument("--rounds", type=int, help=f"interleaved generation rounds (default {DEFAULT.rounds})")
    ap.add_argument("--new-tokens", type=int, help=f"tokens generated per prompt (default {DEFAULT.new_tokens})")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine a "
                    "second thread waits on the other processes)")
    ap.add_argument("--seed", type=int, default=0, help="initial weights, data order and layer-dropout draws")
    ap.add_argument("--out", type=Path, default=HERE, help="folder for early_exit_results.md and .json")
    ap.add_argument("--keep", type=Path, help="keep the trained and exported model folders here (default: a "
                    "temporary folder, removed at the end)")
    args = ap.parse_args()
    size = QUICK if args.quick else DEFAULT
    for name in ("steps", "rounds", "new_tokens"):
        if getattr(args, name) is not None:
            size = Size(**{**asdict(size), name: getattr(args, name)})
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    started = time.perf_counter()
    log = lambda line: print(line, flush=True)  # noqa: E731

    train, held, data = stdlib_bytes()
    torch.manual_seed(args.seed)
    initial = transformers.LlamaForCausalLM(config(size)).state_dict()
    params = sum(v.numel() for v in initial.values())
    setup = (f"Llama (hidden {size.hidden}, {size.layers} layers, {size.heads} heads, MLP {size.intermediate}, "
             f"vocab 256 bytes, {params / 1e6:.1f} M parameters), random init (seed {args.seed}), trained "
             f"{size.steps} steps of {size.batch} x {size.seq} bytes with transformers.Trainer on the stdlib of Python "
             f"{data['python']} ({data['files']} .py files, {data['train_bytes'] / 1e6:.1f} MB train / "
             f"{data['heldout_bytes'] / 1e6:.1f} MB held out, split by file); both arms: p_L = {P_L}, rule {RULE}; "
             f"early exit: every layer, scale type {SCALE_TYPE}, scale {SCALE}, curriculum {CURRICULUM}; "
             f"exit E = {size.exit}; {args.threads} torch thread{'s' * (args.threads != 1)}, "
             f"torch {torch.__version__}, "
             f"transformers {transformers.__version__}.")
    log(setup)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = scratch if args.keep is None else args.keep
        Path(tmp).mkdir(parents=True, exist_ok=True)
        folders = {arm: Path(tmp) / arm.replace(" ", "-") for arm in ARMS}
        trained = {arm: train_arm(arm, initial, size, train, folders[arm], args.seed, log) for arm in ARMS}
        result = measure(folders, size, held, log)
    seconds = time.perf_counter() - started
    text = report(size, result, setup)
    training = sum(t["train_seconds"] for t in trained.values())
    text += f"\nTotal time: {seconds:.0f} s (training both arms: {training:.0f} s).\n"
    print("\n" + text)
    (args.out / "early_exit_results.md").write_text(text)
    record = {"size": asdict(size), "seed": args.seed, "threads": args.threads, "p_L": P_L, "rule": RULE,
              "exit_scale_type": SCALE_TYPE, "exit_scale": SCALE, "exit_curriculum": CURRICULUM, "data": data,
              "parameters": params, "torch": torch.__version__, "transformers": transformers.__version__,
              "seconds": round(seconds, 1), "arms": {arm: {**trained[arm], **result[arm]} for arm in ARMS}}
    (args.out / "early_exit_results.json").write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {args.out / 'early_exit_results.md'}, {args.out / 'early_exit_results.json'}")


if __name__ == "__main__":
    main()
