"""Folding a recorded surgery from its site records (export --fold of an .sd.pt): no gate built, nothing
installed, the same fold as the gated model's, checked against hand-scaled copies of the model."""

import copy
import json
import pickle

import pytest
import torch

from sdsurgeon import fold_with_report, inject
from sdsurgeon.capture.inputs import InputSpec, normalize_inputs
from sdsurgeon.gate import StochasticDepth
from sdsurgeon.surgery import install as in_place
from sdsurgeon.surgery import fold as fold_module
from sdsurgeon.surgery.inject import fold_recipe
from sdsurgeon.surgery.recipe import RECIPE_ATTR, Recipe
from zoo import POSITIVE, linear_ps

WITH_REFERENCE = [e for e in POSITIVE if e.scale is not None]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.fixture
def gates_built(monkeypatch):
    """Every StochasticDepth gate built while the test runs, and every graph installed on a module."""
    built: list = []
    init, install = StochasticDepth.__init__, in_place.install

    def counted_init(self, *args, **kwargs):
        built.append("gate")
        init(self, *args, **kwargs)

    def counted_install(*args, **kwargs):
        built.append("install")
        return install(*args, **kwargs)

    monkeypatch.setattr(StochasticDepth, "__init__", counted_init)
    monkeypatch.setattr(in_place, "install", counted_install)
    return built


@pytest.mark.parametrize("entry", WITH_REFERENCE, ids=lambda e: e.name)
def test_folded_from_records_equals_the_hand_scaled_model_and_builds_no_gate(entry, gates_built):
    torch.manual_seed(0)
    model = entry.build().eval()
    inputs = entry.inputs()
    injected = inject(model, 0.5, example_inputs=inputs)
    recipe = getattr(injected, RECIPE_ATTR)
    _, gated_report = fold_with_report(injected)
    reference = copy.deepcopy(model)  # an independent reference: each branch's producer scaled by hand
    entry.scale(reference, linear_ps(entry.num_sites, 0.5))
    gates_built.clear()

    fresh = copy.deepcopy(model)  # the architecture holding the trained weights, as sdfile.load_recorded gives it
    folded, report, none = fold_recipe(fresh, recipe, examples=normalize_inputs(inputs))

    assert "gate" not in gates_built and none is None
    # the same rules as the gated model's fold, site by site (one fold, not a second copy of it)
    assert [s.to_dict() for s in report.sites] == [s.to_dict() for s in gated_report.sites]
    if report.ungated_ops:  # every owner runs its own code again: no graph was ever installed on it
        assert gates_built == [] and not in_place.rewritten(folded)
    # verify's reference: the recipe computed with a multiply per site, on a copy whose weights stay unscaled
    _, _, twin = fold_recipe(copy.deepcopy(model), recipe, examples=normalize_inputs(inputs), reference=True)
    assert "gate" not in gates_built
    with torch.no_grad():
        got, expected, unscaled = (_first(m(*inputs)) for m in (folded, reference, model))
        recomputed = _first(twin(*inputs))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recomputed, expected, rtol=1e-5, atol=1e-5)  # verify's reference: x + p f(x)
    assert not torch.allclose(got, unscaled), "the reference must differ from the unscaled model"


def _resnet_file(tmp_path):
    import sdsurgeon
    from archs import tiny_resnet

    torch.manual_seed(0)
    model = tiny_resnet(blocks=3)
    path = tmp_path / "m.sd.pt"
    sdsurgeon.save(inject(model, 0.5, inputs=[InputSpec(None, (2, 8))], seed=0), path, arch="archs:tiny_resnet",
                   arch_kwargs={"blocks": 3})
    return model, path


@pytest.mark.onnx
def test_export_of_an_sd_file_builds_no_gate_and_matches_the_hand_scaled_model(tmp_path, gates_built):
    import onnxruntime as ort

    from sdsurgeon import pipeline

    model, path = _resnet_file(tmp_path)
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for block, p in zip(reference.blocks, linear_ps(3, 0.5)):
            block.fc2.weight.mul_(p)
            block.fc2.bias.mul_(p)
    gates_built.clear()
    result = pipeline.convert(pipeline.ModelRef(path), pipeline.ConvertOptions(compare=True),
                              output=tmp_path / "m.onnx")
    # no gate built; a graph installed only on verify's reference (a multiply per block): no climb back up
    assert "gate" not in gates_built and gates_built.count("install") == 3
    assert len(result.report.folded) == 3 and result.checked.ok
    assert result.original_nodes == result.exported.nodes
    x = torch.randn(5, 8)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        torch.testing.assert_close(got, reference(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got, model.eval()(x), atol=1e-3)


@pytest.mark.onnx
def test_a_fold_into_the_wrong_weights_fails_verify_against_the_recipes_reference(tmp_path, monkeypatch):
    """The reference verify runs on is the recipe with a multiply per site, not the weights the fold scaled:
    a fold that scales twice is caught."""
    from sdsurgeon import pipeline
    from sdsurgeon.errors import VerificationError

    _, path = _resnet_file(tmp_path)
    scale = fold_module._scale

    def twice(gm, graph, site, env, out, into_weights, scale_, prefix):
        record, value = scale(gm, graph, site, env, out, into_weights, scale_, prefix)
        with torch.no_grad():
            for name in record.params:
                fold_module.resolve(gm, name.removeprefix(prefix + ".") if prefix else name).mul_(site.p)
        return record, value

    monkeypatch.setattr(fold_module, "_scale", twice)
    with pytest.raises(VerificationError):
        pipeline.convert(pipeline.ModelRef(path), pipeline.ConvertOptions(), output=tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_recipe_pickled_with_its_drawn_examples_loads_without_them():
    recipe = Recipe(sites=[("blocks.0:add", 0.75)], inputs=[InputSpec(None, (2, 8))])
    recipe.__dict__["_examples"] = ([InputSpec(None, (2, 8))], ((torch.zeros(2, 8),), {}))  # as older versions kept
    loaded = pickle.loads(pickle.dumps(recipe))
    assert "_examples" not in loaded.__dict__
    assert loaded == recipe and loaded.to_dict() == recipe.to_dict()
    fresh = pickle.loads(pickle.dumps(Recipe(sites=[("a:add", 0.5)])))
    assert "_examples" not in fresh.__dict__


def test_injecting_keeps_no_drawn_tensor_on_the_recipe():
    from archs import tiny_resnet

    injected = inject(tiny_resnet(), 0.5, inputs=[InputSpec(None, (2, 8))])
    recipe = getattr(injected, RECIPE_ATTR)
    assert not any(isinstance(v, (tuple, torch.Tensor)) for k, v in vars(recipe).items() if k.startswith("_"))


# --- export --format safetensors / hf of a recorded surgery: folded from its records too, no gate built ------------

CIFAR = {"depth": 20, "width": 4}
LLAMA_LAYERS = 2  # two sites each (attention, MLP): one owner each


def _cifar_file(folder, scaling: str):
    """A CIFAR ResNet-20 (the factory --arch names) injected at p_L = 0.5 and saved as an .sd.pt; the model it
    was injected from (its weights: the file's), with random BN statistics so no branch ends in a no-op."""
    import sdsurgeon
    from sdsurgeon.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(**CIFAR).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0)
    injected = inject(copy.deepcopy(model), 0.5, inputs=[InputSpec(None, (2, 3, 16, 16))], scaling=scaling, seed=0)
    path = folder / "r.sd.pt"
    sdsurgeon.save(injected, path, arch="sdsurgeon.models:cifar_resnet", arch_kwargs=CIFAR)
    return model, path


def _llama_source(folder, scaling: str, source: str, dtype=torch.float32, **early_exit):
    """A tiny Llama (2 layers, 4 sites) saved with save_pretrained, injected at p_L = 0.5 and saved as an .sd.pt or
    (``source="folder"``) by the injected model's own save_pretrained; the model it was injected from."""
    import sdsurgeon
    from sdsurgeon.capture.hf_inputs import complete_specs
    from test_early_exit import llama

    original = llama(LLAMA_LAYERS).to(dtype)
    original.save_pretrained(folder / "original")
    loaded = sdsurgeon.load(folder / "original")
    specs = complete_specs(loaded, [InputSpec.parse("input_ids:2,12:int64")])
    injected = inject(loaded, 0.5, inputs=specs, scaling=scaling, seed=0, **early_exit)
    if source == "folder":
        injected.save_pretrained(folder / "injected")
        return original, folder / "injected"
    sdsurgeon.save(injected, folder / "m.sd.pt")
    return original, folder / "m.sd.pt"


def _scale_llama(model, ps):
    """Each layer's attention and MLP branch ends (o_proj, down_proj: no bias) times its p_l, in site order."""
    ends = [m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]
    assert len(ends) == len(ps) and all(m.bias is None for m in ends)
    with torch.no_grad():
        for end, p in zip(ends, ps):
            end.weight.mul_(p)
    return model


def _export(path, fmt, out):
    from sdsurgeon import pipeline

    return pipeline.convert(pipeline.ModelRef(path), pipeline.ConvertOptions(format=fmt), output=out)


@pytest.mark.parametrize("scaling", ["paper", "inverted"])
def test_export_safetensors_of_an_sd_file_builds_no_gate_and_is_the_hand_scaled_resnet(tmp_path, gates_built,
                                                                                       scaling):
    from safetensors.torch import load_model

    from sdsurgeon.models import cifar_resnet
    from zoo import _scale_cifar

    model, path = _cifar_file(tmp_path, scaling)
    gates_built.clear()
    result = _export(path, "safetensors", tmp_path / "r.safetensors")
    assert "gate" not in gates_built and result.checked.ok
    # paper: verify's reference (the recipe with a multiply per site) is a twin, one graph per block; inverted:
    # the model's own outputs, nothing installed anywhere
    assert gates_built == (["install"] * 9 if scaling == "paper" else [])
    assert len(result.report.sites) == 9 and result.report.ungated_ops
    plain = cifar_resnet(**CIFAR).eval()  # the user's architecture, no sdsurgeon in it
    load_model(plain, str(tmp_path / "r.safetensors"))
    reference = copy.deepcopy(model)  # independent: each block's branch output times p_l, by hook
    if scaling == "paper":  # inverted: the trained weights are the inference model
        _scale_cifar(reference, linear_ps(9, 0.5))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(plain(x), reference(x), rtol=1e-5, atol=1e-5)
        assert (scaling == "paper") != torch.allclose(plain(x), model(x), atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("scaling", ["paper", "inverted"])
@pytest.mark.parametrize("fmt,source", [("hf", "sd.pt"), ("hf", "folder"), ("safetensors", "sd.pt")])
def test_export_hf_and_safetensors_of_a_recorded_llama_build_no_gate_and_are_the_hand_scaled_model(
        tmp_path, gates_built, scaling, fmt, source):
    import transformers
    from safetensors.torch import load_model

    from test_early_exit import tokens

    original, path = _llama_source(tmp_path, scaling, source)
    gates_built.clear()
    out = tmp_path / ("plain" if fmt == "hf" else "plain.safetensors")
    result = _export(path, fmt, out)
    assert "gate" not in gates_built and result.checked.ok and len(result.report.sites) == 2 * LLAMA_LAYERS
    assert gates_built == (["install"] * LLAMA_LAYERS if scaling == "paper" else [])  # on the twin's layers alone
    if fmt == "hf":
        plain = transformers.LlamaForCausalLM.from_pretrained(out).eval()  # transformers alone
        assert "sdsurgeon" not in json.loads((out / "config.json").read_text())
    else:
        plain = transformers.LlamaForCausalLM(original.config).eval()
        load_model(plain, str(out))
    reference = copy.deepcopy(original)
    if scaling == "paper":
        _scale_llama(reference, linear_ps(2 * LLAMA_LAYERS, 0.5))
    x = tokens(3, 9, seed=5)
    with torch.no_grad():
        got = plain(input_ids=x).logits
        torch.testing.assert_close(got, reference(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        assert (scaling == "paper") != torch.allclose(got, original(input_ids=x).logits, atol=1e-4)


@pytest.mark.hf
@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_a_bfloat16_recorded_llama_exports_bfloat16_from_its_records(tmp_path, gates_built, fmt):
    import transformers
    from safetensors.torch import load_file

    original, path = _llama_source(tmp_path, "paper", "sd.pt", dtype=torch.bfloat16)
    gates_built.clear()
    out = tmp_path / ("plain" if fmt == "hf" else "plain.safetensors")
    result = _export(path, fmt, out)
    assert "gate" not in gates_built and result.checked.ok and result.checked.precision == "bfloat16"
    if fmt == "hf":
        plain = transformers.LlamaForCausalLM.from_pretrained(out)
        assert plain.dtype == torch.bfloat16 and {p.dtype for p in plain.parameters()} == {torch.bfloat16}
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    else:
        assert {t.dtype for t in load_file(out).values()} == {torch.bfloat16}
        plain = transformers.LlamaForCausalLM(original.config).to(torch.bfloat16)
        from safetensors.torch import load_model

        load_model(plain, str(out))
    reference = _scale_llama(copy.deepcopy(original), linear_ps(2 * LLAMA_LAYERS, 0.5))  # scaled in bf16, as the fold
    with torch.no_grad():  # within bf16's rounding (a p computed in another order may round a weight the other way)
        x = torch.arange(12).reshape(2, 6) % 97
        torch.testing.assert_close(plain.eval()(input_ids=x).logits, reference.eval()(input_ids=x).logits,
                                   rtol=1.6e-2, atol=1e-2)


@pytest.mark.hf
@pytest.mark.parametrize("source", ["sd.pt", "folder"])
def test_export_hf_from_records_takes_the_early_exit_off(tmp_path, gates_built, source):
    """As the gated fold does (surgery.fold._untag): the folder written is the plain model, whose loss with labels is
    the task loss alone, and which sdsurgeon loads back with no recipe and no early exit."""
    import sdsurgeon
    import transformers

    from sdsurgeon.surgery.early_exit import EARLY_EXIT_ATTR
    from test_early_exit import tokens

    original, path = _llama_source(tmp_path, "paper", source, early_exit=True, exit_layers=[0])
    gates_built.clear()
    result = _export(path, "hf", tmp_path / "plain")
    assert "gate" not in gates_built and result.checked.ok
    assert "sdsurgeon" not in json.loads((tmp_path / "plain" / "config.json").read_text())
    again = sdsurgeon.load(tmp_path / "plain")
    assert not hasattr(again, RECIPE_ATTR) and not hasattr(again, EARLY_EXIT_ATTR)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "plain")
    reference = _scale_llama(copy.deepcopy(original), linear_ps(2 * LLAMA_LAYERS, 0.5))
    x = tokens(2, 10, seed=3)
    plain.train(), reference.train()  # trained with labels: the task loss alone, no exit term
    torch.testing.assert_close(plain(input_ids=x, labels=x).loss, reference(input_ids=x, labels=x).loss)
    torch.testing.assert_close(again.train()(input_ids=x, labels=x).loss, reference(input_ids=x, labels=x).loss)
