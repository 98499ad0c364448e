"""Gates -> a fixed deterministic graph: each branch's p_l is folded into the weights that produce it."""

from __future__ import annotations

import copy
import itertools
import operator
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Collection, Iterator, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .. import _torch
from ..attrs import resolve
from ..distributed import unwatch_units
from . import early_exit
from . import install as in_place
from ..capture.drop_path import is_drop_path
from ..capture.call_trace import record_calls, returned_submodule, scaled_parameter
from ..capture.fx import is_default_leaf, trace_eval
from ..capture.graph_facts import dead_nodes, is_view, writes_in_place
from ..capture.where import describe
from ..gate import GateSpec, StochasticDepth
from ..io.hf import carry_recipe
from ..capture.inputs import make_example_inputs
from ..surgery.recipe import RECIPE_ATTR

_aten = torch.ops.aten

# --- what a scale can be folded into ------------------------------------------------------------------

# Modules whose output is affine in (weight, bias): scaling both scales the output.
AFFINE_MODULES: tuple[type, ...] = (
    nn.Linear, nn.Bilinear,
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    *_torch.batch_norm_classes(), *_torch.instance_norm_classes(),
    nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
)
# Functions taking (input, weight, bias) at these positions; weight and bias must be graph attributes.
AFFINE_FUNCTIONS: dict[object, tuple[int, int]] = {
    F.linear: (1, 2), F.bilinear: (2, 3),
    F.conv1d: (1, 2), F.conv2d: (1, 2), F.conv3d: (1, 2),
    F.conv_transpose1d: (1, 2), F.conv_transpose2d: (1, 2), F.conv_transpose3d: (1, 2),
    F.layer_norm: (2, 3), F.group_norm: (2, 3), F.batch_norm: (3, 4), F.instance_norm: (3, 4),
    _aten.linear.default: (1, 2), _aten.conv1d.default: (1, 2), _aten.conv2d.default: (1, 2),
    _aten.conv3d.default: (1, 2), _aten.convolution.default: (1, 2),
    _aten.conv_transpose1d.default: (1, 2), _aten.conv_transpose2d.input: (1, 2), _aten.conv_transpose3d.input: (1, 2),
    _aten.layer_norm.default: (2, 3), _aten.group_norm.default: (2, 3), _aten.batch_norm.default: (1, 2),
    _aten.addmm.default: (2, 0), torch.addmm: (2, 0),  # addmm(bias, input, weight): GPT-2's Conv1D
}

# Positively homogeneous ops of one tensor: op(c * x) == c * op(x) for c > 0, so a scale passes through.
HOMOGENEOUS_MODULES: tuple[type, ...] = (
    nn.ReLU, nn.LeakyReLU, nn.PReLU, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,  # identity in eval
    *_torch.pooling_classes(),
    nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample, nn.ChannelShuffle,
)
HOMOGENEOUS_FUNCTIONS = frozenset({
    torch.relu, F.relu, F.leaky_relu, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, F.pixel_shuffle,
    torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
    torch.mean, torch.sum, torch.neg, operator.neg, operator.getitem, torch.clone,
    _aten.relu.default, _aten.view.default, _torch.private_aten("_unsafe_view"), _aten.reshape.default,
    _aten.permute.default, _aten.transpose.int, _aten.t.default, _aten.flatten.using_ints,
    _aten.squeeze.dim, _aten.unsqueeze.default, _aten.clone.default, _aten.alias.default,
    _aten.mean.dim, _aten.dropout.default, _aten.max_pool2d.default, _aten.avg_pool2d.default,
    _aten.adaptive_avg_pool2d.default,
    # the same at the ATen level of a torch.export capture
    _aten.contiguous.default, _aten.expand.default, _aten.slice.Tensor, _aten.select.int, _aten.squeeze.dims,
    _aten.squeeze.default, _aten.unflatten.int, _aten.sum.dim_IntList, _aten.mean.default, _aten.neg.default,
    _aten.feature_dropout.default, _aten.alpha_dropout.default, _aten.feature_alpha_dropout.default,
    _aten.max_pool1d.default, _aten.max_pool3d.default, _aten.avg_pool1d.default, _aten.avg_pool3d.default,
    _aten.adaptive_avg_pool1d.default, _aten.adaptive_avg_pool3d.default, _aten.roll.default,
})
HOMOGENEOUS_METHODS = frozenset({
    "relu", "view", "reshape", "permute", "transpose", "flatten", "contiguous", "squeeze", "unsqueeze",
    "mean", "sum", "t", "expand", "clone", "neg", "view_as", "reshape_as", "expand_as",
})
_MUL = frozenset({operator.mul, torch.mul, _aten.mul.Tensor, _aten.mul.Scalar})
_DIV = frozenset({operator.truediv, torch.div, _aten.div.Tensor, _aten.div.Scalar})
_ADD = frozenset({operator.add, torch.add, _aten.add.Tensor, operator.sub, torch.sub, _aten.sub.Tensor})


# --- records --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleTarget:
    """Parameters to multiply by p: those of a module call, or one attribute read by a node."""

    kind: str  # "module" (a call_module node's weight/bias) | "attr" (a get_attr tensor read by ``user``)
    node: str  # the call_module node (in the gate's branch graph) or the get_attr node (there or outside)
    target: str  # module or attribute path, relative to the part holding the gate
    params: tuple[str, ...]  # parameter names scaled, relative to the part
    shared: bool  # the weights have another user: scale a private copy
    user: str | None = None  # for "attr": the node that reads the attribute


@dataclass(frozen=True)
class FoldSite:
    """How one gate folds: into ``targets``, or, when ``reason`` is set, as an explicit multiply."""

    id: str
    index: int
    p: float
    scaling: str
    part: str  # module path of the GraphModule holding the gate
    gate: str  # the gate's submodule name in that GraphModule
    targets: tuple[ScaleTarget, ...] = ()
    reason: str | None = None  # why p cannot go into weights (None: it can, or scaling is inverted)

    @property
    def foldable(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class FoldedSite:
    """What fold did to one gate."""

    id: str
    index: int
    p: float
    how: str  # "weights" (p in params) | "multiply" (a constant multiply) | "none" (inverted) | "dropped" (pruned)
    params: tuple[str, ...] = ()  # model-qualified names of the scaled parameters
    copied: tuple[str, ...] = ()  # shared weights that were copied before scaling
    reason: str | None = None  # why a multiply stayed, or why a block went that was not chosen (inside a dropped one)

    def to_dict(self) -> dict:
        return {"index": self.index, "id": self.id, "p": round(self.p, 6), "how": self.how,
                "params": list(self.params), "copied": list(self.copied), "reason": self.reason}


@dataclass
class FoldReport:
    sites: list[FoldedSite] = field(default_factory=list)

    @property
    def folded(self) -> list[FoldedSite]:
        return [s for s in self.sites if s.how == "weights"]

    @property
    def multiplies(self) -> list[FoldedSite]:
        return [s for s in self.sites if s.how == "multiply"]

    @property
    def dropped(self) -> list[FoldedSite]:
        return [s for s in self.sites if s.how == "dropped"]

    @property
    def ungated_ops(self) -> bool:
        """Every gate went into unshared weights or away (none dropped, no multiply, no copy): each owner runs its
        own code again (``fold_with_report`` uninstalls its graph), so the folded model runs the ungated
        architecture's ops, op for op, and only weight values differ (an export's node count is the same)."""
        return all(s.how == "none" or (s.how == "weights" and not s.copied) for s in self.sites)

    def to_dict(self) -> dict:
        return {"num_gates": len(self.sites), "num_folded": len(self.folded), "num_multiplies": len(self.multiplies),
                "num_dropped": len(self.dropped), "sites": [s.to_dict() for s in self.sites]}


class Scale(nn.Module):
    """A branch scale kept as an explicit multiply: ``x * p`` (no parameters, deterministic).

    A module rather than a bare ``mul`` so the multiply keeps its name (``sd_scale_<index>``) in
    printed graphs and in the exported ONNX file's name scopes.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p:.6g}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.p


class SiteRecord(nn.Module):
    """A residual site as fold reads it, standing where a gate would stand in an owner's graph: its branch
    (a GraphModule over the owner's modules), p, scaling and whether a dropped block must copy its skip.

    What ``export --fold`` of a recorded surgery builds instead of a gate (``surgery.inject.fold_recipe``): no
    decision, no random state, never installed on the model and never run; the fold replaces it by its branch."""

    def __init__(self, p: float, branch: fx.GraphModule, *, scaling: str, site_id: str, index: int,
                 copy_skip: bool = False) -> None:
        super().__init__()
        GateSpec(float(p), scaling=scaling, site_id=site_id, index=index)  # p and scaling checked as a gate's are
        self.p, self.scaling = float(p), scaling
        self.site_id, self.index, self.copy_skip = site_id, index, copy_skip
        object.__setattr__(self, "branch", branch)  # not a registered submodule, as a gate's (the owner's modules)

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"site record {self.site_id} is folded, never run")


# what fold takes for a site: an installed gate, or a site record
GATES: tuple[type, ...] = (StochasticDepth, SiteRecord)


# --- finding ---------------------------------------------------------------------------------------------


def _graph_parts(model: nn.Module) -> list[tuple[str, fx.GraphModule]]:
    """(path, GraphModule) of every graph in the model: GraphModule parts, and a view of each module that
    runs an installed graph forward (``surgery.install``: a pass on the view changes that module)."""
    return [(path, in_place.view(m) if in_place.graph_forward(m) is not None else m)
            for path, m in model.named_modules()
            if isinstance(m, fx.GraphModule) or in_place.graph_forward(m) is not None]


def _gate_graphs(parts: list[tuple[str, fx.GraphModule]]) -> Iterator[tuple[str, fx.GraphModule]]:
    """The graph parts holding gates."""
    for path, gm in parts:
        if any(isinstance(m, GATES) for m in gm.children()):
            yield path, gm


class _Usage:
    """How often each module and tensor is used across the whole model, to spot shared weights."""

    def __init__(self, model: nn.Module, parts: list[tuple[str, fx.GraphModule]]) -> None:
        self.paths = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
        self.holders = Counter(id(t) for _, t in model.named_parameters(remove_duplicate=False))
        self.holders.update(id(t) for _, t in model.named_buffers(remove_duplicate=False))
        self.calls: Counter[int] = Counter()
        self.reads: Counter[int] = Counter()
        for _, gm in parts:
            for graph, root in _graphs_with_branches(gm):
                for n in graph.nodes:
                    if n.op == "call_module":
                        self.calls[id(root.get_submodule(n.target))] += 1
                    elif n.op == "get_attr":
                        self.reads[id(resolve(root, n.target))] += 1

    def module_shared(self, module: nn.Module, params: Sequence[torch.Tensor]) -> bool:
        return (self.paths[id(module)] > 1 or self.calls[id(module)] > 1
                or any(self.holders[id(t)] > 1 for t in params))

    def tensor_shared(self, tensor: torch.Tensor, getattr_node: fx.Node) -> bool:
        return self.holders[id(tensor)] > 1 or self.reads[id(tensor)] > 1 or len(getattr_node.users) > 1


def _graphs_with_branches(gm: fx.GraphModule) -> Iterator[tuple[fx.Graph, fx.GraphModule]]:
    """gm's graph and its gates' branch graphs: together, the nodes of the original graph."""
    yield gm.graph, gm
    for m in gm.children():
        if isinstance(m, GATES) and isinstance(m.branch, fx.GraphModule):
            yield m.branch.graph, gm


def find_folds(model: nn.Module, *, examples=None,
               parts: list[tuple[str, fx.GraphModule]] | None = None) -> list[FoldSite]:
    """Where each gate's p can be folded, in depth order. Read-only: the model is not changed.

    For every gate, walks back from its branch output through positively homogeneous ops to the
    nearest affine producers (see AFFINE_MODULES / AFFINE_FUNCTIONS and layer-scale multiplies).
    A gate whose branch ends elsewhere gets a ``reason`` and will keep an explicit multiply.
    ``examples``: the job's example inputs, for the one eval forward that looks at modules with no rule
    here (default: drawn from the recipe's specs when needed). ``parts``: the graphs holding the gates or
    site records (default: those installed in ``model``; ``surgery.inject.fold_recipe`` passes its own).
    """
    parts = _graph_parts(model) if parts is None else parts
    usage = _Usage(model, parts)
    observed = _Observed(model, parts, examples)
    sites: list[FoldSite] = []
    for path, gm in _gate_graphs(parts):
        for name, gate in gm.named_children():
            if not isinstance(gate, GATES):
                continue
            common = dict(id=gate.site_id, index=gate.index, p=gate.p, scaling=gate.scaling, part=path, gate=name)
            if gate.scaling == "inverted" or gate.p == 1.0:
                sites.append(FoldSite(**common))  # nothing to scale
                continue
            branch = gate.branch
            out = next(n for n in branch.graph.nodes if n.op == "output").args[0]
            walker = _Walker(gm, usage, _branch_inputs(gm, name, branch), observed, path)
            found = walker.targets(out) if isinstance(out, fx.Node) else "the branch returns no tensor"
            if isinstance(found, str):
                sites.append(FoldSite(**common, reason=found))
            else:
                sites.append(FoldSite(**common, targets=tuple(found)))
    return sorted(sites, key=lambda s: s.index)


def _branch_inputs(gm: fx.GraphModule, gate_name: str, branch: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """The branch's placeholders -> the nodes the gate call passes in (in gm's graph or an outer branch)."""
    for graph, _ in _graphs_with_branches(gm):
        for n in graph.nodes:
            if n.op == "call_module" and n.target == gate_name:
                placeholders = [p for p in branch.graph.nodes if p.op == "placeholder"]
                return dict(zip(placeholders, n.args[1:]))
    return {}


class _Observed:
    """Which submodule's output each module called in the graphs returns as is (``returned_submodule``),
    seen in one eval forward of the model on the job's example inputs (else drawn from its recipe's specs),
    run the first time it is asked."""

    def __init__(self, model: nn.Module, parts: list[tuple[str, fx.GraphModule]], examples=None) -> None:
        self.model, self.parts, self.examples = model, parts, examples
        self._calls: dict | None = None

    def returned(self, path: str, item: int | None) -> str | None:
        call = self._call(path)
        return None if call is None else returned_submodule(self.model.get_submodule(path), call, item)

    def scaled(self, path: str, item: int | None) -> str | None:
        """The module's own parameter its output (``item`` of it) is proportional to, seen (``scaled_parameter``)."""
        call = self._call(path)
        return None if call is None else scaled_parameter(self.model.get_submodule(path), call, item)

    def _call(self, path: str):
        if self._calls is None:
            inputs = self.examples
            if inputs is None:
                recipe = getattr(self.model, RECIPE_ATTR, None)
                inputs = make_example_inputs(recipe.inputs) if recipe is not None and recipe.inputs else None
            called = {".".join(p for p in (part, n.target) if p)
                      for part, gm in self.parts for graph, root in _graphs_with_branches(gm) for n in graph.nodes
                      if n.op == "call_module" and not isinstance(module := root.get_submodule(n.target), GATES)
                      and not is_default_leaf(module)}
            self._calls = record_calls(self.model, called, inputs) or {}
        return self._calls.get(path)


class _Walker:
    """Walks back from a value to the parameters that scale it (or says why there are none)."""

    def __init__(self, root: fx.GraphModule, usage: _Usage, outside: dict[fx.Node, fx.Node],
                 observed: _Observed | None = None, part: str = "") -> None:
        self.root = root
        self.usage = usage
        self.outside = outside  # branch placeholder -> the value passed in: a weight may come from outside
        self.observed, self.part = observed, part  # for modules with no rule here: what they return, seen
        self._dead: dict[fx.Graph, set[fx.Node]] = {}

    def _used(self, node: fx.Node) -> int:
        """Users of ``node`` whose value matters (a dead one, e.g. dropped attention weights, may scale too)."""
        if node.graph not in self._dead:
            self._dead[node.graph] = dead_nodes(list(node.graph.nodes))
        return sum(u not in self._dead[node.graph] for u in node.users)

    def _outside_value(self, value):
        # a node of a module's own graph that stands for a value of the graph around it (not an attribute path)
        return self.outside.get(value, value) if isinstance(value, fx.Node) else value

    def targets(self, node: fx.Node) -> list[ScaleTarget] | str:
        if node.op == "call_module":
            module = self.root.get_submodule(node.target)
            if _runs_torch_forward(module, AFFINE_MODULES):
                return self._module(node, module)
            if (_runs_torch_forward(module, HOMOGENEOUS_MODULES) and not getattr(module, "return_indices", False)) or is_drop_path(module):
                return self._through(node, node.args[0])
            if isinstance(module, GATES):
                return f"the branch ends in the nested residual block {module.site_id}"
            return self._inside(node, module) or self._returned(node, module, None)
        if node.op == "call_function":
            fn = node.target
            if fn is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].op == "call_module":
                call, item = node.args[0], node.args[1]
                module = self.root.get_submodule(call.target)
                if isinstance(item, int) and self._used(call) == 1 and not isinstance(module, GATES):
                    return self._returned(call, module, item)  # out, _ = attention(x): the output it made
            if fn in AFFINE_FUNCTIONS:
                return self._functional(node, *AFFINE_FUNCTIONS[fn])
            if fn in _MUL:
                return self._mul(node)
            if fn in _DIV:
                return self._through(node, node.args[0]) if not isinstance(node.args[0], (int, float)) else self._opaque(node)
            if fn in _ADD:
                return self._both(node)
            if fn in HOMOGENEOUS_FUNCTIONS and not node.kwargs.get("return_indices") and _zero_pad(node):
                return self._through(node, node.args[0])
            return self._opaque(node)
        if node.op == "call_method":
            if node.target in HOMOGENEOUS_METHODS:
                return self._through(node, node.args[0])
            if node.target == "mul":
                return self._mul(node)
            if node.target == "div":
                return self._through(node, node.args[0])
            if node.target in ("add", "sub"):
                return self._both(node)
            return self._opaque(node)
        if node.op == "get_attr":
            return f"the branch ends in the attribute {node.target}"
        return f"the branch output is one of its inputs ({describe(self._outside_value(node), self.part)})"

    def _inside(self, node: fx.Node, module: nn.Module) -> list[ScaleTarget] | None:
        """A module call with no rule here (a leaf kept for its train/eval switch, e.g. a BatchNorm2d
        subclass followed by an activation), looked into as it runs in eval, the mode folding is for:
        traced there, and its output walked back to its own weights. None where that finds none."""
        if len(node.args) != 1 or node.kwargs:
            return None
        return self._inside_at(node.name, node.target, module)

    def _inside_at(self, node_name: str, target: str, module: nn.Module) -> list[ScaleTarget] | None:
        try:
            inner = trace_eval(module)
        except Exception:  # it does not trace: it stays opaque
            return None
        out = next(n for n in inner.graph.nodes if n.op == "output").args[0]
        found = _Walker(inner, _Usage(inner, [("", inner)]), {}).targets(out) if isinstance(out, fx.Node) else "no tensor"
        if isinstance(found, str) or any(t.kind != "attr" for t in found):
            return None
        params = tuple(f"{target}.{t.target}" for t in found)
        tensors = [resolve(inner, t.target) for t in found]
        shared = self.usage.module_shared(module, tensors) or any(t.shared for t in found)
        return [ScaleTarget("module", node_name, target, params, shared)]

    def _returned(self, node: fx.Node, module: nn.Module, item: int | None) -> list[ScaleTarget] | str:
        """A module with no rule here (an attention module kept whole), whose output (``item`` of it) is,
        seen on a real call, the very tensor an affine submodule made (``capture.call_trace``): that
        submodule's weights take the scale."""
        opaque = f"the branch ends in {type(module).__name__} ({node.target}), which is not positively homogeneous"
        inner = _attention_output_projection(module, item)
        where = ".".join(p for p in (self.part, node.target) if p)
        if inner is None and self.observed is not None:
            inner = self.observed.returned(where, item)
        if inner is None and self.observed is not None:
            # no submodule makes it, but it is proportional to one of the module's own parameters (a mixture of
            # experts' fused down projections): the module is called here, so a copy of it can be wired in
            own = self.observed.scaled(where, item)
            if own is not None:
                return [ScaleTarget("module", node.name, node.target, (f"{node.target}.{own}",),
                                    self.usage.module_shared(module, [getattr(module, own)]))]
        if inner is None:
            return opaque
        path = f"{node.target}.{inner}"
        producer = self.root.get_submodule(path)
        if _runs_torch_forward(producer, AFFINE_MODULES):
            found = self._module_at(node.name, path, producer)
        else:
            found = self._inside_at(node.name, path, producer)
        if isinstance(found, str) or not found:
            return opaque
        if any(t.shared for t in found):  # a copy could not be wired in: the module's own code reads the original
            return f"{path}, which makes {type(module).__name__}'s output, shares its weights"
        return found

    def _opaque(self, node: fx.Node) -> str:
        return f"the branch ends in {describe(node, self.part)}, which is not positively homogeneous"

    def _through(self, node: fx.Node, source) -> list[ScaleTarget] | str:
        if not isinstance(source, fx.Node):
            return self._opaque(node)
        if self._used(source) > 1:
            return (f"{describe(self._outside_value(source), self.part)} is used more than once in the branch, so its "
                    "producer cannot be scaled")
        return self.targets(source)

    def _module(self, node: fx.Node, module: nn.Module) -> list[ScaleTarget] | str:
        return self._module_at(node.name, node.target, module)

    def _module_at(self, node_name: str, target: str, module: nn.Module) -> list[ScaleTarget] | str:
        names = [n for n in ("weight", "bias") if isinstance(getattr(module, n, None), torch.Tensor)]
        if "weight" not in names:
            return f"{type(module).__name__} `{'.'.join(p for p in (self.part, target) if p)}` has no affine weight to scale"
        tensors = [getattr(module, n) for n in names]
        return [ScaleTarget(
            "module", node_name, target, tuple(f"{target}.{n}" for n in names),
            self.usage.module_shared(module, tensors),
        )]

    def _attr(self, value: fx.Node, user: fx.Node) -> ScaleTarget:
        getattr_node = self._outside_value(value)
        tensor = resolve(self.root, getattr_node.target)
        return ScaleTarget("attr", getattr_node.name, getattr_node.target, (getattr_node.target,),
                           self.usage.tensor_shared(tensor, getattr_node), user=user.name)

    def _is_tensor_attr(self, value) -> bool:
        value = self._outside_value(value)
        return (isinstance(value, fx.Node) and value.op == "get_attr"
                and isinstance(resolve(self.root, value.target), torch.Tensor))

    def _attr_behind_views(self, value) -> fx.Node | None:
        """The tensor attribute ``value`` is a view of, each step read once (``gamma.view(1, -1, 1, 1)``)."""
        value = self._outside_value(value)
        if not isinstance(value, fx.Node) or not is_view(value):
            return None
        while isinstance(value, fx.Node) and is_view(value) and len(value.users) == 1:
            value = value.args[0]
        if self._is_tensor_attr(value) and len(value.users) == 1:
            return value
        return None

    def _functional(self, node: fx.Node, w_pos: int, b_pos: int) -> list[ScaleTarget] | str:
        def arg(pos: int, name: str):
            return node.args[pos] if len(node.args) > pos else node.kwargs.get(name)

        weight, bias = arg(w_pos, "weight"), arg(b_pos, "bias")
        if not self._is_tensor_attr(weight) or not (bias is None or self._is_tensor_attr(bias)):
            return f"{describe(node, self.part)}: its weight and bias are not model attributes, so they cannot be scaled"
        return [self._attr(t, node) for t in (weight, bias) if t is not None]

    def _mul(self, node: fx.Node) -> list[ScaleTarget] | str:
        a, b = node.args[0], node.args[1]
        for gamma, value in ((a, b), (b, a)):
            if self._is_tensor_attr(gamma) and isinstance(value, fx.Node):
                return [self._attr(gamma, node)]  # layer scale: gamma * f(x)
            viewed = self._attr_behind_views(gamma)
            if viewed is not None and isinstance(value, fx.Node):
                target = self._attr(viewed, node)
                if not target.shared:  # gamma.view(1, C, 1, 1) * f(x): scaling gamma scales its view
                    return [target]
        for const, value in ((a, b), (b, a)):
            if isinstance(const, (int, float)) and isinstance(value, fx.Node):
                return self._through(node, value)
        reasons = []
        for value in (a, b):  # (c a) b == c (a b): either factor may carry the scale
            found = self._through(node, value) if isinstance(value, fx.Node) else self._opaque(node)
            if not isinstance(found, str):
                return found
            reasons.append(found)
        return f"neither factor of {describe(node, self.part)} can take p ({'; '.join(reasons)})"

    def _both(self, node: fx.Node) -> list[ScaleTarget] | str:
        operands = [v for v in node.args[:2] if isinstance(v, fx.Node)]
        if len(operands) != 2 or operands[0] is operands[1] or set(node.kwargs) - {"alpha"}:
            return self._opaque(node)
        found: list[ScaleTarget] = []
        for value in operands:  # c a + c b: both sides must carry the scale
            more = self._through(node, value)
            if isinstance(more, str):
                return more
            found += more
        if len({t.target for t in found}) != len(found):
            return f"{describe(node, self.part)} adds two values made with the same weights"
        return found


def _attention_output_projection(module: nn.Module, item: int | None) -> str | None:
    """torch's own MultiheadAttention returns as its first output what its ``out_proj`` weight and bias make
    (its forward ends in ``linear(attn, out_proj.weight, out_proj.bias)``, read at every call): "out_proj"."""
    if item == 0 and _runs_torch_forward(module, (nn.MultiheadAttention,)) and isinstance(
            getattr(module, "out_proj", None), nn.Linear):
        return "out_proj"
    return None


def _runs_torch_forward(module: nn.Module, classes: tuple[type, ...]) -> bool:
    """An instance of one of ``classes`` whose forward is torch's own: a subclass that overrides it
    (timm's BatchNormAct2d is a BatchNorm2d followed by an activation) may be neither affine nor homogeneous."""
    if not isinstance(module, classes):
        return False
    owner = next(c for c in type(module).__mro__ if "forward" in vars(c))
    return owner.__module__.startswith("torch.nn.")


def _zero_pad(node: fx.Node) -> bool:
    """F.pad is homogeneous only with a zero constant fill."""
    if node.target is not F.pad:
        return True
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
    return mode == "constant" and not value


# --- changing --------------------------------------------------------------------------------------------


def fold_gates(gm: fx.GraphModule, sites: Sequence[FoldSite], *, into_weights: bool = True, scale: bool = True,
               prefix: str = "", drop: Collection[str] = ()) -> tuple[fx.GraphModule, list[FoldedSite]]:
    """Pass: replace every gate in ``gm`` by its branch, with p folded into weights or kept as a multiply.

    Mutates and returns ``gm`` (with a record per gate). ``sites`` come from ``find_folds`` on the model
    holding ``gm``. Nested gates are handled: inlining an outer branch exposes the inner gate node,
    which is folded in turn. ``into_weights=False`` keeps every paper-scaled p as a ``Scale`` multiply;
    ``scale=False`` drops p altogether (the original architecture back, see ``remove_gates``).
    ``prefix`` is gm's module path, used to name parameters in the records. Sites whose id is in
    ``drop`` are folded with p = 0: the gate and its branch go, the skip (identity or projection) stays;
    the branch's modules stay in the module tree, unused, so the state_dict keeps its keys.
    """
    by_gate = {s.gate: s for s in sites}
    graph = gm.graph
    done: list[FoldedSite] = []
    while True:
        gate_node = next((n for n in graph.nodes if n.op == "call_module" and n.target in by_gate), None)
        if gate_node is None:
            break
        site = by_gate[gate_node.target]
        gate = gm.get_submodule(site.gate)
        skip, *inputs = gate_node.args
        if site.id in drop:
            if gate.copy_skip:  # the block's output is written in place later: it must not be the skip itself
                with graph.inserting_before(gate_node):
                    skip = graph.call_method("clone", (skip,))
            gate_node.replace_all_uses_with(skip)
            decision = gate_node.kwargs.get("decision")
            graph.erase_node(gate_node)
            _erase_draw(graph, decision)
            _erase_unused(graph, inputs)
            done += _drop(gm, site, gate)
            continue
        with graph.inserting_before(gate_node):
            env = _inline(graph, gate.branch.graph, inputs)
            out = env["__output__"]
            record = _scale(gm, graph, site, env, out, into_weights, scale, prefix)
            value = record[1]
            total = graph.call_function(operator.add, (skip, value))
        total.meta = {k: v for k, v in gate_node.meta.items() if k == "nn_module_stack"}
        gate_node.replace_all_uses_with(total)
        decision = gate_node.kwargs.get("decision")
        graph.erase_node(gate_node)
        _erase_draw(graph, decision)
        gm.delete_submodule(site.gate)
        done.append(record[0])
    graph.lint()
    gm.recompile()
    return gm, done


def _drop(gm: fx.GraphModule, site: FoldSite, gate: nn.Module) -> list[FoldedSite]:
    """Records for a dropped gate and for the gates nested in its branch, which go with it; removes them all."""
    inner, pending = [], [gate]
    while pending:  # gates in the branch, in theirs, and so on (three levels deep is in the zoo)
        found = [n.target for n in pending.pop().branch.graph.nodes
                 if n.op == "call_module" and isinstance(gm.get_submodule(n.target), GATES)]
        inner += found
        pending += [gm.get_submodule(name) for name in found]
    records = [FoldedSite(site.id, site.index, site.p, "dropped")]
    for name in inner:
        nested = gm.get_submodule(name)
        records += [FoldedSite(nested.site_id, nested.index, nested.p, "dropped",
                               reason=f"inside the dropped block {site.id}")]
    for name in [site.gate, *inner]:
        gm.delete_submodule(name)
    return records


def _erase_unused(graph: fx.Graph, values: Sequence) -> None:
    """Erase the nodes that only a removed branch read (its own reads of weights, a view made for it), transitively."""
    pending = [v for v in values if isinstance(v, fx.Node)]
    while pending:
        n = pending.pop()
        if n.users or n.op in ("placeholder", "output") or n.graph is not graph or n.is_impure() or writes_in_place(n):
            continue
        pending += n.all_input_nodes
        graph.erase_node(n)


def _erase_draw(graph: fx.Graph, decision) -> None:
    """Remove the nodes that drew a gate's decision (the draw call and its reference to the gate)."""
    if isinstance(decision, fx.Node) and not decision.users:
        refs = [a for a in decision.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        graph.erase_node(decision)
        for ref in refs:
            if not ref.users:
                graph.erase_node(ref)


def _inline(graph: fx.Graph, branch: fx.Graph, inputs: Sequence[fx.Node]) -> dict[str, fx.Node]:
    """Copy ``branch`` into ``graph`` at the insertion point; returns branch node name -> new node."""
    env: dict[fx.Node, fx.Node] = {}
    names: dict[str, fx.Node] = {}
    placeholders = iter(inputs)
    for n in branch.nodes:
        if n.op == "placeholder":
            env[n] = next(placeholders)
        elif n.op == "output":
            names["__output__"] = env[n.args[0]]
        else:
            env[n] = graph.node_copy(n, env.__getitem__)
        names[n.name] = env.get(n)
    return names


def _scale(gm: fx.GraphModule, graph: fx.Graph, site: FoldSite, env: dict[str, fx.Node], out: fx.Node,
           into_weights: bool, scale: bool, prefix: str) -> tuple[FoldedSite, fx.Node]:
    def qualified(name: str) -> str:
        return f"{prefix}.{name}" if prefix else name

    if site.scaling == "inverted" or site.p == 1.0 or not scale:
        return FoldedSite(site.id, site.index, site.p, "none"), out
    if not into_weights or not site.foldable:
        reason = site.reason if into_weights else "--no-fold: kept as a multiply"
        name = f"sd_scale_{site.index}"
        gm.add_submodule(name, Scale(site.p))
        return FoldedSite(site.id, site.index, site.p, "multiply", reason=reason), graph.call_module(name, (out,))
    scaled, copied = [], []
    for k, target in enumerate(site.targets):
        if target.kind == "module":
            node = env[target.node]
            module = gm.get_submodule(target.target)
            if target.shared:
                module = copy.deepcopy(module)
                new_name = f"sd_fold_{site.index}_{k}"
                gm.add_submodule(new_name, module)
                node.target = new_name
                copied.append(qualified(target.target))
                names = [f"{new_name}.{p.removeprefix(target.target + '.')}" for p in target.params]
            else:
                names = list(target.params)
            with torch.no_grad():
                for n in names:
                    resolve(gm, n).mul_(site.p)
            scaled += [qualified(n) for n in names]
        else:
            tensor = resolve(gm, target.target)
            name = target.target
            if target.shared:  # a private copy, read by this branch's node alone
                name = f"sd_fold_{site.index}_{k}"
                fresh = tensor.detach().clone()
                if isinstance(tensor, nn.Parameter):
                    gm.register_parameter(name, nn.Parameter(fresh, tensor.requires_grad))
                else:
                    gm.register_buffer(name, fresh)
                user = env[target.user]
                old = next(i for i in user.all_input_nodes if i.op == "get_attr" and i.target == target.target)
                with graph.inserting_before(user):
                    user.replace_input_with(old, graph.get_attr(name))
                if not old.users:
                    graph.erase_node(old)
                copied.append(qualified(target.target))
            with torch.no_grad():
                resolve(gm, name).mul_(site.p)
            scaled.append(qualified(name))
    return FoldedSite(site.id, site.index, site.p, "weights", tuple(scaled), tuple(copied)), out


def copied(model, *, sharing: Sequence[nn.Module] = ()):
    """A deep copy of ``model`` (or of a tuple holding it and graphs over its modules: one copy, shared as before).

    ``sharing``: modules whose parameters and buffers the copy holds as they are, not copied (a copy of the
    module tree and graphs around the same weights)."""
    memo = {id(t): t for m in sharing for t in itertools.chain(m.parameters(), m.buffers())}
    with warnings.catch_warnings():
        # torch's own deprecation, raised when a torch.export capture's input spec is copied
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*LeafSpec")
        return copy.deepcopy(model, memo)


def fold_with_report(model: nn.Module, *, into_weights: bool = True, scale: bool = True,
                     drop: Collection[str] = (), own: bool = False, examples=None) -> tuple[nn.Module, FoldReport]:
    """``fold`` that also says, per gate, which parameters took p or why a multiply stayed.

    ``drop``: site ids folded with p = 0 (pruned: see ``fold_gates``; ``surgery.prune`` chooses them).
    ``own``: fold ``model`` itself, not a copy (a caller that owns it and needs the gated model no more).
    ``examples``: the job's example inputs (see ``find_folds``)."""
    work = model if own else copied(model)
    return fold_parts(work, _graph_parts(work), into_weights=into_weights, scale=scale, drop=drop, examples=examples)


def fold_parts(work: nn.Module, parts: list[tuple[str, fx.GraphModule]], *, into_weights: bool = True,
               scale: bool = True, drop: Collection[str] = (), examples=None,
               whole: Collection[str] = ()) -> tuple[nn.Module, FoldReport]:
    """Fold, in place, the gates or site records that ``parts`` (path, graph over ``work``'s modules) hold.

    A part whose sites all went into unshared weights (or needed no scale) leaves its owner running its own code
    (a graph installed there is uninstalled; one never installed stays so); any other owner runs its folded graph
    (``surgery.install``). A GraphModule part of ``work`` is folded where it is; the parts at the paths in
    ``whole`` (ATen captures, rewritten whole) replace the module there."""
    sites = find_folds(work, examples=examples, parts=parts)
    report = FoldReport()
    result = work
    for path, gm in list(_gate_graphs(parts)):
        mine = [s for s in sites if s.part == path]
        _, done = fold_gates(gm, mine, into_weights=into_weights, scale=scale, prefix=path, drop=frozenset(drop))
        report.sites += done
        if path in whole:
            result = in_place.replace(result, path, gm)
            continue
        owner = work.get_submodule(path)
        if owner is gm:
            continue  # a GraphModule part: folded where it is
        if all(d.how == "none" or (d.how == "weights" and not d.copied) for d in done):
            in_place.uninstall(owner)  # the graph is the module's own code again, with scaled weights
        else:
            in_place.install(owner, gm)
    report.sites.sort(key=lambda s: s.index)
    if not in_place.rewritten(result):
        unwatch_units(result)
    _untag(result)
    return result.eval(), report


def fold(model: nn.Module, *, into_weights: bool = True) -> nn.Module:
    """A deterministic copy of an injected model for inference; ``model`` is unchanged.

    Every gate is replaced by its branch. With paper scaling, p is multiplied into the nearest
    affine producer of the branch output (conv/linear/norm weight and bias, or a layer-scale
    parameter), through positively homogeneous ops; where there is none, an explicit ``Scale``
    multiply stays (``fold_with_report`` says why). Shared weights are copied before scaling.
    Inverted scaling: the gates go and nothing is scaled. The result is in eval mode and in eval
    ``fold(model)(x) == model(x)``. ``into_weights=False`` keeps every p as a multiply instead.
    """
    return fold_with_report(model, into_weights=into_weights)[0]


def remove_gates(model: nn.Module) -> nn.Module:
    """The injected model's architecture without gates (each branch added unscaled); ``model`` is unchanged.

    The inverse of ``inject`` for structure: equal to the original model in every mode, and to the
    injected model in eval only with inverted scaling. Used to compare exports against the original.
    """
    return fold_with_report(model, scale=False)[0]


def _untag(model: nn.Module) -> None:
    """The folded model is no longer an injected one: drop the recipe, and the early exit's training loss."""
    early_exit.uninstall(model)
    if hasattr(model, RECIPE_ATTR):
        delattr(model, RECIPE_ATTR)
    carry_recipe(model, None)
    if isinstance(model, fx.GraphModule):
        model.meta.get(_torch.user_preserved_attributes_key(), {}).pop(RECIPE_ATTR, None)
