"""Pruned LLMs shipped as plain transformers folders (issue 27 item 3): `export --drop-layers N --format hf`.

The reference is independent of sdsurgeon's pruning: the unpruned model exported with `--format hf`, loaded by
transformers alone, with the same layers deleted by hand here (``del model.model.layers[i]``, the config and the
``layer_idx`` of each attention fixed by hand). The layer list rule and the angular distance are checked on
hand-made models whose answer is known.
"""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch
import transformers
from torch import nn

import sdsurgeon
from cli_helpers import assert_ok, assert_user_error, invoke, one_json
from sdsurgeon.analysis.layers import find_layers, layer_angular_distance
from sdsurgeon.deploy.plain import delete_layers
from sdsurgeon.errors import LayerError

VOCAB = 97
TOKENS = ["--input", "input_ids:2,12:int64"]
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64)
MODELS = {
    # two full-attention layers, then two sliding-window ones: config.layer_types says which, per layer
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
              dict(TEXT, use_sliding_window=True, sliding_window=8, max_window_layers=2)),
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig, TEXT),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Per model: a random tiny checkpoint injected (p_L 0.5, paper scaling: each layer's branches scaled by its
    p_l) and its unpruned plain export, the reference's starting point; plus calibration inputs in a file."""
    root = tmp_path_factory.mktemp("hf_prune")
    torch.save({"input_ids": torch.randint(0, VOCAB, (4, 10), generator=torch.Generator().manual_seed(5))},
               root / "calibration.pt")
    out = {}
    for name, (cls, config_cls, config) in MODELS.items():
        torch.manual_seed(0)
        cls(config_cls(**config)).save_pretrained(root / name)
        assert_ok(invoke("inject", root / name, *TOKENS, "--pL", "0.5", "--scaling", "paper",
                         "-o", root / f"{name}.sd.pt"))
        assert_ok(invoke("export", root / f"{name}.sd.pt", "--format", "hf", "-o", root / f"{name}-plain"))
        out[name] = root
    return out


def reference(root, name: str, removed: list[int]) -> nn.Module:
    """The unpruned plain export, loaded by transformers alone, with layers ``removed`` deleted by hand."""
    model = transformers.AutoModelForCausalLM.from_pretrained(root / f"{name}-plain").eval()
    for i in sorted(removed, reverse=True):
        del model.model.layers[i]
    config = model.config
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = [t for i, t in enumerate(config.layer_types) if i not in removed]
    config.num_hidden_layers = len(model.model.layers)
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
    return model


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def angular_by_hand(model: nn.Module, ids: torch.Tensor) -> list[float]:
    """Gromov et al.'s distance per layer of a plain transformers model, from its layers' inputs and outputs."""
    seen = {}

    def keep(i):
        def hook(layer, args, kwargs, output):
            seen[i] = (args[0] if args else kwargs["hidden_states"], output)
        return hook

    hooks = [layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(model.model.layers)]
    logits(model, ids)
    for h in hooks:
        h.remove()
    out = []
    for i in range(len(model.model.layers)):
        x, y = seen[i]
        y = y[0] if isinstance(y, tuple) else y
        cos = torch.nn.functional.cosine_similarity(x.double(), y.double(), dim=-1).clamp(-1, 1)
        out.append(float(torch.arccos(cos).mean() / math.pi))
    return out


# --- whole layers to a plain folder: against the reference ---------------------------------------------------------


@pytest.mark.hf
@pytest.mark.parametrize("name,drop,by", [("qwen2", "1", "schedule"), ("qwen2", "1", "influence"),
                                          ("qwen2", "1", "angular"), ("llama", "50%", "schedule")],
                         ids=["qwen2-schedule", "qwen2-influence", "qwen2-angular", "llama-half-schedule"])
def test_drop_layers_writes_a_folder_transformers_loads_as_the_reference_with_those_layers_deleted(
        saved, tmp_path, name, drop, by):
    root = saved[name]
    record = one_json(invoke("export", root / f"{name}.sd.pt", "--drop-layers", drop, "--drop-by", by,
                             "--calibration", root / "calibration.pt", "--format", "hf", "-o", tmp_path / "pruned",
                             "--json"))
    layers = record["layers"]
    removed = layers["removed"]
    assert layers["list"] == "model.layers" and layers["total"] == 4 and layers["by"] == by
    assert len(removed) == (2 if drop == "50%" else 1) and layers["kept"] == 4 - len(removed)
    assert record["verify"]["ok"] and record["format"] == "hf"
    assert sorted(record["dropped"]) == sorted(f"model.layers.{i}:{a}" for i in removed for a in ("add", "add_1"))
    plain_ids = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7))
    unpruned = transformers.AutoModelForCausalLM.from_pretrained(root / f"{name}-plain").eval()
    if by == "schedule":  # linear decay: the deepest layers have the lowest p_l
        assert removed == list(range(4 - len(removed), 4))
    elif by == "angular":  # the lowest distance on the calibration inputs, measured here by hand
        by_hand = angular_by_hand(unpruned, torch.load(root / "calibration.pt")["input_ids"])
        assert removed == [min(range(4), key=lambda i: (by_hand[i], -i))]
        assert layers["scores"] == pytest.approx(by_hand, abs=1e-5)
    else:  # a layer's score is the sum of its blocks' influence
        sites = record["influence"]["sites"]
        assert layers["scores"] == pytest.approx([sites[f"model.layers.{i}:add"] + sites[f"model.layers.{i}:add_1"]
                                                  for i in range(4)], abs=1e-5)
        assert removed == [min(range(4), key=lambda i: (layers["scores"][i], -i))]

    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()  # transformers alone
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    kept = 4 - len(removed)
    assert config["num_hidden_layers"] == kept == len(pruned.model.layers)
    if name == "qwen2":
        original = ["full_attention", "full_attention", "sliding_attention", "sliding_attention"]
        assert config["layer_types"] == [t for i, t in enumerate(original) if i not in removed]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == list(range(kept))
    expected = reference(root, name, removed)
    torch.testing.assert_close(logits(pruned, plain_ids), logits(expected, plain_ids), rtol=1e-5, atol=1e-5)
    # the pruned model moved away from the unpruned one (a test of deletion that deletes nothing would pass above)
    assert not torch.allclose(logits(pruned, plain_ids), logits(unpruned, plain_ids), atol=1e-3)
    generated = pruned.generate(plain_ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    by_hand = expected.generate(plain_ids[:1], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 13) and torch.equal(generated, by_hand)


@pytest.mark.hf
def test_part_of_a_layer_is_refused_in_one_line_naming_its_sites_and_nothing_is_written(saved, tmp_path):
    root = saved["qwen2"]
    line = assert_user_error(invoke("export", root / "qwen2.sd.pt", "--drop-sites", r"layers\.2:add_1$",
                                    "--format", "hf", "-o", tmp_path / "pruned"))
    assert "model.layers.2:add_1" in line and "part of layer 2" in line and "--drop-layers" in line
    assert not (tmp_path / "pruned").exists()
    # sites that make up whole layers are whole layers, however they were chosen
    record = one_json(invoke("export", root / "qwen2.sd.pt", "--drop-sites", r"layers\.1:", "--format", "hf",
                             "-o", tmp_path / "sites", "--json"))
    assert record["layers"]["removed"] == [1] and record["layers"]["by"] == "sites"
    assert json.loads((tmp_path / "sites" / "config.json").read_text())["num_hidden_layers"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sites"]


@pytest.mark.hf
def test_conflicting_choices_and_out_of_range_counts_are_one_line_errors(saved, tmp_path):
    root = saved["llama"]
    line = assert_user_error(invoke("export", root / "llama.sd.pt", "--drop", "2", "--drop-layers", "1",
                                    "-o", tmp_path / "m.onnx"))
    assert "--drop-layers" in line and "--drop" in line
    line = assert_user_error(invoke("export", root / "llama.sd.pt", "--drop-layers", "5", "-o", tmp_path / "m.onnx"))
    assert "to 4 (the model's layers)" in line
    line = assert_user_error(invoke("export", root / "llama.sd.pt", "--drop", "1", "--drop-by", "angular",
                                    "-o", tmp_path / "m.onnx"))
    assert "angular ranks whole layers" in line
    line = assert_user_error(invoke("export", root / "llama.sd.pt", "--drop-layers", "1", "--format", "safetensors",
                                    "-o", tmp_path / "m.safetensors"))
    assert "use --format onnx" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.hf
def test_post_norm_layers_are_not_the_identity_without_their_blocks_and_are_refused(tmp_path):
    # BERT normalises after each residual add: with both blocks removed a layer still applies its LayerNorms, so
    # deleting it is not the pruned model, and no folder claims to be. With transformers' initial LayerNorms
    # deleted is the pruned model (a LayerNorm of 1s and 0s leaves a normalised input as it is); affine ones do not
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3,
                                                          num_attention_heads=2, intermediate_size=64))
    with torch.no_grad():
        for m in bert.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    bert.save_pretrained(tmp_path / "bert")
    assert_ok(invoke("inject", tmp_path / "bert", *TOKENS, "-o", tmp_path / "bert.sd.pt"))
    line = assert_user_error(invoke("export", tmp_path / "bert.sd.pt", "--drop-layers", "1", "--format", "hf",
                                    "-o", tmp_path / "pruned"))
    assert "does not give the pruned model" in line and "use --format onnx" in line
    assert not (tmp_path / "pruned").exists()


# --- the layer list rule, delete_layers and the angular distance on hand-made models --------------------------------


class Residual(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(x)


class Stack(nn.Module):
    """``lists`` ModuleLists of residual blocks, of the lengths given, run one after the other."""

    def __init__(self, *lengths: int, config=None) -> None:
        super().__init__()
        self.lists = nn.ModuleList(nn.ModuleList(Residual() for _ in range(n)) for n in lengths)
        if config is not None:
            self.config = config

    def forward(self, x):
        for blocks in self.lists:
            for block in blocks:
                x = block(x)
        return x


def injected(model: nn.Module) -> nn.Module:
    return sdsurgeon.inject(model, 0.5, example_inputs=torch.randn(2, 8))


def test_the_layer_list_is_the_longest_module_list_whose_every_element_holds_gated_sites():
    layers = find_layers(injected(Stack(2, 3)))
    assert layers.path == "lists.1" and layers.count == 3
    assert all(len(held) == 1 for held in layers.sites)
    assert layers.layer_of()[layers.sites[2][0]] == 2
    assert layers.covering([layers.sites[0][0], layers.sites[2][0]]) == ([0, 2], [])


def test_num_hidden_layers_in_the_config_picks_the_list_of_that_length():
    layers = find_layers(injected(Stack(2, 3, config=types.SimpleNamespace(num_hidden_layers=2))))
    assert layers.path == "lists.0"


def test_two_lists_of_the_longest_length_are_refused_naming_both():
    with pytest.raises(LayerError, match=r"2 layer lists of 3 layers \(lists\.0, lists\.1\)"):
        find_layers(injected(Stack(3, 3)))


def test_a_model_without_a_layer_list_says_so_for_drop_layers():
    model = injected(nn.Sequential(Residual(), Residual()))
    with pytest.raises(LayerError, match="has no layer list") as info:
        sdsurgeon.prune(model, layers=1, calibration=torch.randn(2, 8))
    assert info.value.option == "layers"  # prune's keyword: sdsurgeon.prune speaks Python


class Turn(nn.Module):
    """A layer that maps x to -x (angular distance 1) or leaves it (0), with a layer_idx like transformers'."""

    def __init__(self, flip: bool, layer_idx: int) -> None:
        super().__init__()
        self.flip, self.layer_idx = flip, layer_idx
        self.inner = nn.Module()
        self.inner.layer_idx = layer_idx

    def forward(self, x):
        return -x if self.flip else x


def test_angular_distance_is_arccos_of_the_cosine_over_pi_per_token():
    model = nn.Module()
    model.layers = nn.ModuleList([Turn(True, 0), Turn(False, 1)])
    model.forward = lambda x: model.layers[1](model.layers[0](x))
    from sdsurgeon.analysis.layers import LayerList

    distance = layer_angular_distance(model, LayerList("layers", (("a",), ("b",))), torch.randn(2, 5, 8))
    assert distance == pytest.approx([1.0, 0.0], abs=1e-6)


def test_delete_layers_rewrites_the_count_the_per_layer_lists_and_layer_idx_and_leaves_token_ids():
    model = nn.Module()
    model.layers = nn.ModuleList([Turn(False, i) for i in range(3)])
    model.config = types.SimpleNamespace(num_hidden_layers=3, layer_types=["a", "b", "c"], window=(4, 8, 16),
                                         eos_token_id=[1, 2, 3], hidden_size=8)
    kept = [model.layers[0], model.layers[2]]
    assert delete_layers(model, "layers", [1]) is model  # in place
    assert list(model.layers) == kept
    c = model.config
    assert (c.num_hidden_layers, c.layer_types, c.window, c.eos_token_id) == (2, ["a", "c"], (4, 16), [1, 2, 3])
    assert [(m.layer_idx, m.inner.layer_idx) for m in model.layers] == [(0, 0), (1, 1)]
    with pytest.raises(LayerError, match="keeps at least one layer"):
        delete_layers(copy.deepcopy(model), "layers", [0, 1])
