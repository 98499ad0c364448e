"""Surgery in place: the injected model keeps its class, its methods and its own code outside the blocks."""

import copy
import io

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

import sdsurgeon
from sdsurgeon import fold, gates, inject, plan
from sdsurgeon.surgery import install as in_place
from sdsurgeon.cli import app
from zoo import POSITIVE, PlusBlock


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _outermost_site_modules(model) -> set[str]:
    """The module paths that the gates' site ids name, nested ones left out: where the adds are written."""
    paths = {g.site_id.rpartition(":")[0] for g in gates(model)}
    return {p for p in paths if not any(q != p and (not q or p.startswith(q + ".")) for q in paths)}


@pytest.mark.parametrize("entry", POSITIVE, ids=lambda e: e.name)
def test_only_the_modules_that_own_the_adds_change_and_the_model_keeps_its_class(entry):
    model = entry.build()
    injected = inject(model, 0.5)
    assert type(injected) is type(model)
    assert list(injected.state_dict()) == list(model.state_dict())
    assert {path for path, _ in in_place.rewritten(injected)} == _outermost_site_modules(injected)
    for path, before in model.named_modules():
        assert type(injected.get_submodule(path)) is type(before), path
    assert not any(isinstance(m, fx.GraphModule) for m in injected.modules())


class Classifier(nn.Module):
    """A user's model: Python control flow on an optional argument around its residual blocks, and methods."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.stem = nn.Linear(4, d)
        self.blocks = nn.ModuleList(PlusBlock(d) for _ in range(3))
        self.head = nn.Linear(d, classes)

    def features(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return h

    def forward(self, x, labels=None):
        logits = self.head(self.features(x))
        if labels is None:
            return logits
        return F.cross_entropy(logits, labels)

    def reset_classifier(self, classes):
        self.head = nn.Linear(self.head.in_features, classes)


def _hand_scaled(model, ps):
    reference = copy.deepcopy(model)
    for block, p in zip(reference.blocks, ps):
        block.scale = p
    return reference.eval()


def test_the_users_own_forward_runs_around_the_blocks_optional_arguments_and_methods_included():
    model = Classifier()
    injected = inject(model, 0.5)
    assert isinstance(injected, Classifier)
    assert {p for p, _ in in_place.rewritten(injected)} == {"blocks.0", "blocks.1", "blocks.2"}
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])
    reference = _hand_scaled(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    injected.eval()
    torch.testing.assert_close(injected(x), reference(x))  # no labels: logits, as the user's code says
    torch.testing.assert_close(injected(x, labels=y), reference(x, labels=y))  # labels: the user's loss
    torch.testing.assert_close(injected.features(x), reference.features(x))
    injected.reset_classifier(7)
    assert injected(x).shape == (5, 7)


def test_a_block_called_twice_is_rewritten_with_its_caller_which_keeps_its_class():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = PlusBlock(8)
            self.other = PlusBlock(8)

        def forward(self, x):
            return self.other(self.block(self.block(x)))

        def tag(self):
            return "mine"

    model = Twice()
    injected = inject(model, 0.5)
    assert type(injected) is Twice and injected.tag() == "mine"
    # the shared block's two calls are two sites: rewriting the block alone would gate both calls alike
    assert [p for p, _ in in_place.rewritten(injected)] == [""]
    assert len(gates(injected)) == 3
    assert [r["how"] for r in plan(model).to_dict()["rewrites"]] == ["part"]


def test_a_block_module_survives_pickling_copying_and_moving():
    model = Classifier()
    injected = inject(model, 0.5)
    buffer = io.BytesIO()
    torch.save(injected, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    for copy_ in (loaded, copy.deepcopy(injected)):
        assert isinstance(copy_, Classifier)
        forward = in_place.graph_forward(copy_.blocks[0])
        assert forward is not None and forward.owner is copy_.blocks[0]  # bound to the copy, not the original
        assert forward.graph is not None  # an unpickled one is traced back from its code
    doubled = loaded.double().eval()
    x = torch.randn(3, 4, dtype=torch.float64)
    reference = _hand_scaled(model, [p for _, p in injected.sdsurgeon_recipe.sites]).double()
    torch.testing.assert_close(doubled(x), reference(x))
    # the unpickled gates still draw afresh: training calls differ
    loaded.train()
    outs = {tuple(loaded(x).flatten().tolist()) for _ in range(12)}
    assert len(outs) > 1


def test_fold_gives_back_the_users_class_running_its_own_code():
    model = Classifier()
    folded = fold(inject(model, 0.5))
    assert type(folded) is Classifier and not in_place.rewritten(folded)
    assert not gates(folded)
    # the plain model with the folded weights, loaded without sdsurgeon, is the folded model
    plain = Classifier().eval()
    plain.load_state_dict(folded.state_dict())
    x = torch.randn(4, 4)
    torch.testing.assert_close(plain(x), folded(x))


def test_under_an_aten_capture_blocks_are_rewritten_on_the_calls_they_receive_and_plan_says_so():
    model = Classifier()
    injected = inject(model, 0.5, capture="export", example_inputs=torch.randn(2, 4))
    assert type(injected) is Classifier and injected.sdsurgeon_recipe.capture == "export"
    assert [path for path, _ in in_place.rewritten(injected)] == [f"blocks.{k}" for k in range(3)]
    x = torch.randn(5, 4)  # another batch size than the example's
    reference = _hand_scaled(model, [p for _, p in injected.sdsurgeon_recipe.sites])
    torch.testing.assert_close(injected.eval()(x), reference(x))
    record = plan(model, capture="export", example_inputs=torch.randn(2, 4)).to_dict()
    assert [r["how"] for r in record["rewrites"]] == ["block"] * 3


class OwnAdds(nn.Module):
    """A model whose own forward holds its residual adds: no narrower module to rewrite."""

    def __init__(self, d=8):
        super().__init__()
        self.f, self.g = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        x = x + self.f(x)
        return x + self.g(x)


def test_an_aten_capture_of_a_model_that_owns_its_adds_replaces_it_whole_and_plan_says_so():
    model = OwnAdds()
    injected = inject(model, 0.5, capture="export", example_inputs=torch.randn(2, 8))
    assert isinstance(injected, fx.GraphModule)
    record = plan(model, capture="export", example_inputs=torch.randn(2, 8)).to_dict()
    assert [r["how"] for r in record["rewrites"]] == ["whole model"]


def test_plan_says_which_modules_it_rewrites(tmp_path):
    path = tmp_path / "classifier.pt"
    torch.save(Classifier(), path)
    result = CliRunner().invoke(app, ["plan", str(path), "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert "surgery: 3 block(s) (PlusBlock) rewritten in place; the rest runs its own code" in result.output
    result = CliRunner().invoke(app, ["plan", str(path), "--trust-pickle", "--json"])
    rewrites = __import__("json").loads(result.output)["rewrites"]
    assert [(r["module"], r["how"], r["class"], r["gates"]) for r in rewrites] == [
        (f"blocks.{k}", "block", "PlusBlock", 1) for k in range(3)]


def test_sdsurgeon_file_of_an_in_place_model_loads_back_in_place(tmp_path):
    injected = inject(sdsurgeon.load(arch="sdsurgeon.models:cifar_resnet", arch_kwargs={"depth": 8}), 0.5)
    path = tmp_path / "m.sd.pt"
    sdsurgeon.save(injected, path)
    loaded = sdsurgeon.load(path)
    assert type(loaded) is type(injected)
    assert [p for p, _ in in_place.rewritten(loaded)] == [p for p, _ in in_place.rewritten(injected)]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded.eval()(x), injected.eval()(x))


class FlagBlock(nn.Module):
    """A block whose traced graph depends on a plain attribute: alike blocks share one trace, these may not."""

    def __init__(self, d, doubled):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d))
        self.doubled = doubled

    def forward(self, x):
        y = self.f(x)
        if self.doubled:
            y = y * 2
        return x + y


def test_blocks_of_one_class_that_trace_differently_each_get_their_own_graph():
    model = nn.Sequential(*(FlagBlock(8, doubled) for doubled in (False, True, False, True))).eval()
    injected = inject(model, 0.5).eval()
    ps = [p for _, p in injected.sdsurgeon_recipe.sites]
    x = torch.randn(3, 8)
    expected = x
    with torch.no_grad():
        for block, p in zip(model, ps):  # by hand: x + p * f(x), doubled where the block says so
            expected = expected + p * block.f(expected) * (2 if block.doubled else 1)
        torch.testing.assert_close(injected(x), expected)
    graphs = [in_place.graph_forward(b).graph for b in injected]
    assert len({id(g) for g in graphs}) == 4  # a graph each, even where two blocks traced alike


def test_names_pickled_before_the_installer_moved_still_resolve():
    """torch.save of an injected model named sdsurgeon.capture.in_place for its graph forwards and its FSDP2 hook."""
    import pickle

    from sdsurgeon import distributed

    assert pickle.loads(b"csdsurgeon.capture.in_place\n_rebuild\n.") is in_place._rebuild
    assert pickle.loads(b"csdsurgeon.capture.in_place\nprepare_units\n.") is distributed.prepare_units
