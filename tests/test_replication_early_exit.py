"""examples/replication/early_exit.py --quick: both arms trained with Trainer, exported --format hf, measured."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = [pytest.mark.hf, pytest.mark.multiprocess, pytest.mark.slow]

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "replication" / "early_exit.py"
ARMS = ("plain injection", "early exit")


@pytest.fixture(scope="module")
def ee_quick_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("early_exit")
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| plain injection |" in done.stdout and "| early exit |" in done.stdout  # the tables are printed too
    return out


def test_agreement_per_exit_and_the_ceiling_agrees_by_construction(ee_quick_run):
    record = json.loads((ee_quick_run / "early_exit_results.json").read_text())
    size = record["size"]
    assert (size["layers"], size["exit"]) == (4, 1)
    for arm in ARMS:
        r = record["arms"][arm]
        assert len(r["agreement"]) == size["layers"] and all(0 <= a <= 1 for a in r["agreement"])
        assert r["agreement"][-1] == 1.0  # the last layer's exit is the full model
        # every layer after the exit adds exactly 0: the full model's argmax is the exit's at every position
        assert r["ceiling_agreement_at_exit"] == 1.0
        assert r["positions"] == size["eval_chunks"] * size["seq"]
        assert r["loss_log"] and r["train_seconds"] > 0
    text = (ee_quick_run / "early_exit_results.md").read_text()
    assert "| 1 (chosen) |" in text and "Disagreement at exit 1" in text


def test_assisted_tokens_are_plain_generates_and_the_timings_add_up(ee_quick_run):
    record = json.loads((ee_quick_run / "early_exit_results.json").read_text())
    size = record["size"]
    tokens = size["prompts"] * size["new_tokens"]
    for arm in ARMS:
        g = record["arms"][arm]["generation"]
        assert g["identical"] is True and g["ceiling_identical"] is True and g["repeatable"] is True
        for variant, seconds in g["seconds"].items():  # tokens/s recomputed from the raw per-round times
            assert len(seconds) == size["rounds"] and all(t > 0 for t in seconds)
            assert g["tokens_per_second"][variant] == pytest.approx(tokens / statistics.median(seconds), rel=1e-3)
        paired = statistics.median(p / a for p, a in zip(g["seconds"]["plain"], g["seconds"]["assisted"]))
        assert g["speedup"] == pytest.approx(paired, rel=1e-3)  # per-round seconds are rounded to 6 places
        assert g["speedup_over_ceiling"] == pytest.approx(g["speedup"] / g["ceiling"], abs=1e-3)


def test_the_ceiling_without_the_confidence_stop_drafts_full_length(ee_quick_run):
    """Every draft of the ceiling model is accepted: with drafts of up to 20 tokens (transformers' default) each
    verification yields the draft plus one token, so n new tokens take ceil(n / 21) full-depth calls (the first
    one the prompt's prefill as well) and n - ceil(n / 21) draft calls per prompt."""
    record = json.loads((ee_quick_run / "early_exit_results.json").read_text())
    size = record["size"]
    rounds = math.ceil(size["new_tokens"] / 21)
    for arm in ARMS:
        profile = record["arms"][arm]["profile"]
        p = profile["ceiling assisted, no confidence stop"]
        assert p["full_calls"] == size["prompts"] * rounds
        assert p["draft_calls"] == size["prompts"] * (size["new_tokens"] - rounds)
        plain = profile["plain"]
        assert plain["full_calls"] == size["prompts"] * size["new_tokens"] and plain["draft_calls"] == 0
        for v in profile.values():
            assert 0 <= v["outside_decoder_share"] < 1 and v["layers_ms_per_token"] <= v["decoder_ms_per_token"]


def test_the_first_e_layers_model_is_the_exit_and_decodes_with_a_cache():
    """The overhead comparison's model: its logits are the full model's exit after layer E - 1 (the model's own
    norm and head on that layer's hidden state), and it keeps the model's generation settings: a Trainer-saved
    config says use_cache false, which made a generation config built from it decode without a cache."""
    import importlib.util

    import torch
    import transformers

    spec = importlib.util.spec_from_file_location("early_exit_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up there
    spec.loader.exec_module(script)
    torch.manual_seed(0)
    config = script.config(script.QUICK)
    config.use_cache = False  # as the Trainer leaves it
    model = transformers.LlamaForCausalLM(config).eval()
    model.generation_config.use_cache = True
    short = script.truncated_of(model, 2)
    assert len(short.model.layers) == 2 and short.generation_config.use_cache is True
    x = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model(x, output_hidden_states=True).hidden_states[2]  # [0] is the embedding output
        torch.testing.assert_close(short(x).logits, model.lm_head(model.model.norm(hidden)))
