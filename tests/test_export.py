"""ONNX export and onnxruntime verification: hand-scaled references, node counts, clean graphs, failures."""

import copy
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from sdsurgeon import export_onnx, fold, inject, remove_gates, verify
from sdsurgeon.errors import ExportError, VerificationError
from sdsurgeon.deploy.export import RANDOM_OPS
from sdsurgeon.deploy.verify import export_verified
from sdsurgeon.models import vit
from zoo import POSITIVE, ZOO, linear_ps

pytestmark = pytest.mark.onnx  # every test here exports

EXPORTABLE = [e for e in POSITIVE if e.name != "data_dependent_top" and not e.kept_multiply]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _ort(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def _op_types(path) -> Counter:
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


def test_resnet_onnx_matches_a_hand_scaled_reference_at_two_batch_sizes(tmp_path):
    entry = next(e for e in ZOO if e.name == "cifar_resnet20")
    model = entry.build().eval()
    injected = inject(model, 0.5)
    export_onnx(fold(injected), entry.inputs(), tmp_path / "r.onnx")
    reference = copy.deepcopy(model)
    entry.scale(reference, linear_ps(entry.num_sites, 0.5))  # each block's last BN output times p_l, by hook
    for batch in (2, 5):
        x = torch.randn(batch, 3, 16, 16)
        (got,) = _ort(tmp_path / "r.onnx", x)
        with torch.no_grad():
            expected = reference(x).numpy()
            unscaled = model(x).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        assert not np.allclose(got, unscaled, rtol=1e-4, atol=1e-5)


def test_vit_onnx_matches_weights_scaled_by_hand(tmp_path):
    model = vit(image_size=16, dim=32, depth=3, heads=2).eval()
    x = torch.randn(2, 3, 16, 16)
    injected = inject(model, 0.5, example_inputs=x)
    folded = export_onnx(fold(injected), x, tmp_path / "v.onnx")
    assert folded.nodes <= export_onnx(model, x, tmp_path / "original.onnx").nodes  # the model as its author wrote it
    # by hand: attention's proj and the MLP's fc2 end each residual branch; scale them by p_l
    reference = copy.deepcopy(model)
    ps = iter(linear_ps(6, 0.5))
    with torch.no_grad():
        for block in reference.blocks:
            for layer in (block.proj, block.fc2):
                p = next(ps)
                layer.weight.mul_(p)
                layer.bias.mul_(p)
    for batch in (2, 3):
        x = torch.randn(batch, 3, 16, 16)
        (got,) = _ort(tmp_path / "v.onnx", x)
        with torch.no_grad():
            np.testing.assert_allclose(got, reference(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("entry", EXPORTABLE, ids=lambda e: e.name)
def test_folded_export_is_clean_verified_and_no_bigger_than_the_original(entry, tmp_path):
    model = entry.build().eval()
    inputs = entry.inputs()
    injected = inject(model, 0.5)
    folded = export_onnx(fold(injected), inputs, tmp_path / "folded.onnx")
    multiplied = export_onnx(fold(injected, into_weights=False), inputs, tmp_path / "mul.onnx")
    ungated = export_onnx(remove_gates(injected), inputs, tmp_path / "ungated.onnx")
    assert not set(_op_types(tmp_path / "folded.onnx")) & RANDOM_OPS
    assert folded.nodes <= ungated.nodes
    assert folded.scale_nodes == 0 and multiplied.scale_nodes == entry.num_sites
    # (no node-count difference beyond the Muls: the folded model runs its own code again, the multiplied
    # one its traced graph, whose shape reads export differently)
    assert _op_types(tmp_path / "mul.onnx")["Mul"] - _op_types(tmp_path / "folded.onnx")["Mul"] == entry.num_sites
    result = verify(injected, tmp_path / "folded.onnx", inputs)
    assert result.ok and result.max_abs < 1e-4


def test_export_is_silent_and_the_batch_axis_is_dynamic(tmp_path, capfd):
    model = vit(image_size=16, dim=32, depth=2, heads=2)
    x = torch.randn(1, 3, 16, 16)  # a batch of 1 still gives a dynamic batch axis
    result = export_onnx(fold(inject(model, 0.5)), x, tmp_path / "v.onnx")
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""
    assert result.dynamic_inputs == ["x"]
    static = export_onnx(model, x, tmp_path / "s.onnx", dynamic_batch=False)
    assert static.dynamic_inputs == []
    dim = onnx.load(str(tmp_path / "s.onnx")).graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_value == 1


def test_verification_miss_raises_and_leaves_no_file(tmp_path):
    entry = next(e for e in ZOO if e.name == "plus")
    model = entry.build().eval()
    injected = inject(model, 0.5)
    target = tmp_path / "m.onnx"
    # ONNX of the folded model checked against the unscaled original: a real mismatch
    with pytest.raises(VerificationError, match="onnxruntime differs") as info:
        export_verified(fold(injected), entry.inputs(), target, reference=model)
    assert not info.value.result.ok and info.value.result.max_abs > 1e-3
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
    export_verified(fold(injected), entry.inputs(), target, reference=injected)
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert not verify(model, target, entry.inputs(), check=False).ok


def test_a_model_torch_export_cannot_capture_fails_in_one_line(tmp_path):
    entry = next(e for e in ZOO if e.name == "data_dependent_top")
    with pytest.raises(ExportError, match="torch.onnx.export failed") as info:
        export_onnx(fold(inject(entry.build(), 0.5)), entry.inputs(), tmp_path / "d.onnx")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
