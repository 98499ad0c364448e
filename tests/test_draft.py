"""sdsurgeon draft (issue 30, item 2): each layer's exit against the full model on calibration tokens, checked against
a reference computed here from output_hidden_states; the speed-up formula against hand values; the command; and
generate(assistant_early_exit=N) on an exported folder giving plain generate's greedy tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from sdsurgeon.analysis.draft import exit_agreement, speculative_speedup  # noqa: E402
from sdsurgeon.errors import ConfigError, EarlyExitError  # noqa: E402

from test_early_exit import LAYERS, VOCAB  # noqa: E402  (the same tiny Llama: 4 layers, hidden 32, vocab 97)
from test_early_exit import llama as early_exit_llama  # noqa: E402


def llama(layers: int = LAYERS, seed: int = 0):
    model = early_exit_llama(layers, seed)
    with torch.no_grad():  # a final norm of unit weight only scales each position: argmax would not see it missing
        model.model.norm.weight.copy_(torch.randn(32))
    return model


def calibration(batch: int = 3, length: int = 16, seed: int = 1) -> dict:
    ids = torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, -5:] = 0  # right padding: these positions must not count
    return {"input_ids": ids, "attention_mask": mask}


def reference(model, data) -> list[float]:
    """Per layer, by hand: argmax lm_head(norm(hidden_states[l + 1])) against argmax logits where the mask is 1 (the
    last entry of hidden_states is after the final norm in Llama, so the last layer is the logits themselves)."""
    with torch.no_grad():
        out = model(**data, output_hidden_states=True)
        full = out.logits.argmax(-1)
        keep = data["attention_mask"].bool()
        shares = []
        for l in range(LAYERS - 1):
            mine = model.lm_head(model.model.norm(out.hidden_states[l + 1])).argmax(-1)
            shares.append((mine == full)[keep].double().mean().item())
        return shares + [1.0]


@pytest.mark.hf
def test_agreement_per_layer_is_the_hand_computed_one_and_the_last_layer_agrees():
    model, data = llama(), calibration()
    report = exit_agreement(model, data)
    want = reference(model, data)
    assert [e.agreement for e in report.exits] == pytest.approx(want, abs=1e-12)
    assert report.exits[-1].agreement == 1.0 and min(want[:-1]) < 1.0  # random weights: the early exits disagree
    assert report.positions == int(data["attention_mask"].sum()) == 3 * 16 - 5
    assert (report.layer_list, report.head, report.norm, report.n_layers) == ("model.layers", "lm_head", "model.norm",
                                                                             LAYERS)
    assert [e.assistant_early_exit for e in report.exits] == [1, 2, 3, 4]
    for e in report.exits:
        assert e.cost == (e.layer + 1) / LAYERS
        assert e.speedup == pytest.approx(speculative_speedup(e.agreement, 20, e.cost))
    # the mask counts: the same tokens all counted give the reference without a mask
    unmasked = dict(data, attention_mask=torch.ones_like(data["attention_mask"]))
    assert [e.agreement for e in exit_agreement(model, unmasked).exits] == pytest.approx(reference(model, unmasked))


@pytest.mark.hf
def test_layers_made_identities_after_layer_k_agree_fully_at_exit_k():
    model, k = llama(), 1
    with torch.no_grad():
        for layer in model.model.layers[k + 1:]:  # issue 30's ceiling: o_proj and down_proj zeroed
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    shares = [e.agreement for e in exit_agreement(model, calibration()).exits]
    assert shares[k:] == [1.0] * (LAYERS - k)
    assert shares[0] < 1.0


def test_the_speedup_is_leviathans_formula_by_hand():
    # (1 - a^(g+1)) / ((1 - a)(g c + 1)), written out for each case
    assert speculative_speedup(0.8, 3, 0.25) == pytest.approx((1 - 0.4096) / (0.2 * 1.75))  # 1.6869
    assert speculative_speedup(0.5, 2, 0.5) == pytest.approx((1 - 0.125) / (0.5 * 2.0))  # 0.875
    assert speculative_speedup(1.0, 20, 0.25) == pytest.approx(21 / 6)  # every draft accepted: (g+1)/(g c+1)
    assert speculative_speedup(0.0, 20, 0.5) == pytest.approx(1 / 11)  # none accepted: one token per round
    assert speculative_speedup(0.9, 5, 0.0) == pytest.approx((1 - 0.9 ** 6) / 0.1)  # a free draft: tokens per round
    with pytest.raises(ValueError):
        speculative_speedup(1.5, 3, 0.25)


@pytest.mark.hf
def test_non_token_inputs_and_a_model_without_lm_head_are_refused():
    transformers = pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="needs token ids"):
        exit_agreement(llama(2), torch.randn(2, 8))
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(EarlyExitError, match="no LM head"):
        exit_agreement(bert.eval(), {"input_ids": calibration()["input_ids"]})


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    model = llama()
    model.save_pretrained(root / "llama")
    data = calibration()
    torch.save(data, root / "tokens.pt")
    return root, model, data


@pytest.mark.hf
def test_the_cli_prints_a_table_and_json_on_a_folder(folder):
    from cli_helpers import assert_ok, invoke, one_json

    root, model, data = folder
    record = one_json(invoke("draft", root / "llama", "--calibration", root / "tokens.pt", "--json"))
    assert [e["agreement"] for e in record["exits"]] == pytest.approx(reference(model, data))
    assert record["positions"] == 43 and record["draft_tokens"] == 20 and record["calibration"].endswith("tokens.pt")
    result = invoke("draft", root / "llama", "--calibration", root / "tokens.pt", "--draft-tokens", "5")
    assert_ok(result)
    assert "assistant_early_exit" in result.stdout and "Leviathan" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.strip("│ ").startswith("3 "))
    assert "100.0%" in row and "1.00x" in row


@pytest.mark.hf
def test_the_cli_refuses_in_one_line(folder, tmp_path):
    import transformers
    from cli_helpers import assert_user_error, invoke

    root, _, _ = folder
    torch.save(torch.randn(2, 8), tmp_path / "floats.pt")
    assert "needs token ids" in assert_user_error(invoke("draft", root / "llama", "--calibration",
                                                         tmp_path / "floats.pt"))
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64)).save_pretrained(tmp_path / "bert")
    assert "no LM head" in assert_user_error(invoke("draft", tmp_path / "bert", "--calibration", root / "tokens.pt"))
    assert "--draft-tokens" in assert_user_error(invoke("draft", root / "llama", "--draft-tokens", "0"))


@pytest.mark.hf
def test_an_exported_early_exit_model_drafts_the_plain_greedy_tokens(folder, tmp_path):
    import transformers
    from cli_helpers import assert_ok, invoke, one_json

    root, _, _ = folder
    assert_ok(invoke("inject", root / "llama", "--pL", "0.8", "--early-exit", "-o", tmp_path / "llm.sd.pt"))
    draft = one_json(invoke("draft", tmp_path / "llm.sd.pt", "--calibration", root / "tokens.pt", "--json"))
    assert draft["exits"][-1]["agreement"] == 1.0  # the injected model, measured in eval
    assert_ok(invoke("export", tmp_path / "llm.sd.pt", "--format", "hf", "-o", tmp_path / "out"))
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    plain = model.generate(prompt, **settings)
    for n in (1, 2):
        drafted = model.generate(prompt, assistant_early_exit=n, **settings)
        assert torch.equal(drafted, plain), (n, drafted, plain)
    assert plain.shape[1] == prompt.shape[1] + 8
