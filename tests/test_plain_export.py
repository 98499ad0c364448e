"""export --format safetensors: the folded model shipped as its own architecture's weights, loaded without sdsurgeon."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_model

from cli_helpers import assert_ok, assert_user_error, invoke
from sdsurgeon import inject
from sdsurgeon.errors import ConfigError
from sdsurgeon.models import cifar_resnet
from sdsurgeon.pipeline import ConvertOptions, convert
from zoo import POSITIVE, linear_ps

WITH_REFERENCE = [e for e in POSITIVE if e.scale is not None and not e.kept_multiply]
ARCH = ["--arch", "sdsurgeon.models:cifar_resnet", "--arch-kwargs", '{"depth": 8}']


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("entry", WITH_REFERENCE, ids=lambda e: e.name)
def test_the_safetensors_file_is_the_hand_scaled_original_architecture(entry, tmp_path):
    torch.manual_seed(0)
    model = entry.build().eval()
    path = tmp_path / "plain.safetensors"
    injected = inject(model, 0.5, example_inputs=entry.inputs())
    result = convert(injected, ConvertOptions(format="safetensors"), output=path)
    assert result.checked.ok and path.is_file()
    plain = copy.deepcopy(model)  # the user's architecture, no sdsurgeon in it
    load_model(plain, str(path))
    reference = copy.deepcopy(model)
    entry.scale(reference, linear_ps(entry.num_sites, 0.5))
    inputs = entry.inputs()
    with torch.no_grad():
        torch.testing.assert_close(_first(plain.eval()(*inputs)), _first(reference(*inputs)), rtol=1e-5, atol=1e-5)


def test_cli_safetensors_from_an_arch_loads_into_a_fresh_factory_model(work):
    assert_ok(invoke("inject", *ARCH, "--input-shape", "2,3,16,16", "-o", "r.sd.pt"))
    record = json.loads(invoke("export", "r.sd.pt", "--format", "safetensors", "--json").stdout)
    assert record["format"] == "safetensors" and record["verify"]["ok"] and record["folded"] == record["gates"] == 3
    assert record["output"] == "r.safetensors"
    import sdsurgeon

    injected = sdsurgeon.load("r.sd.pt").eval()
    plain = cifar_resnet(depth=8).eval()
    load_model(plain, "r.safetensors")
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(plain(x), injected(x))


@pytest.mark.parametrize("extra", [["--no-fold"], ["--drop", "1"]], ids=["no-fold", "drop"])
def test_what_the_architecture_does_not_compute_is_refused_in_one_line(work, extra):
    assert_ok(invoke("inject", *ARCH, "--input-shape", "2,3,16,16", "-o", "r.sd.pt"))
    line = assert_user_error(invoke("export", "r.sd.pt", "--format", "safetensors", *extra))
    assert "use --format onnx" in line
    assert not list(work.glob("*.safetensors"))


def test_a_kept_multiply_is_refused_naming_the_sites(tmp_path):
    entry = next(e for e in POSITIVE if e.kept_multiply)
    injected = inject(entry.build().eval(), 0.5, example_inputs=entry.inputs())
    path = tmp_path / "m.safetensors"
    with pytest.raises(ConfigError, match="kept multiply") as info:
        convert(injected, ConvertOptions(format="safetensors"), output=path)
    assert injected.sdsurgeon_recipe.sites[0][0] in str(info.value)
    assert not path.exists() and not list(tmp_path.iterdir())


def test_hf_format_needs_a_transformers_model_and_a_folder(work):
    assert_ok(invoke("inject", *ARCH, "--input-shape", "2,3,16,16", "-o", "r.sd.pt"))
    assert "not come from transformers" in assert_user_error(invoke("export", "r.sd.pt", "--format", "hf"))
    assert "unknown --format" in assert_user_error(invoke("export", "r.sd.pt", "--format", "tflite"))
    assert "must end in .safetensors" in assert_user_error(
        invoke("export", "r.sd.pt", "--format", "safetensors", "-o", "x.onnx"))
    assert sorted(p.name for p in work.iterdir()) == ["r.sd.pt"]


def test_the_pipeline_works_on_the_model_it_loaded_and_lets_it_go_before_loading_back(work, monkeypatch):
    """Memory (issue 27 item 5): inject writes the very model it loaded, not a deep copy of it; export folds the
    model it loaded in place and drops it before loading back what it wrote, so one model's weights are held at a
    time. The check is still against the gated model (its outputs, recorded before the fold)."""
    import weakref
    from pathlib import Path

    from sdsurgeon import pipeline
    from sdsurgeon.capture.inputs import InputSpec

    loaded, saved, alive_at_load_back = [], [], []
    real_load, real_save, real_load_plain = pipeline.ModelRef.load_recorded, pipeline.save, pipeline.load_plain

    def load_recorded(self):  # what inject loads (ModelRef.load) and export folds from its records
        model, recipe = real_load(self)
        loaded.append(weakref.ref(model))
        return model, recipe

    def load_plain(*args):  # no gc.collect() here: the pipeline's own (a gated block's graph is a cycle)
        alive_at_load_back.append(loaded[-1]() is not None)
        return real_load_plain(*args)

    monkeypatch.setattr(pipeline.ModelRef, "load_recorded", load_recorded)
    monkeypatch.setattr(pipeline, "save", lambda model, path, **kw: saved.append(model is loaded[-1]()) or real_save(model, path, **kw))
    monkeypatch.setattr(pipeline, "load_plain", load_plain)
    ref = pipeline.ModelRef(arch="sdsurgeon.models:cifar_resnet", arch_kwargs={"depth": 8})
    pipeline.inject(ref, inputs=[InputSpec.parse("x:2,3,16,16")], output=Path("r.sd.pt"))
    assert len(loaded) == 1 and saved == [True]  # the loaded model itself was gated and written
    result = pipeline.convert(pipeline.ModelRef(Path("r.sd.pt")), ConvertOptions(format="safetensors"),
                              output=Path("r.safetensors"))
    assert result.checked.ok and len(result.checked.batch_sizes) == 3
    assert len(loaded) == 2 and alive_at_load_back == [False]  # the model export loaded, freed before the load back


class _Constant(torch.nn.Module):
    """Gives ``value`` whatever its input: outputs known exactly, whatever inputs a check draws."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value

    def forward(self, x):
        return self.value + 0 * x.sum()


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_check_of_an_output_larger_than_a_chunk_finds_the_worst_element_wherever_it_is(monkeypatch, where):
    """The check compares outputs in float64 a chunk at a time (an LM's logits are never copied whole): its errors are
    those computed over the whole tensors at once here, and one element out of tolerance fails it in any chunk."""
    from sdsurgeon.deploy import verify

    monkeypatch.setattr(verify, "CHUNK", 1000)
    expected = torch.linspace(-5, 5, 5002)  # 5 chunks of 1000 and one of 2
    got = expected.clone()
    got[{"first": 3, "middle": 2777, "last": -1}[where]] += 0.5
    got[1234] += 0.001
    rtol, atol = 1e-4, 1e-5
    result = verify.verify_module(_Constant(expected), _Constant(got), (torch.zeros(2, 3),), what="it", kept="",
                                  rtol=rtol, atol=atol, check=False)
    e64, g64 = expected.double(), got.double()
    diff = (g64 - e64).abs()
    out = result.outputs[0]
    assert not result.ok
    assert out.max_abs == float(diff.max())
    assert out.tolerance_used == pytest.approx(float((diff / (atol + rtol * e64.abs())).max()), rel=1e-12)
    assert out.max_rel == pytest.approx(float(diff.max()) / 5.0, rel=1e-12)
    good = verify.verify_module(_Constant(expected), _Constant(expected.clone()), (torch.zeros(2, 3),), what="it",
                                kept="", rtol=rtol, atol=atol, check=False)
    assert good.ok and good.outputs[0].max_abs == 0.0


def test_a_nan_in_the_last_chunk_of_the_other_side_alone_fails_the_check(monkeypatch):
    from sdsurgeon.deploy import verify

    monkeypatch.setattr(verify, "CHUNK", 1000)
    expected = torch.linspace(-5, 5, 4321)
    got = expected.clone()
    got[-1] = float("nan")
    result = verify.verify_module(_Constant(expected), _Constant(got), (torch.zeros(2, 3),), what="it", kept="",
                                  check=False)
    assert not result.ok and result.outputs[0].max_abs == float("inf")
