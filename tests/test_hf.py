"""Hugging Face models through the torch.export front-end (issue 5), each from a save_pretrained folder.

Every model of the HF zoo (tests/hf_zoo.py: small configs, random weights) is saved once into a temporary
folder and read back with ``sdsurgeon.load``. The references are independent of sdsurgeon: the original
transformers model loaded from the same folder, with each residual branch's last affine layer scaled by p_l
by hand, run by PyTorch, and the exported file run by onnxruntime directly.
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import sys
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
import transformers

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:  # `--arch archs:...` needs it
    sys.path.insert(0, str(TESTS_DIR))

import archs  # noqa: E402
import sdsurgeon  # noqa: E402
from cli_helpers import assert_ok, assert_user_error, invoke, one_json  # noqa: E402
from hf_zoo import CASES, HF_ZOO, LAYERS, HFCase, build, save  # noqa: E402
from sdsurgeon.capture.inputs import InputSpec  # noqa: E402
from sdsurgeon.deploy.export import RANDOM_OPS
from sdsurgeon.deploy.verify import export_verified  # noqa: E402
from sdsurgeon.capture.hf_inputs import complete_specs  # noqa: E402

SEED = 0
P_L = 0.5
TOL = {"rtol": 1e-4, "atol": 1e-5}
DROP_PATH_CASES = [c for c in HF_ZOO if c.drop_path]
# ViT of the zoo has no dropout (transformers' default rate is 0): a copy of it with some, for the train/eval tests.
VIT_DROPOUT = replace(CASES["vit"], name="vit_dropout",
                      config=dict(CASES["vit"].config, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
DROPOUT_CASES = [CASES["bert"], CASES["gpt2"], VIT_DROPOUT]


@dataclass(frozen=True)
class Layout:
    """Where each architecture's residual blocks are, read off transformers' own module names.

    ``layer``: the class of one residual layer; ``sites``: the module path (relative to a layer) of each
    residual add it holds, in execution order ("" = the layer itself); ``ends``: what ends each of those
    residual branches: an affine module (scaling its weight and bias by p scales the branch by p in eval) or a
    parameter the branch output is linear in (a mixture of experts' fused down projections), or a tuple of
    those where the branch is several paths added (a parallel residual layer: each path's end takes p).
    An architecture with layers of several classes (an encoder-decoder) has one Layout per class.
    """

    layer: str
    sites: tuple[str, ...]
    ends: tuple[str | tuple[str, ...], ...]


LAYOUTS = {
    # post-norm: LayerNorm(dropout(dense(h)) + input) lives in BertSelfOutput / BertOutput
    "bert": Layout("BertLayer", ("attention.output", "output"), ("attention.output.dense", "output.dense")),
    "gpt2": Layout("GPT2Block", ("", ""), ("attn.c_proj", "mlp.c_proj")),
    "llama": Layout("LlamaDecoderLayer", ("", ""), ("self_attn.o_proj", "mlp.down_proj")),
    # the router's weights are not scaled: each token's output is sum_k w_k * expert_k(x), linear in every
    # expert's down projection (transformers 5 fuses them into one 3-D parameter)
    "mixtral": Layout("MixtralDecoderLayer", ("", ""), ("self_attn.o_proj", "mlp.experts.down_proj")),
    # x + attn(ln1(x)) + mlp(ln2(x)): one block, both paths end it
    "gpt_neox": Layout("GPTNeoXLayer", ("",), (("attention.dense", "mlp.dense_4h_to_h"),)),
    "bart": (Layout("BartEncoderLayer", ("", ""), ("self_attn.out_proj", "fc2")),
             Layout("BartDecoderLayer", ("", "", ""), ("self_attn.out_proj", "encoder_attn.out_proj", "fc2"))),
    # each residual sublayer is a module of its own: encoder blocks hold self-attention and feed-forward, decoder
    # blocks cross-attention between them
    "t5": (Layout("T5LayerSelfAttention", ("",), ("SelfAttention.o",)),
           Layout("T5LayerCrossAttention", ("",), ("EncDecAttention.o",)),
           Layout("T5LayerFF", ("",), ("DenseReluDense.wo",))),
    "vit": Layout("ViTLayer", ("", ""), ("attention.o_proj", "mlp.fc2")),
    "resnet": Layout("ResNetBasicLayer", ("",), ("layer.1.normalization",)),  # conv-BN, no activation, then + x
    "convnext": Layout("ConvNextLayer", ("",), ("pwconv2",)),  # then layer scale, drop path, + x
    "swin": Layout("SwinLayer", ("", ""), ("attention.o_proj", "mlp.fc2")),
}
LAYOUTS["vit_dropout"] = LAYOUTS["vit"]
LAYOUTS["bert_mlm"] = LAYOUTS["bert"]


def layouts(case: HFCase) -> dict[str, Layout]:
    """The case's layouts by layer class."""
    found = LAYOUTS[case.name]
    return {layout.layer: layout for layout in (found if isinstance(found, tuple) else (found,))}


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    yield
    transformers.logging.set_verbosity(level)
    transformers.utils.logging.enable_progress_bar()


# --- independent helpers: inputs, losses, the original model, scaling by hand, onnxruntime -----------------------


def make_inputs(case: HFCase, batch: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Keyword inputs from the case's ``NAME:SHAPE[:DTYPE]`` specs: token ids below the vocabulary, else N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for text in case.inputs:
        name, shape, *dtype = text.split(":")
        shape = [int(s) for s in shape.split(",")]
        if batch is not None:
            shape[0] = batch
        if dtype:
            inputs[name] = torch.randint(0, case.config["vocab_size"], shape, generator=g)
        else:
            inputs[name] = torch.randn(shape, generator=g)
    return inputs


def loss_of(case: HFCase, model, x: dict) -> torch.Tensor:
    """The toy task: images, whether channel 0 is bright on average; tokens, a function of the first token."""
    logits = model(**x).logits
    if case.task == "image":
        return F.cross_entropy(logits, (x["pixel_values"][:, 0].mean((1, 2)) > 0).long())
    ids = x["input_ids"]
    if logits.dim() == 2:  # sequence classification
        return F.cross_entropy(logits, ids[:, 0] % logits.shape[-1])
    # language model: every position (of the decoder's, for an encoder-decoder) predicts the first token
    return F.cross_entropy(logits.flatten(0, 1), ids[:, :1].expand(logits.shape[:2]).flatten())


def linear_ps(n: int, p_L: float) -> list[float]:
    """The paper's linear decay, written out: p_l = 1 - l / L (1 - p_L), l = 1..L."""
    return [1 - l / n * (1 - p_L) for l in range(1, n + 1)]


def layers(model: torch.nn.Module, case: HFCase) -> list[tuple[str, Layout]]:
    """(module path, layout) of the residual layers, in the order the model runs them (an encoder-decoder's
    encoder first)."""
    found = layouts(case)
    return [(name, found[type(m).__name__]) for name, m in model.named_modules() if type(m).__name__ in found]


def layer_paths(model: torch.nn.Module, case: HFCase) -> list[str]:
    """Module paths of the residual layers, in the order the model runs them."""
    return [name for name, _ in layers(model, case)]


def drop_path_modules(model: torch.nn.Module) -> list[tuple[str, str, float]]:
    """transformers' own drop-path modules: (path, class, drop_prob)."""
    return [(name, type(m).__name__, float(m.drop_prob)) for name, m in model.named_modules()
            if type(m).__name__.endswith("DropPath")]


def no_drop_paths(model: torch.nn.Module) -> torch.nn.Module:
    for name, _, _ in drop_path_modules(model):
        model.get_submodule(name).drop_prob = 0.0
    return model


def scale_by_hand(model: torch.nn.Module, case: HFCase, ps: list[float]) -> torch.nn.Module:
    """Multiply what ends each residual branch by its p_l, in site order: an affine layer's weight and bias, or a
    parameter named as such; every end of a branch of several paths."""
    ends = [[f"{layer}.{e}" for e in ((end,) if isinstance(end, str) else end)]
            for layer, layout in layers(model, case) for end in layout.ends]
    assert len(ends) == len(ps) == case.sites
    params = dict(model.named_parameters())
    with torch.no_grad():
        for names, p in zip(ends, ps):
            for name in names:
                if name in params:
                    params[name].mul_(p)
                    continue
                module = model.get_submodule(name)
                module.weight.mul_(p)
                if getattr(module, "bias", None) is not None:
                    module.bias.mul_(p)
    return model


def run_onnx(path: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    """onnxruntime on the file, fed by the graph's own input names; the first output (the logits)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert set(names) == set(inputs), names
    return session.run(None, {n: inputs[n].numpy() for n in names})[0]


def logits(model: torch.nn.Module, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).logits


def seeded(model: torch.nn.Module, x: dict, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return logits(model, x)


# --- one saved folder per case, with what the tests share (built lazily, once per module) ----------------------


class Saved:
    """A zoo case written by save_pretrained, loaded by sdsurgeon, and injected (never changed by a test)."""

    def __init__(self, case: HFCase, root: Path) -> None:
        self.case = case
        self.root = root
        self.folder = root / case.name
        save(case, self.folder, seed=SEED)
        self.example = make_inputs(case)

    @functools.cached_property
    def _original(self) -> torch.nn.Module:
        return getattr(transformers, self.case.cls).from_pretrained(self.folder, local_files_only=True).eval()

    def original(self, state: dict | None = None) -> torch.nn.Module:
        """The transformers model itself, read from the folder by transformers alone (optionally other weights)."""
        model = copy.deepcopy(self._original)
        if state is not None:
            model.load_state_dict(state, strict=True)
        return model.eval()

    @functools.cached_property
    def loaded(self) -> torch.nn.Module:
        return sdsurgeon.load(self.folder)

    @functools.cached_property
    def plan(self):
        return sdsurgeon.plan(self.loaded, P_L, example_inputs=self.example)

    def _paper(self, p_L: float) -> torch.nn.Module:
        """Gated with paper scaling, chosen (the fold is what the zoo checks): its save warning is expected."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sdsurgeon.errors.UnscaledSaveWarning)
            return sdsurgeon.inject(self.loaded, p_L, scaling="paper", seed=SEED, example_inputs=self.example).eval()

    @functools.cached_property
    def injected(self) -> torch.nn.Module:
        return self._paper(P_L)

    @functools.cached_property
    def injected_full(self) -> torch.nn.Module:
        """p_L = 1: every gate always keeps its block, so the model must compute what the original does."""
        return self._paper(1.0)

    def full(self) -> torch.nn.Module:
        """A copy of ``injected_full`` to change."""
        return copy.deepcopy(self.injected_full)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    cache: dict[str, Saved] = {}

    def get(case: HFCase) -> Saved:
        if case.name not in cache:
            cache[case.name] = Saved(case, root)
        return cache[case.name]

    return get


def by_name(cases):
    return pytest.mark.parametrize("case", cases, ids=lambda c: c.name)


@pytest.mark.parametrize("name", ["gpt2", "convnext"])
def test_plan_leaves_the_model_as_it_was(zoo, name):
    """plan captures with the cache off and drop paths switched off, then puts both back; weights untouched."""
    saved = zoo(CASES[name])
    model = sdsurgeon.load(saved.folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = getattr(model.config, "use_cache", None)
    rates = [(d.path, d.rate) for d in sdsurgeon.capture.drop_path.find_drop_paths(model)]
    sdsurgeon.plan(model, P_L, example_inputs=saved.example)
    assert getattr(model.config, "use_cache", None) == cache
    assert [(d.path, d.rate) for d in sdsurgeon.capture.drop_path.find_drop_paths(model)] == rates
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert name != "convnext" or rates  # the convnext config has drop paths to put back


def test_a_recorded_config_rebuilds_with_eager_attention_as_the_folder_loaded(zoo):
    """An .sd.pt file rebuilds from class + config; it must get the attention load_folder chose (SDPA Swin
    cannot be exported to ONNX by torch 2.13)."""
    model = sdsurgeon.io.hf.build("SwinForImageClassification", zoo(CASES["swin"]).loaded.config.to_dict())
    assert model.config._attn_implementation == "eager"
    assert sdsurgeon.load(zoo(CASES["swin"]).folder).config._attn_implementation == "eager"


@by_name(HF_ZOO)
def test_an_empty_build_holds_no_weights_and_the_buffers_no_file_carries_as_transformers_loads_them(zoo, case):
    """What an .sd.pt of a transformers model is rebuilt on (hf.build(empty=True)): no parameter takes memory (each
    is assigned from the file next), and each buffer outside the state_dict (rotary frequencies, position ids) is
    what transformers' own from_pretrained of the folder holds."""
    reference = getattr(transformers, case.cls).from_pretrained(zoo(case).folder, local_files_only=True)
    built = sdsurgeon.io.hf.build(case.cls, reference.config.to_dict(), empty=True)
    assert all(p.is_meta for p in built.parameters())
    expected = {k: v for k, v in reference.named_buffers() if k not in reference.state_dict()}
    got = {k: v for k, v in built.named_buffers() if k not in built.state_dict()}
    assert got.keys() == expected.keys()
    assert case.name not in ("llama", "bert") or got  # the cases that have some
    for name, buffer in got.items():
        torch.testing.assert_close(buffer, expected[name], rtol=0, atol=0, msg=name)


def test_a_buffer_set_only_by_init_weights_is_set_in_a_model_rebuilt_from_its_file(zoo, work, monkeypatch):
    """transformers 5 sets non-persistent buffers in _init_weights too (its meta-device loading loses what __init__
    computed): a model whose __init__ leaves one unset still gets it when its .sd.pt is rebuilt, checked against
    RoPE's own formula."""
    from transformers.models.llama import modeling_llama

    saved = zoo(CASES["llama"])
    sdsurgeon.save(saved.injected, "m.sd.pt")
    init = modeling_llama.LlamaRotaryEmbedding.__init__

    def unset(self, config):
        init(self, config)
        self.inv_freq.zero_()
        self.original_inv_freq.zero_()

    monkeypatch.setattr(modeling_llama.LlamaRotaryEmbedding, "__init__", unset)
    config = saved.injected.config
    dim = config.hidden_size // config.num_attention_heads
    expected = 1.0 / config.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rotary = [m for m in sdsurgeon.load("m.sd.pt").modules() if isinstance(m, modeling_llama.LlamaRotaryEmbedding)]
    assert rotary
    for module in rotary:
        torch.testing.assert_close(module.inv_freq, expected)


def test_an_sd_file_whose_weights_leave_a_parameter_unset_is_a_one_line_error(zoo, work, monkeypatch):
    """The parameters of a rebuilt transformers model are on meta until the file's tensors are assigned: one left so
    is refused when loading, not met as a meta tensor in the first forward."""
    sdsurgeon.save(zoo(CASES["llama"]).injected, "m.sd.pt")
    monkeypatch.setattr(sdsurgeon.sdfile, "load_state_strictly", lambda *args, **kwargs: None)
    with pytest.raises(sdsurgeon.errors.LoadError, match=r"leave 'model\.embed_tokens\.weight' unset"):
        sdsurgeon.load("m.sd.pt")


# --- 1. counts: the residual adds of each layer, nothing else ---------------------------------------------------


@by_name(HF_ZOO)
def test_plan_finds_the_residual_adds_of_every_layer_and_nothing_else(zoo, case):
    saved = zoo(case)
    plan = saved.plan
    assert plan.capture == "export"
    assert plan.num_sites == plan.num_gated == case.sites
    assert plan.untraced == []
    # every site is a residual add of one transformer layer / residual block, in depth order: not a RoPE,
    # positional-embedding, attention-mask or relative-position-bias add (those live in other modules)
    expected = [f"{layer}.{site}" if site else layer
                for layer, layout in layers(saved.original(), case) for site in layout.sites]
    assert [s.id.rpartition(":")[0] for s in plan.sites] == expected
    assert len(set(s.id for s in plan.sites)) == case.sites
    assert [s.index for s in plan.sites] == list(range(1, case.sites + 1))
    assert [s.p for s in plan.sites] == pytest.approx(linear_ps(case.sites, P_L))
    assert all(s.params > 0 for s in plan.sites)
    d = json.loads(json.dumps(plan.to_dict()))
    assert d["capture"] == "export" and d["num_sites"] == case.sites


# --- 2. inject -> train -> fold -> export -> verify, and the file against a hand-scaled original ---------------


@dataclass
class Trained:
    model: torch.nn.Module
    eval_before: float
    eval_after: float
    train_losses: list[float]
    report: object
    verification: object
    path: Path


@pytest.fixture(scope="module")
def trained(zoo):
    cache: dict[str, Trained] = {}

    def get(case: HFCase) -> Trained:
        if case.name in cache:
            return cache[case.name]
        saved = zoo(case)
        model = copy.deepcopy(saved.injected)  # inject's output (shared with other tests, so a copy of it)
        data = make_inputs(case, batch=16, seed=1)
        torch.manual_seed(SEED)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.eval()
        with torch.no_grad():
            before = loss_of(case, model, data).item()
        model.train()
        losses = []
        for _ in range(8):
            optimizer.zero_grad()
            loss = loss_of(case, model, data)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        model.eval()
        with torch.no_grad():
            after = loss_of(case, model, data).item()
        folded, report = sdsurgeon.fold_with_report(model)
        path = saved.root / f"{case.name}.trained.onnx"
        _, verification = export_verified(folded, saved.example, path, reference=model)
        cache[case.name] = Trained(model, before, after, losses, report, verification, path)
        return cache[case.name]

    return get


@pytest.mark.slow
@by_name(HF_ZOO)
def test_inject_train_fold_export_verify(trained, case):
    t = trained(case)
    assert t.model.sdsurgeon_recipe.capture == "export"
    assert t.eval_after < t.eval_before
    assert np.mean(t.train_losses[-2:]) < np.mean(t.train_losses[:2]), t.train_losses
    assert len(t.report.sites) == case.sites
    assert t.report.multiplies == []
    assert [s.how for s in t.report.sites] == ["weights"] * case.sites
    assert t.verification.ok
    assert t.path.is_file()
    assert not {n.op_type for n in onnx.load(str(t.path)).graph.node} & RANDOM_OPS


@by_name(HF_ZOO)
def test_trained_onnx_matches_the_original_model_with_branches_scaled_by_hand(zoo, trained, case):
    t = trained(case)
    state = t.model.state_dict()
    reference = scale_by_hand(zoo(case).original(state), case, linear_ps(case.sites, P_L))
    unscaled = zoo(case).original(state)
    for batch in (2, 3):
        x = make_inputs(case, batch=batch, seed=10 + batch)
        got = run_onnx(t.path, x)
        np.testing.assert_allclose(got, logits(reference, x).numpy(), **TOL)
        assert not np.allclose(got, logits(unscaled, x).numpy(), **TOL), "p_l must change the output"


# --- 5. the issue's own reference: BERT and ViT, dense weight and bias scaled by p_l -----------------------------


@pytest.mark.parametrize("name,ends", [
    ("bert", ["bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"]),
    ("vit", ["vit.layers.{}.attention.o_proj", "vit.layers.{}.mlp.fc2"]),  # transformers 5's ViT module names
])
def test_folded_onnx_matches_dense_layers_scaled_by_hand(zoo, trained, name, ends):
    """The ONNX file of the trained, folded model against the original class holding the same (trained) weights,
    each layer's attention-output and MLP-output dense scaled by p_l in site order: transformers and torch only."""
    case = CASES[name]
    t = trained(case)
    reference = zoo(case).original(t.model.state_dict())
    unscaled = zoo(case).original(t.model.state_dict())
    ps = iter(linear_ps(2 * case.config["num_hidden_layers"], P_L))
    with torch.no_grad():
        for layer in range(case.config["num_hidden_layers"]):
            for end in ends:
                dense = reference.get_submodule(end.format(layer))
                assert isinstance(dense, torch.nn.Linear)
                p = next(ps)
                dense.weight.mul_(p)
                dense.bias.mul_(p)
    assert next(ps, None) is None
    for batch in (2, 5):
        x = make_inputs(case, batch=batch, seed=20 + batch)
        got = run_onnx(t.path, x)
        np.testing.assert_allclose(got, logits(reference, x).numpy(), **TOL)
        assert not np.allclose(got, logits(unscaled, x).numpy(), **TOL)


# --- 3. state_dict round trip, weights-only ---------------------------------------------------------------------


@by_name(HF_ZOO)
def test_state_dict_keys_survive_and_the_saved_file_is_weights_only(zoo, case, tmp_path):
    saved = zoo(case)
    original = saved.original().state_dict()
    injected = saved.injected.state_dict()
    assert list(injected) == list(original)
    assert all(torch.equal(injected[k], original[k]) for k in original)

    path = tmp_path / f"{case.name}.sd.pt"
    sdsurgeon.save(saved.injected, path)
    payload = torch.load(path, weights_only=True)  # no pickled code in it
    assert payload["source"]["kind"] == "hf" and payload["source"]["arch"] == case.cls
    assert "module" not in payload
    assert list(payload["state_dict"]) == list(original)

    loaded = sdsurgeon.load(path).eval()  # no trust_pickle
    assert type(loaded).__name__ == type(saved.injected).__name__
    state = loaded.state_dict()
    assert list(state) == list(original)
    assert all(torch.equal(state[k], injected[k]) for k in injected)
    assert [(g.site_id, g.p) for g in sdsurgeon.gates(loaded)] == [(g.site_id, g.p) for g in sdsurgeon.gates(saved.injected)]
    reference = scale_by_hand(saved.original(), case, linear_ps(case.sites, P_L))
    for batch in (2, 3):
        x = make_inputs(case, batch=batch, seed=30 + batch)
        got = logits(loaded, x)
        torch.testing.assert_close(got, logits(saved.injected, x), rtol=0, atol=0)
        torch.testing.assert_close(got, logits(reference, x), rtol=1e-4, atol=1e-5)


# --- 4. train / eval ----------------------------------------------------------------------------------------------


@by_name(HF_ZOO)
def test_train_and_eval_switch_like_the_original(zoo, case):
    """p_L = 1: in train mode under one seed the injected model computes what the original does, in eval too."""
    saved = zoo(case)
    model = saved.full()
    original = no_drop_paths(saved.original())  # inject switched the model's own drop paths off
    x = saved.example
    model.train()
    original.train()
    assert model.training and all(m.training for m in model.modules())
    torch.testing.assert_close(seeded(model, x, 1), seeded(original, x, 1), rtol=1e-4, atol=1e-5)
    model.eval()
    original.eval()
    assert not any(m.training for m in model.modules())
    first, second = logits(model, x), logits(model, x)
    assert torch.equal(first, second)
    torch.testing.assert_close(first, logits(original, x), rtol=0, atol=1e-5)


@by_name(DROPOUT_CASES)
def test_dropout_is_active_in_train_only(zoo, case):
    saved = zoo(case)
    model = saved.full()
    original = saved.original()
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in original.modules())
    x = saved.example
    model.train()
    a, b = logits(model, x), logits(model, x)
    assert not torch.allclose(a, b), "dropout must draw in train mode"
    original.train()
    torch.testing.assert_close(seeded(model, x, 3), seeded(original, x, 3), rtol=1e-4, atol=1e-5)  # the same masks
    model.eval()
    original.eval()
    a, b = logits(model, x), logits(model, x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, logits(original, x), rtol=0, atol=1e-5)


def test_batch_norm_statistics_update_in_train_only(zoo):
    case = CASES["resnet"]
    saved = zoo(case)
    model, original = saved.full(), saved.original()
    stats = [k for k in original.state_dict() if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) > 3

    def buffers(m):
        return {k: v.clone() for k, v in m.state_dict().items() if k in stats}

    before = buffers(model)
    x = make_inputs(case, batch=4, seed=5)
    model.train()
    original.train()
    logits(model, x)
    logits(original, x)
    trained, expected = buffers(model), buffers(original)
    assert all(not torch.equal(trained[k], before[k]) for k in stats)  # every statistic moved, the counters too
    for k in stats:
        torch.testing.assert_close(trained[k], expected[k], rtol=1e-5, atol=1e-6)
    model.eval()
    logits(model, make_inputs(case, batch=4, seed=6))
    after = buffers(model)
    assert all(torch.equal(after[k], trained[k]) for k in stats)


@by_name(HF_ZOO)
def test_gradients_reach_every_parameter_as_in_the_original(zoo, case):
    saved = zoo(case)
    model = saved.full()
    original = no_drop_paths(saved.original())
    names = [n for n, _ in original.named_parameters()]
    assert [n for n, _ in model.named_parameters()] == names
    data = make_inputs(case, batch=4, seed=7)
    grads = {}
    for which, m in (("injected", model), ("original", original)):
        m.train()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.05)
        torch.manual_seed(SEED)
        for _ in range(2):
            optimizer.zero_grad()
            loss_of(case, m, data).backward()
            optimizer.step()
        grads[which] = {n: p.grad for n, p in m.named_parameters()}
    assert all(g is not None for g in grads["injected"].values()), [n for n, g in grads["injected"].items() if g is None]
    used = [n for n, g in grads["original"].items() if g is not None and bool(g.abs().sum() > 0)]
    assert len(used) >= len(names) - 2
    assert all(bool(grads["injected"][n].abs().sum() > 0) for n in used)
    for n in names:
        torch.testing.assert_close(grads["injected"][n], grads["original"][n], rtol=1e-3, atol=1e-5, msg=n)


# --- 6. drop-path modules the models carry ------------------------------------------------------------------------


def outputs_under_seeds(model, x, seeds=(1, 2, 3)) -> list[torch.Tensor]:
    return [seeded(model, x, s) for s in seeds]


def all_equal(tensors) -> bool:
    return all(torch.equal(tensors[0], t) for t in tensors[1:])


@by_name(DROP_PATH_CASES)
def test_existing_drop_paths_are_reported_and_replaced_by_default(zoo, case):
    """Replaced (the default): reported with their rates, switched off; the gates' schedule takes over.
    (The default variant's fold, export and verification are test_inject_train_fold_export_verify's.)"""
    saved = zoo(case)
    theirs = drop_path_modules(saved.original())
    assert theirs and all(rate > 0 for _, _, rate in theirs)
    found = saved.plan.to_dict()["existing_drop_paths"]
    assert [(d["module"], d["class"]) for d in found] == [(path, cls) for path, cls, _ in theirs]
    assert [d["rate"] for d in found] == pytest.approx([rate for _, _, rate in theirs])
    assert saved.plan.to_dict()["existing_drop_paths_kept"] is False
    recipe = saved.injected.sdsurgeon_recipe
    assert not recipe.keep_existing
    assert [path for path, _ in recipe.replaced] == [path for path, _, _ in theirs]
    assert [rate for _, rate in recipe.replaced] == pytest.approx([rate for _, _, rate in theirs])
    assert [p for _, p in recipe.sites] == pytest.approx(linear_ps(case.sites, P_L))  # the schedule sets the rates
    # switched off: with p_L = 1 (no gate drops) the model in train mode draws nothing, where the original does
    x = make_inputs(case, batch=16, seed=8)
    model = saved.full().train()
    original = saved.original().train()
    assert all_equal(outputs_under_seeds(model, x))
    assert not all_equal(outputs_under_seeds(original, x))
    torch.testing.assert_close(seeded(model, x, 1), seeded(no_drop_paths(original), x, 1), rtol=1e-4, atol=1e-5)
    assert drop_path_modules(saved.loaded) == theirs  # the input model keeps its rates


@by_name(DROP_PATH_CASES)
def test_keep_existing_leaves_the_drop_path_modules_dropping(zoo, case):
    saved = zoo(case)
    theirs = drop_path_modules(saved.original())
    model = sdsurgeon.inject(saved.loaded, 1.0, seed=SEED, example_inputs=saved.example, keep_existing=True)
    assert model.sdsurgeon_recipe.keep_existing and model.sdsurgeon_recipe.replaced == []
    assert drop_path_modules(model) == theirs  # the modules themselves, at their paths, with their rates
    x = make_inputs(case, batch=16, seed=8)
    model.train()
    original = saved.original().train()
    got = outputs_under_seeds(model, x)
    assert not all_equal(got), "kept drop paths must drop in train mode"
    for out, expected in zip(got, outputs_under_seeds(original, x)):  # the same draws as the original's own
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    model.eval()
    original.eval()
    a, b = logits(model, x), logits(model, x)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, logits(original, x), rtol=0, atol=1e-5)


@pytest.mark.slow
@by_name(DROP_PATH_CASES)
def test_keep_existing_folds_exports_and_verifies(zoo, case, tmp_path):
    saved = zoo(case)
    model = sdsurgeon.inject(saved.loaded, P_L, scaling="paper", seed=SEED, example_inputs=saved.example, keep_existing=True).eval()
    folded, report = sdsurgeon.fold_with_report(model)
    assert report.multiplies == [] and len(report.folded) == case.sites
    path = tmp_path / "m.onnx"
    # a static batch: quicker to export (the dynamic one is test_inject_train_fold_export_verify's, same models)
    _, verification = export_verified(folded, saved.example, path, reference=model, dynamic_batch=False)
    assert verification.ok
    assert not {n.op_type for n in onnx.load(str(path)).graph.node} & RANDOM_OPS
    reference = scale_by_hand(saved.original(), case, linear_ps(case.sites, P_L))
    x = make_inputs(case, seed=40)
    np.testing.assert_allclose(run_onnx(path, x), logits(reference, x).numpy(), **TOL)


# --- 7. the command line on a save_pretrained folder -----------------------------------------------------------------


TOKENS = ["--input", "input_ids:2,12:int64"]
PAPER = ["--scaling", "paper"]  # the fold is what these check: p_l into the weights (auto is inverted here)


@pytest.fixture
def work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_cli_plan_of_a_folder_reports_the_export_capture(zoo, work):
    saved = zoo(CASES["bert"])
    d = one_json(invoke("plan", saved.folder, *TOKENS, "--json"))
    assert d["num_sites"] == 4 and d["capture"] == "export"
    layers = layer_paths(saved.original(), CASES["bert"])
    assert [s["id"].rpartition(":")[0] for s in d["sites"]] == [
        f"{layer}.{site}" for layer in layers for site in ("attention.output", "output")]
    assert d["total_flops"] > 0 and 0 < d["expected_train_flops_ratio"] < 1


def test_cli_plan_of_a_folder_says_it_reaches_every_output_and_refuses_in_the_models_terms(zoo, work):
    """A transformers folder reaches ONNX, safetensors and hf; Llama's attention add that cannot be gated is
    explained by modeling_llama.py's lines and module paths, not by ATen node names (to_11, add_14)."""
    import re

    result = invoke("plan", zoo(CASES["llama"]).folder, *TOKENS)
    assert_ok(result)
    lines = result.stdout.splitlines()
    assert "outputs: ONNX yes (dynamic batch, sequence); safetensors yes; hf yes" in lines
    refusals = [line.partition(": ")[2].partition(": ")[2] for line in lines if line.startswith("not gated: ")]
    assert refusals
    for reason in refusals:
        assert re.search(r"modeling_llama\.py:\d+ in forward", reason) and "`model.layers." in reason, reason
        assert not re.search(r"\b[a-z]+(?:_[a-z]+)*_\d+\b", re.sub(r"`[^`]*`", "", reason)), reason


def test_cli_inject_then_export_a_folder_remembers_the_inputs(zoo, work):
    case = CASES["bert"]
    saved = zoo(case)
    injected = one_json(invoke("inject", *PAPER, saved.folder, *TOKENS, "--seed", "0", "-o", "x.sd.pt", "--json"))
    assert injected["capture"] == "export" and injected["weights_only"] is True and injected["num_gated"] == 4
    payload = torch.load(work / "x.sd.pt", weights_only=True)
    assert payload["source"]["kind"] == "hf"
    (spec,) = payload["recipe"]["inputs"]
    assert spec["name"] == "input_ids" and spec["shape"] == [2, 12] and spec["high"] == case.config["vocab_size"]
    exported = one_json(invoke("export", "x.sd.pt", "-o", "x.onnx", "--json"))  # no --input: remembered
    assert exported["verify"]["ok"] is True and exported["folded"] == 4 and exported["multiplies"] == []
    reference = scale_by_hand(saved.original(), case, linear_ps(4, P_L))
    x = make_inputs(case, batch=3, seed=50)
    np.testing.assert_allclose(run_onnx(work / "x.onnx", x), logits(reference, x).numpy(), **TOL)


def test_cli_capture_fx_on_a_vit_folder_captures_parts_and_says_which_layers_did_not_trace(zoo, work):
    """fx traces some of ViT's submodules (not its layers): a partial capture, 0 sites, each layer's reason listed."""
    saved = zoo(CASES["vit"])
    image = ("--input", "pixel_values:2,3,16,16")
    d = one_json(invoke("plan", saved.folder, *image, "--capture", "fx", "--json"))
    assert d["capture"] == "fx" and d["num_sites"] == 0
    untraced = {u["module"]: u["reason"] for u in d["untraced"]}
    assert "(root)" in untraced and {"vit.layers.0", "vit.layers.1"} <= set(untraced)
    line = assert_user_error(invoke("inject", saved.folder, *image, "--capture", "fx", "-o", "v.sd.pt"))
    assert "ViTForImageClassification" in line and "sdsurgeon plan" in line
    assert not list(work.iterdir())


def test_cli_capture_fx_on_a_llama_folder_is_a_partial_capture_that_finds_nothing(zoo, work):
    """torch.fx traces none of Llama's layers: plan says so (capture fx, 0 sites, what did not trace and why),
    and inject refuses in one line pointing at plan."""
    saved = zoo(CASES["llama"])
    d = one_json(invoke("plan", saved.folder, *TOKENS, "--capture", "fx", "--json"))
    assert d["capture"] == "fx" and d["num_sites"] == 0
    assert d["untraced"] and d["untraced"][0]["module"] == "(root)" and all(u["reason"] for u in d["untraced"])
    line = assert_user_error(invoke("inject", saved.folder, *TOKENS, "--capture", "fx", "-o", "l.sd.pt"))
    assert "LlamaForCausalLM" in line and "sdsurgeon plan" in line
    assert not list(work.iterdir())


def test_cli_capture_fx_on_a_bert_folder_names_the_capture_not_the_inputs(zoo, work):
    saved = zoo(CASES["bert"])
    line = assert_user_error(invoke("plan", saved.folder, *TOKENS, "--capture", "fx"))
    assert "--capture" in line or "--leaf" in line
    assert "check --input" not in line


def test_partial_fx_capture_reaches_blocks_inside_module_lists(zoo):
    case = CASES["resnet"]
    saved = zoo(case)
    plan = sdsurgeon.plan(saved.loaded, P_L, example_inputs=saved.example, capture="fx")
    assert plan.capture == "fx"
    assert [s.id.rpartition(":")[0] for s in plan.sites] == layer_paths(saved.original(), case)


@pytest.mark.parametrize("command", ["plan", "inject"])
def test_cli_capture_export_without_inputs_on_a_plain_arch_asks_for_them(work, command):
    line = assert_user_error(invoke(command, "--arch", "sdsurgeon.models:cifar_resnet", "--capture", "export"))
    assert "--input-shape" in line and "--capture export" in line
    assert not list(work.iterdir())


def test_cli_folder_without_config_json_is_a_one_line_error(zoo, work):
    folder = work / "weights_only"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((zoo(CASES["bert"]).folder / "model.safetensors").read_bytes())
    line = assert_user_error(invoke("plan", folder, *TOKENS))
    assert "config.json" in line and "weights_only" in line


@pytest.mark.parametrize("command", ["plan", "inject"])
def test_cli_arch_with_a_transformers_folder_is_a_one_line_error(zoo, work, command):
    folder = zoo(CASES["bert"]).folder
    line = assert_user_error(invoke(command, folder, "--arch", "sdsurgeon.models:cifar_resnet", *TOKENS))
    assert "--arch" in line and "config.json" in line
    assert not [p for p in work.iterdir() if p.suffix == ".pt"]


# --- 8. a model neither front-end can capture ---------------------------------------------------------------------


def _root_if_line() -> int:
    """archs.Uncapturable.forward's `if x.mean() > 0:`: where torch.export stops."""
    lines, start = inspect.getsourcelines(archs.Uncapturable.forward)
    return start + next(i for i, text in enumerate(lines) if "if x.mean() > 0" in text)


UNCAPTURABLE = ["--arch", "archs:uncapturable", "--input-shape", "2,8"]


@pytest.mark.parametrize("capture", [
    "auto",
    "fx",
    "export",
])
def test_a_model_neither_front_end_captures_fails_in_one_line_naming_what_to_try(work, capture):
    line = assert_user_error(invoke("plan", *UNCAPTURABLE, "--capture", capture))
    assert "Uncapturable" in line
    assert "--leaf" in line and "--capture" in line
    if capture != "fx":  # torch.export names the line of the model's own code it could not get past
        assert f"archs.py:{_root_if_line()} in forward" in line
    if capture != "export":
        assert "torch.fx" in line


def test_a_model_neither_front_end_captures_without_inputs_asks_for_them(work):
    line = assert_user_error(invoke("plan", "--arch", "archs:uncapturable"))
    assert "Uncapturable" in line and "--leaf" in line and "--input" in line


def test_the_uncapturable_arch_really_defeats_both_front_ends():
    """The archs model is what the tests above claim: torch.fx and torch.export both fail, at the root and blocks."""
    model = archs.uncapturable()
    x = torch.randn(2, 8)
    for module in (model, model.blocks[0]):
        with pytest.raises(Exception):
            torch.fx.symbolic_trace(module)
        with pytest.raises(Exception):
            torch.export.export(module, (x,), strict=False)
    assert model(x).shape == (2, 3)


# --- 9. input defaults ---------------------------------------------------------------------------------------------


def test_token_inputs_are_drawn_below_the_vocabulary_and_defaults_come_from_the_config(zoo, work):
    bert = zoo(CASES["bert"])
    vocab = CASES["bert"].config["vocab_size"]
    (spec,) = complete_specs(bert.loaded, None)
    assert (spec.name, spec.dtype, spec.high) == ("input_ids", "int64", vocab)
    assert spec.shape[0] == 1 and 1 < spec.shape[1] <= CASES["bert"].config["max_position_embeddings"]
    given = complete_specs(bert.loaded, [InputSpec.parse("input_ids:2,12:int64"), InputSpec.parse("token_type_ids:2,12:int64")])
    assert [(s.name, s.shape, s.high) for s in given] == [
        ("input_ids", (2, 12), vocab), ("token_type_ids", (2, 12), bert.original().config.type_vocab_size)]
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([given[0].make(g) for _ in range(200)])
    assert draws.dtype == torch.int64 and int(draws.min()) == 0 and int(draws.max()) == vocab - 1  # the whole range
    (pixels,) = complete_specs(zoo(CASES["vit"]).loaded, None)
    assert (pixels.name, pixels.shape, pixels.dtype) == ("pixel_values", (1, 3, 16, 16), "float32")
    # the one run on defaults: no --input at all
    d = one_json(invoke("plan", bert.folder, "--json"))
    assert d["num_sites"] == 4 and d["capture"] == "export" and d["total_flops"] > 0


# --- a model with its own LayerDrop (a transformers speech encoder) -------------------------------------


def _wav2vec2(layerdrop: float = 0.1):
    import transformers

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        layerdrop=layerdrop, vocab_size=32, apply_spec_augment=False)
    return transformers.Wav2Vec2Model(config)


def _encoder_layer_adds(model) -> list[str]:
    # transformers' own layer list: every encoder layer adds its attention and its feed-forward residual
    return [f"encoder.layers.{i}:{name}" for i in range(len(model.encoder.layers)) for name in ("add", "add_1")]


@pytest.mark.hf
def test_layerdrop_is_switched_off_like_a_drop_path_and_the_gates_replace_it():
    model = _wav2vec2()
    x = {"input_values": torch.randn(2, 1600)}
    plan = sdsurgeon.plan(model, 0.5, example_inputs=x)
    assert plan.capture == "export"
    assert set(_encoder_layer_adds(model)) <= {s.id for s in plan.sites}
    assert [(d["module"], d["class"], d["rate"]) for d in plan.to_dict()["existing_drop_paths"]] == [
        ("config.layerdrop", "LayerDrop", 0.1)]
    assert model.config.layerdrop == 0.1  # plan changed nothing
    injected = sdsurgeon.inject(model, 1.0, example_inputs=x)
    assert injected.sdsurgeon_recipe.replaced == [["config.layerdrop", 0.1]]
    _assert_same_in_train_and_eval(injected, _wav2vec2(layerdrop=0.0), x, "last_hidden_state")


def _assert_same_in_train_and_eval(injected, reference, x: dict, output: str) -> None:
    """``injected`` (at p_L = 1) gives what ``reference`` (the same weights, seed, without LayerDrop) gives."""
    for training in (True, False):
        injected.train(training)
        reference.train(training)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            got = injected(**x)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            expected = reference(**x)
        torch.testing.assert_close(got[output] if isinstance(got, dict) else got[0], expected[output],
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.hf
def test_layerdrop_kept_says_what_stopped_the_capture_in_one_line():
    with pytest.raises(sdsurgeon.SurgeonError) as raised:
        sdsurgeon.inject(_wav2vec2(), 0.5, example_inputs={"input_values": torch.randn(2, 1600)}, keep_existing=True)
    message = str(raised.value)
    assert "\n" not in message and "torch.export could not capture" in message and "LayerDrop" in message


def _bart(layerdrop: float = 0.1):
    """The zoo's BART, with LayerDrop in encoder and decoder."""
    case = CASES["bart"]
    return build(replace(case, config=dict(case.config, encoder_layerdrop=layerdrop, decoder_layerdrop=layerdrop)))


@pytest.mark.hf
def test_an_encoder_decoder_whose_layers_copied_their_layerdrop_at_init_is_found_whole():
    # BART's encoder and decoder copy the rate at init (self.layerdrop = config.encoder_layerdrop): switching
    # the config alone left the draw in forward, and capture fell apart into parts that failed on their calls
    import transformers

    model = _bart()
    x = {"input_ids": torch.randint(3, 97, (2, 7)), "decoder_input_ids": torch.randint(3, 97, (2, 5))}
    plan = sdsurgeon.plan(model, 0.5, example_inputs=x)
    layers = [m for m in model.modules()
              if isinstance(m, (transformers.models.bart.modeling_bart.BartEncoderLayer,
                                transformers.models.bart.modeling_bart.BartDecoderLayer))]
    # each encoder layer adds attention and feed-forward, each decoder layer also cross-attention
    expected = sum(3 if "Decoder" in type(m).__name__ else 2 for m in layers)
    assert plan.capture == "export" and len([s for s in plan.sites if s.gated]) == expected == 10
    assert {d["module"] for d in plan.to_dict()["existing_drop_paths"]} >= {
        "model.encoder.layerdrop", "model.decoder.layerdrop"}
    assert model.model.encoder.layerdrop == 0.1  # plan changed nothing
    injected = sdsurgeon.inject(model, 1.0, example_inputs=x)
    _assert_same_in_train_and_eval(injected, _bart(layerdrop=0.0), x, "logits")


def _mixtral():
    """The zoo's Mixtral: hidden 32, FFN 64, 2 layers, 2 heads (1 key-value head), 4 experts, top 2, vocabulary 97."""
    return build(CASES["mixtral"]).eval()


@pytest.mark.hf
def test_a_mixture_of_experts_lm_plans_the_flops_of_the_experts_its_tokens_were_routed_to():
    model = _mixtral()
    b, t, d, ffn, experts, top, vocab = 2, 6, 32, 64, 4, 2, 97
    plan = sdsurgeon.plan(model, 0.5, example_inputs={"input_ids": torch.randint(0, vocab, (b, t))})
    tokens = b * t
    heads, kv_heads, head_dim = 2, 1, d // 2
    attention = (2 * tokens * d * d * 2  # q and o projections
                 + 2 * tokens * d * kv_heads * head_dim * 2  # k and v
                 + 2 * (2 * b * heads * t * t * head_dim))  # scores and weighted values
    # the router, then each token's 2 experts: gate+up (d -> 2 ffn) and down (ffn -> d)
    moe = 2 * tokens * d * experts + 2 * tokens * top * (d * 2 * ffn + ffn * d)
    assert sorted({s.flops for s in plan.sites}) == sorted({attention, moe})
    assert plan.total_flops == 2 * (attention + moe) + 2 * tokens * d * vocab  # and the LM head


@pytest.mark.onnx
@pytest.mark.hf
def test_a_mixture_of_experts_lm_exports_its_experts_in_an_implementation_onnx_takes(tmp_path):
    # transformers' default experts run one fused grouped matmul, which has no ONNX translation
    model = _mixtral()
    x = {"input_ids": torch.randint(0, 97, (2, 6))}
    injected = sdsurgeon.inject(model, 0.5, example_inputs=x)
    before = injected.get_experts_implementation()
    onnx_file, verification = export_verified(sdsurgeon.fold(injected), x, tmp_path / "moe.onnx", reference=injected)
    assert verification.ok and onnx_file.experts == ["grouped_mm -> batched_mm"]
    assert injected.get_experts_implementation() == before == {"": "grouped_mm"}  # the model's own, restored
    (got,) = ort.InferenceSession(str(tmp_path / "moe.onnx")).run(None, {"input_ids": x["input_ids"].numpy()})[:1]
    with torch.no_grad():
        expected = injected.eval()(**x).logits
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.onnx
@pytest.mark.hf
def test_a_model_with_sdpa_attention_exports_with_a_dynamic_batch(tmp_path):
    # built in Python, transformers picks SDPA; its fused CPU kernel's decomposition failed a symbolic batch
    model = build(CASES["swin"]).eval()
    assert model.config._attn_implementation == "sdpa"
    x = {"pixel_values": torch.randn(2, 3, 32, 32)}
    injected = sdsurgeon.inject(model, 0.5, example_inputs=x)
    onnx_file, verification = export_verified(sdsurgeon.fold(injected), x, tmp_path / "swin.onnx", reference=injected)
    assert verification.ok and onnx_file.dynamic_inputs == ["pixel_values"]
    session = ort.InferenceSession(str(tmp_path / "swin.onnx"))
    batch = torch.randn(5, 3, 32, 32)
    (got,) = session.run(None, {"pixel_values": batch.numpy()})
    with torch.no_grad():
        expected = injected.eval()(pixel_values=batch)
    expected = expected["logits"] if isinstance(expected, dict) else expected[0]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


# --- 8. fold to a plain checkpoint: a save_pretrained folder and a safetensors file, loaded without sdsurgeon ---------


@by_name([CASES[n] for n in ("llama", "gpt2", "bert", "vit", "mixtral", "gpt_neox", "bert_mlm", "bart", "t5")])
def test_export_format_hf_is_a_folder_plain_transformers_loads_as_the_hand_scaled_model(zoo, case, work):
    saved = zoo(case)
    inputs = [arg for spec in case.inputs for arg in ("--input", spec)]
    assert_ok(invoke("inject", *PAPER, saved.folder, *inputs, "-o", "m.sd.pt"))
    record = one_json(invoke("export", "m.sd.pt", "--format", "hf", "-o", "plain", "--json"))
    assert record["format"] == "hf" and record["verify"]["ok"] and record["folded"] == case.sites
    assert (work / "plain" / "config.json").is_file()
    plain = getattr(transformers, case.cls).from_pretrained(work / "plain").eval()  # transformers alone
    reference = scale_by_hand(saved.original(), case, linear_ps(case.sites, P_L))
    x = make_inputs(case, batch=3, seed=60)
    torch.testing.assert_close(logits(plain, x), logits(reference, x), **TOL)
    # written again over its own earlier output: replaced; a folder of other files: refused, untouched
    assert_ok(invoke("export", "m.sd.pt", "--format", "hf", "-o", "plain"))
    (work / "other").mkdir()
    (work / "other" / "notes.txt").write_text("mine")
    assert "folder of other files" in assert_user_error(invoke("export", "m.sd.pt", "--format", "hf", "-o", "other"))
    assert (work / "other" / "notes.txt").read_text() == "mine"


def test_export_format_hf_lets_the_model_it_loaded_go_before_loading_the_folder_back(zoo, work, monkeypatch):
    """Memory (issue 27 item 5): the model export loaded is folded in place (from its recorded surgery's site
    records) and freed before the written folder is loaded back, so two models' weights are never held at once;
    the check is still against the gated model in eval (the recipe's outputs, recorded before the fold)."""
    import weakref

    from sdsurgeon import pipeline

    sdsurgeon.save(zoo(CASES["llama"]).injected, "m.sd.pt")
    loaded, alive_at_load_back = [], []
    real_load, real_load_plain = pipeline.ModelRef.load_recorded, pipeline.load_plain

    def load_recorded(self):
        model, recipe = real_load(self)
        loaded.append(weakref.ref(model))
        return model, recipe

    def load_plain(*args):
        alive_at_load_back.append(loaded[-1]() is not None)
        return real_load_plain(*args)

    monkeypatch.setattr(pipeline.ModelRef, "load_recorded", load_recorded)
    monkeypatch.setattr(pipeline, "load_plain", load_plain)
    result = pipeline.convert(pipeline.ModelRef(Path("m.sd.pt")), pipeline.ConvertOptions(format="hf"),
                              output=Path("plain"))
    assert result.checked.ok and len(result.checked.batch_sizes) == 3
    assert len(loaded) == 1 and alive_at_load_back == [False]


@pytest.mark.onnx
def test_a_bfloat16_model_stays_bfloat16_through_inject_and_every_output(work):
    # built from its recorded config, a model is float32: the stored weights' dtypes are taken back
    case = CASES["llama"]
    torch.manual_seed(0)
    original = getattr(transformers, case.cls)(getattr(transformers, case.cls).config_class(**case.config))
    original.to(torch.bfloat16).save_pretrained(work / "bf16")
    assert_ok(invoke("inject", *PAPER, work / "bf16", *TOKENS, "-o", "m.sd.pt"))
    assert {p.dtype for p in sdsurgeon.load("m.sd.pt").parameters()} == {torch.bfloat16}
    folder = one_json(invoke("export", "m.sd.pt", "--format", "hf", "-o", "plain", "--json"))
    assert folder["verify"]["ok"] and folder["verify"]["precision"] == "bfloat16"
    assert json.loads((work / "plain" / "config.json").read_text())["dtype"] == "bfloat16"
    assert transformers.AutoModelForCausalLM.from_pretrained(work / "plain").dtype == torch.bfloat16
    assert_ok(invoke("export", "m.sd.pt", "--format", "safetensors", "-o", "m.safetensors"))
    from safetensors.torch import load_file

    assert {t.dtype for t in load_file(work / "m.safetensors").values()} == {torch.bfloat16}
    onnx_record = one_json(invoke("export", "m.sd.pt", "-o", "m.onnx", "--json"))
    assert onnx_record["upcast_from"] == "bfloat16" and onnx_record["verify"]["ok"]
    (got,) = ort.InferenceSession("m.onnx").run(None, {"input_ids": np.ones((1, 12), dtype=np.int64)})[:1]
    assert got.dtype == np.float32


@pytest.mark.onnx
def test_a_language_models_onnx_takes_any_batch_and_sequence_length_with_named_inputs_and_outputs(zoo, work):
    # Optimum's conventions: the forward's own input names, named outputs, batch and sequence axes dynamic
    saved = zoo(CASES["llama"])
    mask = ["--input", "attention_mask:2,12:int64"]
    planned = json.loads(invoke("plan", saved.folder, *TOKENS, *mask, "--json").stdout)
    assert planned["outputs"][0]["dynamic"] == ["batch", "sequence"]  # said before training
    assert_ok(invoke("inject", saved.folder, *TOKENS, *mask, "-o", "m.sd.pt"))
    record = one_json(invoke("export", "m.sd.pt", "-o", "m.onnx", "--json"))
    assert record["dynamic_axes"] == {"input_ids": ["batch", "sequence"], "attention_mask": ["batch", "sequence"]}
    assert len(set(record["verify"]["sequence_lengths"])) == 3 and len(set(record["verify"]["batch_sizes"])) == 2
    session = ort.InferenceSession("m.onnx")
    assert [o.name for o in session.get_outputs()] == ["logits"]
    model = sdsurgeon.load("m.sd.pt").eval()
    for batch, length in ((1, 5), (3, 9), (2, 17)):
        ids = torch.randint(0, 97, (batch, length))
        ones = torch.ones(batch, length, dtype=torch.int64)
        (got,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": ones.numpy()})
        with torch.no_grad():
            expected = model(input_ids=ids, attention_mask=ones).logits
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-5)


def test_export_format_safetensors_of_a_transformers_model_loads_into_its_class(zoo, work):
    case = CASES["llama"]
    saved = zoo(case)
    assert_ok(invoke("inject", *PAPER, saved.folder, *TOKENS, "-o", "m.sd.pt"))
    assert_ok(invoke("export", "m.sd.pt", "--format", "safetensors"))
    from safetensors.torch import load_model

    plain = getattr(transformers, case.cls)(saved.original().config).eval()
    load_model(plain, str(work / "m.safetensors"))
    reference = scale_by_hand(saved.original(), case, linear_ps(case.sites, P_L))
    x = make_inputs(case, batch=2, seed=61)
    torch.testing.assert_close(logits(plain, x), logits(reference, x), **TOL)


# --- 9. surgery in place: the injected model is still the transformers model (its class, labels, generate, Trainer) ---

IN_PLACE = [CASES[n] for n in ("llama", "gpt2", "bert", "vit")]
GENERATIVE = [CASES[n] for n in ("llama", "gpt2", "mixtral", "gpt_neox", "bart")]


def some_inputs(case: HFCase, batch: int, length: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs of another batch size and (for tokens) sequence length than the examples inject saw."""
    if case.task == "image":
        return make_inputs(case, batch=batch, seed=seed)
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, case.config["vocab_size"], (batch, length), generator=g)}


def labels_for(case: HFCase, x: dict) -> torch.Tensor:
    """What the model's own loss takes as ``labels``: the tokens for a language model, else a class each."""
    if case.cls.endswith(("CausalLM", "LMHeadModel")):
        return x["input_ids"]
    return torch.arange(next(iter(x.values())).shape[0]) % 3


@by_name(IN_PLACE + [CASES["bart"]])  # BART's layers: issue 29 (T5's attention is still a leaf returning its bias)
def test_each_layer_is_rewritten_in_place_and_fold_gives_the_plain_class_back(zoo, case):
    saved = zoo(case)
    injected = saved.injected
    assert type(injected) is type(saved.loaded)
    assert [path for path, _ in sdsurgeon.surgery.install.rewritten(injected)] == layer_paths(injected, case)
    assert [r.how for r in saved.plan.rewrites] == ["block"] * len(layer_paths(injected, case))
    assert list(injected.state_dict()) == list(saved.loaded.state_dict())
    folded = sdsurgeon.fold(injected)
    assert type(folded) is type(injected) and not sdsurgeon.surgery.install.rewritten(folded)


@by_name(IN_PLACE)
def test_labels_an_optional_mask_and_free_sizes_run_the_models_own_code(zoo, case):
    saved = zoo(case)
    injected = saved.injected
    reference = scale_by_hand(saved.original(injected.state_dict()), case, linear_ps(case.sites, P_L))
    for batch, length in ((3, 7), (1, 20)):
        x = some_inputs(case, batch, length, seed=70 + batch)
        y = labels_for(case, x)
        with torch.no_grad():
            torch.testing.assert_close(injected(**x).logits, reference(**x).logits, **TOL)
            torch.testing.assert_close(injected(**x, labels=y).loss, reference(**x, labels=y).loss, **TOL)
            if case.task == "tokens":
                mask = torch.ones_like(x["input_ids"])
                mask[0, : length // 2] = 0  # padding on the left of the first sequence
                padded = injected(**x, attention_mask=mask).logits
                # a causal model's padded positions attend to nothing: eager and SDPA attention differ there
                real = mask.bool() if padded.dim() == 3 else slice(None)
                torch.testing.assert_close(padded[real], reference(**x, attention_mask=mask).logits[real], **TOL)
                assert not torch.allclose(padded[real], injected(**x).logits[real])  # the mask reaches the layers


@by_name(GENERATIVE)
def test_generate_gives_the_tokens_of_a_hand_folded_copy_of_the_trained_model(zoo, trained, case):
    model = trained(case).model
    assert type(model) is type(zoo(case).loaded)
    reference = scale_by_hand(zoo(case).original(model.state_dict()), case, linear_ps(case.sites, P_L))
    prompt = some_inputs(case, 2, 5, seed=80)["input_ids"]
    options = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    got = model.eval().generate(prompt, **options)
    start = 1 if model.config.is_encoder_decoder else prompt.shape[1]  # an encoder-decoder's decoder starts afresh
    assert got.shape == (2, start + 8)
    assert torch.equal(got, reference.generate(prompt, **options))


def trainer_for(model, case: HFCase, out: Path, steps: int, callbacks=()) -> transformers.Trainer:
    """A Trainer on 16 examples with a pattern to learn (tokens: every other token repeats the first; images: a
    class from the mean of the first channel), logging every step, saving nothing unless asked."""
    x = some_inputs(case, 16, 12, seed=90)
    if case.task == "tokens":
        x["input_ids"][:, 1::2] = x["input_ids"][:, :1]
    y = labels_for(case, x)
    if case.task == "image":
        y = (x["pixel_values"][:, 0].mean((1, 2)) > 0).long()

    class Examples(torch.utils.data.Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, k):
            return {**{name: value[k] for name, value in x.items()}, "labels": y[k]}

    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-2,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=SEED)
    return transformers.Trainer(model=model, args=args, train_dataset=Examples(), callbacks=list(callbacks))


@by_name(IN_PLACE)
def test_transformers_trainer_trains_the_injected_model_and_the_loss_falls(zoo, case, tmp_path):
    trainer = trainer_for(copy.deepcopy(zoo(case).injected), case, tmp_path, steps=12)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and np.mean(losses[-3:]) < np.mean(losses[:3]) * 0.9, losses
    assert type(trainer.model) is type(zoo(case).loaded) and len(sdsurgeon.gates(trainer.model)) == case.sites


@pytest.mark.hf
@pytest.mark.parametrize("name", ["llama", "bert"])
def test_trainer_save_model_writes_the_inference_model_plain_transformers_loads_and_sdsurgeon_resumes(zoo, name,
                                                                                                     tmp_path):
    """Issue 27's Trainer round trip, with inject's defaults: a transformers model is gated with inverted scaling
    (it brings its own save_pretrained), so the folder Trainer.save_model writes is the trained model for plain
    from_pretrained (no sdsurgeon), and sdsurgeon.load of it resumes with the same gates and weights."""
    case = CASES[name]
    saved = zoo(case)
    with warnings.catch_warnings():
        warnings.simplefilter("error", sdsurgeon.errors.UnscaledSaveWarning)
        model = sdsurgeon.inject(saved.loaded, P_L, seed=SEED, example_inputs=saved.example)
    assert model.sdsurgeon_recipe.scaling == "inverted"
    assert {g.scaling for g in sdsurgeon.gates(model)} == {"inverted"} and min(g.p for g in sdsurgeon.gates(model)) < 1
    trainer = trainer_for(model, case, tmp_path / "run", steps=6)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    model.eval()
    x = some_inputs(case, 3, 9, seed=96)
    trained = saved.original(model.state_dict()).eval()  # the plain architecture, the trained weights, by hand
    assert not torch.allclose(logits(trained, x), logits(saved.original().eval(), x))  # training moved them
    plain = getattr(transformers, case.cls).from_pretrained(tmp_path / "saved").eval()
    torch.testing.assert_close(logits(plain, x), logits(trained, x), **TOL)
    torch.testing.assert_close(logits(model, x), logits(trained, x), **TOL)  # inverted: eval runs x + f(x)
    back = sdsurgeon.load(tmp_path / "saved")
    assert type(back) is type(model)
    assert [(g.site_id, g.p, g.mode, g.scaling, g.seed) for g in sdsurgeon.gates(back)] == \
        [(g.site_id, g.p, g.mode, g.scaling, g.seed) for g in sdsurgeon.gates(model)]
    assert back.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())


@pytest.mark.hf
def test_paper_scaling_chosen_for_a_model_with_its_own_save_path_is_said_in_python_and_on_the_command_line(zoo, work):
    saved = zoo(CASES["bert"])
    with pytest.warns(sdsurgeon.errors.UnscaledSaveWarning, match="save_pretrained"):
        sdsurgeon.inject(saved.loaded, P_L, scaling="paper", example_inputs=saved.example)
    result = invoke("inject", *PAPER, saved.folder, *TOKENS, "-o", "p.sd.pt")
    assert_ok(result)
    assert "note: paper scaling on BertForSequenceClassification" in result.stderr and "paper scaling" in result.stdout
    quiet = invoke("inject", saved.folder, *TOKENS, "-o", "a.sd.pt")
    assert_ok(quiet)
    assert "note:" not in quiet.stderr and "inverted scaling" in quiet.stdout


@by_name([CASES["llama"]])
def test_schedule_callback_steps_the_gates_with_the_trainers_global_step(zoo, case, tmp_path):
    """inject's recorded warmup schedule, stepped by sdsurgeon.callbacks.schedule_callback in a Trainer: the p_l
    each step trains with are the hand-computed ones (no drops for 2 steps, then theta ramps to p_L over 3)."""
    from sdsurgeon.analysis.schedule import ScheduleSpec
    from sdsurgeon.callbacks import schedule_callback

    saved = zoo(case)
    spec = ScheduleSpec("warmup", P_L, "linear", warmup=2, ramp=3)
    model = sdsurgeon.inject(saved.loaded, P_L, seed=SEED, example_inputs=saved.example, schedule=spec)
    seen = []

    class Recorder(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append([g.p for g in sdsurgeon.gates(model)])

    trainer = trainer_for(model, case, tmp_path, steps=7, callbacks=[schedule_callback(), Recorder()])
    trainer.train()
    L = case.sites
    thetas = [1.0, 1.0, 1.0, 1 - (1 - P_L) / 3, 1 - 2 * (1 - P_L) / 3, P_L, P_L]
    expected = [[1 - l / L * (1 - theta) for l in range(1, L + 1)] for theta in thetas]
    assert len(seen) == 7
    for got, want in zip(seen, expected):
        assert got == pytest.approx(want)
    depths = [e["sd_expected_depth"] for e in trainer.state.log_history if "loss" in e]
    assert depths == pytest.approx([sum(p) for p in expected], abs=1e-4)


@by_name(IN_PLACE)
def test_save_pretrained_writes_a_folder_sdsurgeon_loads_back_with_the_same_gates(zoo, trained, case, tmp_path):
    model = trained(case).model
    model.save_pretrained(tmp_path / "gated")
    files = {p.name for p in (tmp_path / "gated").iterdir()}
    assert "model.safetensors" in files and not {f for f in files if f.endswith((".bin", ".pt", ".pkl"))}
    recorded = json.loads((tmp_path / "gated" / "config.json").read_text())["sdsurgeon"]
    assert [tuple(s) for s in recorded["sites"]] == [tuple(s) for s in model.sdsurgeon_recipe.sites]
    back = sdsurgeon.load(tmp_path / "gated")
    assert type(back) is type(model)
    assert [(g.site_id, g.p, g.mode, g.scaling) for g in sdsurgeon.gates(back)] == \
        [(g.site_id, g.p, g.mode, g.scaling) for g in sdsurgeon.gates(model)]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in back.state_dict().items())
    x = some_inputs(case, 3, 9, seed=95)
    torch.testing.assert_close(logits(back.eval(), x), logits(model.eval(), x), **TOL)
    # paper scaling (chosen here, warned at inject): plain transformers reads the ungated architecture with the
    # trained weights, unscaled; the Trainer test above has the default, whose folder is the inference model
    plain = getattr(transformers, case.cls).from_pretrained(tmp_path / "gated").eval()
    torch.testing.assert_close(logits(plain, x), logits(sdsurgeon.remove_gates(model), x), **TOL)


@pytest.mark.hf
def test_a_parallel_residual_layer_is_one_block_whose_body_is_both_paths():
    # GPT-NeoX with use_parallel_residual: x + attn(ln1(x)) + mlp(ln2(x)). One site per GPTNeoXLayer (the class
    # transformers builds it from), and in eval its branch is attention and MLP together, times p_l: checked
    # against the model's own dropouts after each path, scaled by hook.
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXLayer

    model = build(CASES["gpt_neox"]).eval()  # the zoo's (use_parallel_residual=True)
    assert model.config.use_parallel_residual
    ids = torch.randint(0, 97, (2, 8))
    layers = [m for m in model.modules() if isinstance(m, GPTNeoXLayer)]
    plan = sdsurgeon.plan(model, 0.5, example_inputs={"input_ids": ids})
    assert plan.num_sites == len(layers) == LAYERS and all(s.shortcut == "identity" for s in plan.sites)
    injected = sdsurgeon.inject(model, 0.5, scaling="paper", example_inputs={"input_ids": ids}).eval()
    reference = copy.deepcopy(model)
    for layer, p in zip([m for m in reference.modules() if isinstance(m, GPTNeoXLayer)], linear_ps(LAYERS, 0.5)):
        for end in (layer.post_attention_dropout, layer.post_mlp_dropout):
            end.register_forward_hook(lambda _m, _i, out, p=p: out * p)
    with torch.no_grad():
        got, want, unscaled = (m(input_ids=ids).logits for m in (injected, reference, model))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, unscaled, atol=1e-3)


# --- issue 29: layers that return their attention weights whatever output_attentions says -----------------------


def _falcon():
    config = transformers.FalconConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       parallel_attn=True, new_decoder_architecture=False)
    return transformers.FalconForCausalLM(config).eval()


def _bloom():
    return transformers.BloomForCausalLM(transformers.BloomConfig(vocab_size=97, hidden_size=32, n_layer=2, n_head=2)).eval()


@pytest.mark.hf
@pytest.mark.parametrize("build, sites, cache", [(_falcon, 2, True), (_bloom, 4, False)], ids=["falcon", "bloom"])
def test_layers_returning_attention_weights_nobody_asked_for_are_rewritten_in_place_and_generate(build, sites, cache):
    """Falcon's and BLOOM's layers return ``(output, attn_weights)`` unconditionally; their stacks drop the weights
    unless ``output_attentions``. The layers are the owners; the model keeps its class and ``generate``. (BLOOM's
    attention traces only with ``layer_past`` fixed to None: it generates without a cache.)"""
    torch.manual_seed(0)
    model = build()
    x = {"input_ids": torch.randint(0, 90, (2, 12))}
    injected = sdsurgeon.inject(copy.deepcopy(model), 1.0, example_inputs=x)
    assert type(injected) is type(model) and len(injected.sdsurgeon_recipe.sites) == sites
    assert {p for p, _ in sdsurgeon.surgery.install.rewritten(injected)} == {"transformer.h.0", "transformer.h.1"}
    for training in (True, False):
        injected.train(training), model.train(training)
        with torch.random.fork_rng():
            torch.manual_seed(3)
            got = injected(**x, use_cache=False).logits
        with torch.random.fork_rng():
            torch.manual_seed(3)
            torch.testing.assert_close(got, model(**x, use_cache=False).logits, rtol=1e-4, atol=1e-5)
    injected.eval(), model.eval()
    settings = dict(max_new_tokens=3, do_sample=False, use_cache=cache)
    assert torch.equal(injected.generate(**x, **settings), model.generate(**x, **settings))
    # weights the stack dropped are not computed: asked for after all, they are what the original gives where it gives
    # None (Falcon's SDPA attention), and fail in one line at use where it gives tensors (BLOOM's eager attention)
    attentions = injected(**x, use_cache=False, output_attentions=True).attentions
    original = model(**x, use_cache=False, output_attentions=True).attentions
    if all(a is None for a in original):
        assert all(a is None for a in attentions)
    else:
        with pytest.raises(sdsurgeon.errors.DroppedOutputError, match="output_attentions=True"):
            torch.stack(list(attentions))
