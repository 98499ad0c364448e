"""inject --early-exit (issue 30, item 1): LayerSkip's early-exit loss on a tiny Llama, checked against a reference
computed by hand from the plain model's hidden states; curricula, copies, saves, a Trainer; the exponential rule."""

from __future__ import annotations

import copy
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

import sdsurgeon  # noqa: E402
from sdsurgeon.analysis.schedule import RULES  # noqa: E402
from sdsurgeon.errors import EarlyExitError  # noqa: E402
from sdsurgeon.options import SurgeryOptions  # noqa: E402
from sdsurgeon.surgery import early_exit as ee  # noqa: E402

LAYERS = 4
VOCAB = 97
SQ3 = math.sqrt(3)
# f(l) of each scale type for the layers [0, 2, 3] (exits 0 and 2, the last layer 3), as torchtune's
# early_exit_loss scale functions define it, written out: one, l + 1, running sum of l + 1, 1/(l + 1), sqrt, 1/sqrt
BY_HAND = {"one": [1, 1, 1], "l": [1, 3, 4], "sum_l": [1, 1 + 3, 1 + 3 + 4], "inv_l": [1, 1 / 3, 1 / 4],
           "sqrt_l": [1, SQ3, 2], "inv_sqrt_l": [1, 1 / SQ3, 1 / 2]}


def llama(layers: int = LAYERS, seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32,
                                      intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2,
                                      num_key_value_heads=1)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(batch: int = 2, length: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


EXAMPLE = {"input_ids": tokens(2, 12, seed=0)}


@pytest.fixture(scope="module")
def models():
    """The plain model, and it injected at p_L = 1 (every gate on: the forward is deterministic) with and without
    early exits at layers 0 and 2."""
    plain = llama()
    gated = sdsurgeon.inject(plain, 1.0, example_inputs=EXAMPLE)
    exits = sdsurgeon.inject(plain, 1.0, example_inputs=EXAMPLE, early_exit=True, exit_layers=[0, 2])
    return plain, gated, exits


def by_hand(plain, x, labels, scales) -> torch.Tensor:
    """The LayerSkip loss from the plain model's hidden states: its norm and head (named here, in the test) on
    layers 0 and 2's outputs, cross-entropy with the labels shifted, weighted, plus the weighted task loss."""
    out = plain(input_ids=x, labels=labels, output_hidden_states=True)
    losses = []
    for layer in (0, 2):
        logits = plain.lm_head(plain.model.norm(out.hidden_states[layer + 1]))  # hidden_states[0]: the embeddings
        losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB).float(), labels[:, 1:].reshape(-1),
                                      ignore_index=-100))
    losses.append(out.loss)
    return sum(s * loss for s, loss in zip(scales, losses))


@pytest.mark.hf
def test_the_training_loss_is_the_hand_computed_layerskip_loss_for_every_scale_type(models):
    plain, _, model = models
    record = model.sdsurgeon_early_exit.record
    assert (record["layers"], record["n_layers"], record["norm"], record["head"]) == ([0, 2], 4, "model.norm",
                                                                                     "lm_head")
    x = tokens()
    labels = x.clone()
    labels[0, :3] = -100  # ignored positions count for no loss
    model.train()
    try:
        for scale_type, f in BY_HAND.items():
            for e in (1.0, 0.5):
                record.update(scale_type=scale_type, scale=e)
                raw = [f[0] * e, f[1] * e, f[2]]  # e_scale on the exits, not on the last layer
                want = by_hand(plain, x, labels, [r / sum(raw) for r in raw])
                got = model(input_ids=x, labels=labels).loss
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=f"{scale_type}, e_scale {e}")
                assert not torch.allclose(got, plain(input_ids=x, labels=labels).loss)
    finally:
        record.update(scale_type="sum_l", scale=1.0)
        model.eval()


@pytest.mark.hf
def test_the_loss_is_differentiable_through_the_exits(models):
    _, _, model = models
    model.train()
    try:
        model.zero_grad()
        model(input_ids=tokens(), labels=tokens()).loss.backward()
        # layer 3's weights get no gradient from the exits at 0 and 2, layer 0's from all three losses
        assert model.model.layers[0].mlp.down_proj.weight.grad.abs().sum() > 0
    finally:
        model.zero_grad()
        model.eval()


@pytest.mark.hf
def test_eval_is_the_plain_model_bit_for_bit_and_its_loss_the_task_loss(models):
    plain, gated, model = models
    x = tokens(3, 9, seed=5)
    with torch.no_grad():
        got = model(input_ids=x, labels=x)
        assert torch.equal(got.logits, gated(input_ids=x, labels=x).logits)
        assert torch.equal(got.loss, gated(input_ids=x, labels=x).loss)
        torch.testing.assert_close(got.loss, plain(input_ids=x, labels=x).loss)
    model.train()
    try:  # training without labels: nothing to add to
        assert model(input_ids=x).loss is None
    finally:
        model.eval()


def test_curricula_switch_the_exits_as_specified():
    exits = [0, 1, 2, 3, 4, 5, 6]  # of 8 layers
    # rotational, R = 3: l % 3 == t % 3
    assert [ee.active_exits(exits, 8, t, "rotational", rotation=3) for t in range(4)] == \
        [[0, 3, 6], [1, 4], [2, 5], [0, 3, 6]]
    # gradual over 16 steps: layer l on from step 16 (8 - l) / 8 = 2 (8 - l): 6 at 4, 5 at 6, ..., 0 at 16
    assert ee.active_exits(exits, 8, 0, "gradual", ramp=16) == []
    assert ee.active_exits(exits, 8, 4, "gradual", ramp=16) == [6]
    assert ee.active_exits(exits, 8, 7, "gradual", ramp=16) == [5, 6]
    assert ee.active_exits(exits, 8, 15, "gradual", ramp=16) == [1, 2, 3, 4, 5, 6]
    assert ee.active_exits(exits, 8, 16, "gradual", ramp=16) == exits
    assert ee.active_exits(exits, 8, 99, "none") == exits
    # no exit on: the loss is the task loss
    assert ee.loss_scales([7], 8) == [1.0]


@pytest.mark.hf
def test_the_schedule_steps_the_curriculum_and_the_loss_follows_it(models):
    plain, _, _ = models
    model = sdsurgeon.inject(plain, 1.0, example_inputs=EXAMPLE, early_exit=True, exit_curriculum="gradual",
                             exit_ramp=8)
    sched = sdsurgeon.schedules.schedule(model)
    state = model.sdsurgeon_early_exit
    seen = []
    for t in range(9):
        sched.seek(t)
        seen.append(state.active())
    # layers 0..2 of 4 switch on at steps 8 (4 - l) / 4 = 2 (4 - l): 2 at 4, 1 at 6, 0 at 8
    assert seen == [[], [], [], [], [2], [2], [1, 2], [1, 2], [0, 1, 2]]
    x = tokens()
    model.train()
    sched.seek(0)  # no exit on: the plain task loss
    torch.testing.assert_close(model(input_ids=x, labels=x).loss, plain(input_ids=x, labels=x).loss)
    sched.seek(4)  # the exit at layer 2 alone, sum_l: running sums 3 and 3 + 4 over 10
    out = plain(input_ids=x, labels=x, output_hidden_states=True)
    logits = plain.lm_head(plain.model.norm(out.hidden_states[3]))
    exit2 = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    torch.testing.assert_close(model(input_ids=x, labels=x).loss, 3 / 10 * exit2 + 7 / 10 * out.loss)
    rot = sdsurgeon.inject(plain, 1.0, example_inputs=EXAMPLE, early_exit=True, exit_curriculum="rotational",
                           exit_rotation=2)
    sched = sdsurgeon.schedules.schedule(rot)
    got = []
    for _ in range(3):
        got.append(rot.sdsurgeon_early_exit.active())
        sched.step()
    assert got == [[0, 2], [1], [0, 2]]


@pytest.mark.hf
def test_deepcopy_pickle_and_sd_pt_keep_the_early_exit(models, tmp_path):
    plain, _, model = models
    x = tokens()
    model.train()
    try:
        want = model(input_ids=x, labels=x).loss
        for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
            copied.train()
            assert copied.sdsurgeon_early_exit is not model.sdsurgeon_early_exit
            torch.testing.assert_close(copied(input_ids=x, labels=x).loss, want, rtol=0, atol=0)
    finally:
        model.eval()
    # an .sd.pt of a model loaded from a folder: weights, source and recipe; load re-applies the recipe
    plain.save_pretrained(tmp_path / "plain")
    loaded = sdsurgeon.inject(sdsurgeon.load(tmp_path / "plain"), 1.0, example_inputs=EXAMPLE, early_exit=True,
                              exit_layers=[0, 2])
    sdsurgeon.save(loaded, tmp_path / "m.sd.pt")
    back = sdsurgeon.load(tmp_path / "m.sd.pt").train()
    assert back.sdsurgeon_recipe.early_exit == model.sdsurgeon_recipe.early_exit
    torch.testing.assert_close(back(input_ids=x, labels=x).loss, want)


@pytest.mark.hf
def test_save_pretrained_is_a_plain_folder_and_sdsurgeon_load_restores_the_early_exit(models, tmp_path):
    import transformers

    plain, _, model = models
    model.save_pretrained(tmp_path / "f")
    x = tokens()
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "f").train()
    assert not hasattr(loaded, ee.EARLY_EXIT_ATTR) and not loaded._forward_hooks
    with torch.no_grad():  # the plain model: its train loss with labels is the task loss alone
        torch.testing.assert_close(loaded(input_ids=x, labels=x).loss, plain.train()(input_ids=x, labels=x).loss)
    plain.eval()
    back = sdsurgeon.load(tmp_path / "f").train()
    assert back.sdsurgeon_recipe.early_exit == model.sdsurgeon_recipe.early_exit
    model.train()
    try:
        torch.testing.assert_close(back(input_ids=x, labels=x).loss, model(input_ids=x, labels=x).loss)
    finally:
        model.eval()


@pytest.mark.hf
def test_a_trainer_trains_it_with_the_exit_terms_in_its_loss(models, tmp_path, monkeypatch):
    import transformers
    from sdsurgeon.callbacks import schedule_callback

    plain, _, _ = models
    model = sdsurgeon.inject(plain, 0.9, seed=0, example_inputs=EXAMPLE, early_exit=True,
                             exit_curriculum="rotational", exit_rotation=2)
    returned, steps = [], []
    combine = ee.combined_loss

    def spy(task, exits, *args):
        loss = combine(task, exits, *args)
        returned.append((task.item(), sorted(exits), loss.item()))
        return loss

    monkeypatch.setattr(ee, "combined_loss", spy)
    x = tokens(8, 12, seed=9)

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(x)

        def __getitem__(self, k):
            return {"input_ids": x[k], "labels": x[k]}

    class Steps(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            steps.append(model.sdsurgeon_early_exit.step)

    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to=[],
                                          use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Examples(),
                                   callbacks=[schedule_callback(), Steps()])
    trainer.train()
    logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert steps == [0, 1, 2] and [r[1] for r in returned] == [[0, 2], [1], [0, 2]]
    assert logged == pytest.approx([r[2] for r in returned], rel=1e-4)
    assert all(total != task for task, _, total in returned)  # the exits moved the loss


def test_the_exponential_rule_is_layerskips_rate():
    L, p_L = 6, 0.4
    p_max = 1 - p_L
    want = [1 - p_max * (math.e ** (l * math.log(2) / (L - 1)) - 1) for l in range(L)]
    assert RULES["exponential"](L, p_L) == pytest.approx(want, abs=1e-12)
    assert want[0] == 1 and want[-1] == pytest.approx(p_L)
    assert RULES["exponential"](1, p_L) == [p_L]
    assert SurgeryOptions(rule="exponential").rule == "exponential"


@pytest.mark.hf
def test_a_model_without_an_lm_head_or_a_bad_exit_layer_is_refused_in_one_line(models):
    transformers = pytest.importorskip("transformers")
    plain, _, _ = models
    # a Python caller's message names his keyword (exit_layers=), not the command line's --exit-layer
    with pytest.raises(EarlyExitError, match="^exit_layers=3: LlamaForCausalLM has 4 layers") as info:
        sdsurgeon.inject(plain, 1.0, example_inputs=EXAMPLE, early_exit=True, exit_layers=[3])
    assert "--exit-layer" not in str(info.value)
    torch.manual_seed(0)
    bert = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    with pytest.raises(EarlyExitError, match="no LM head") as info:
        sdsurgeon.inject(bert, 1.0, example_inputs=EXAMPLE, early_exit=True)
    assert "\n" not in str(info.value)
    with pytest.raises(sdsurgeon.errors.ConfigError, match="--exit-curriculum.*give --early-exit"):
        SurgeryOptions(exit_curriculum="rotational")


def test_the_cli_takes_early_exit_and_refuses_its_settings_without_it(tmp_path):
    from cli_helpers import assert_user_error, invoke

    line = assert_user_error(invoke("inject", tmp_path / "none.pt", "--exit-scale", "2"))
    assert "--early-exit" in line


@pytest.mark.hf
def test_the_folded_model_is_for_inference_and_adds_no_exit_loss(models):
    """fold takes the early exit off with the gates: trained with labels, its loss is the task loss alone."""
    plain, _, model = models
    folded = sdsurgeon.fold(model).train()
    x = tokens(2, 8, seed=7)
    assert not hasattr(folded, "sdsurgeon_early_exit")
    torch.testing.assert_close(folded(input_ids=x, labels=x).loss, plain.train()(input_ids=x, labels=x).loss)
    plain.eval()
    model.train()
    try:  # the injected model keeps its own
        assert not torch.allclose(model(input_ids=x, labels=x).loss, folded(input_ids=x, labels=x).loss)
    finally:
        model.eval()
