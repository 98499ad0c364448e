"""Folding a recorded surgery from its site records (export --fold of an .sd.pt): no gate built, nothing
installed, the same fold as the gated model's, checked against hand-scaled copies of the model."""

import copy
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
