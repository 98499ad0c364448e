"""Every private torch name sdsurgeon uses (the cond patch in gate/cond_backward.py aside, which keeps its own fence).

A torch upgrade's checklist is this file: each name is looked up when it is used, never when sdsurgeon is
imported, and either falls back to public behaviour (said where) or fails in one line naming the name, the
running torch and the versions tested (``missing()`` lists what the running torch lacks; the tests run it on
both tiers' torches). Names that are not private to torch but to an object (``module._modules``, hooks dicts,
``Tensor._version``) are nn.Module's long-stable internals and stay where they are used.
"""

from __future__ import annotations

import functools
import importlib
import re
import warnings
from types import CodeType
from typing import Any, Callable

from .errors import MissingDependencyError

TESTED = "2.13 or 2.14"

# (module, attribute) -> what sdsurgeon does without it. "error": the feature that needs it fails in one line.
PRIVATE: dict[tuple[str, str], str] = {
    ("torch.utils._pytree", "tree_leaves"): "error",
    ("torch.utils._pytree", "tree_map"): "error",
    ("torch.utils._pytree", "tree_flatten_with_path"): "error",
    ("torch.utils._pytree", "keystr"): "error",
    ("torch.fx.graph_module", "_forward_from_src"): "error",
    ("torch.fx.graph_module", "_format_import_block"): "error",
    ("torch.fx.graph_module", "_USER_PRESERVED_ATTRIBUTES_KEY"): "its value in torch 2.13/2.14",
    ("torch._weights_only_unpickler", "_get_allowed_globals"): "error",
    ("torch._weights_only_unpickler", "_get_user_allowed_globals"): "error",
    ("torch._dynamo", "assume_constant_result"): "a graph break around each gate's install",
    ("torch._C", "_current_graph_task_id"): "a checkpoint recompute draws its gates anew (one warning)",
    ("torch._C", "_dispatch_get_all_op_names"): "a library's grouped matmul (MoE experts) counts no FLOPs",
    # a gate's torch.cond that dynamo cannot capture restarts the trace with that gate deciding in Python
    ("torch._dynamo.variables.higher_order_ops", "CondHigherOrderVariable"): "gates decide in Python under compile",
    ("torch._dynamo.exc", "UncapturedHigherOrderOpError"): "gates decide in Python under compile",
    ("torch._dynamo.exc", "RestartAnalysis"): "gates decide in Python under compile",
    ("torch._ops", "OpOverload"): "any callable carrying a schema is taken for an operator",
    ("torch._ops", "OpOverloadPacket"): "an op's description names it less well",
    ("torch", "_assert"): "not known as a check",
    ("torch.nn.modules.batchnorm", "_BatchNorm"): "the public BatchNorm classes",
    ("torch.nn.modules.instancenorm", "_InstanceNorm"): "the public InstanceNorm classes",
    ("torch.nn.modules.pooling", "_MaxPoolNd"): "the public MaxPool classes",
    ("torch.nn.modules.pooling", "_AvgPoolNd"): "the public AvgPool classes",
    ("torch.nn.modules.pooling", "_AdaptiveAvgPoolNd"): "the public AdaptiveAvgPool classes",
    ("torch.nn.modules.pooling", "_AdaptiveMaxPoolNd"): "the public AdaptiveMaxPool classes",
    # torch.nn's transformer layers check masks and inputs in Python with these; traced as calls (capture.torch_nn)
    ("torch.nn.functional", "_canonical_mask"): "torch.fx traces those layers only when their masks are None",
    ("torch.nn.functional", "_none_or_dtype"): "torch.fx traces those layers only when their masks are None",
    ("torch.nn.modules.transformer", "_get_seq_len"): "torch.fx cannot trace their stacks (torch.export can)",
    ("torch.nn.modules.transformer", "_detect_is_causal_mask"): "torch.fx cannot trace their stacks (torch.export can)",
}

# Loggers the exporters write to (io.quiet silences them); a renamed one is only not silenced.
NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "onnx_ir")

_ABSENT = object()


def _lookup(module: str, name: str) -> Any:
    try:
        return getattr(importlib.import_module(module), name, _ABSENT)
    except ImportError:
        return _ABSENT


def missing() -> list[str]:
    """The private names the running torch lacks (empty on the versions tested)."""
    absent = [f"{module}.{name}" for module, name in PRIVATE if _lookup(module, name) is _ABSENT]
    import torch

    if not hasattr(torch.ops.aten.add.Tensor, "_schema"):
        absent.append("torch._ops.OpOverload._schema")
    return absent


def _require(module: str, name: str, for_what: str) -> Any:
    found = _lookup(module, name)
    if found is _ABSENT:
        import torch

        raise MissingDependencyError(
            f"{for_what} needs {module}.{name}, which torch {torch.__version__} lacks: use torch {TESTED} "
            "(the versions sdsurgeon is tested with)", what=f"{module}.{name}")
    return found


def _classes(module: str, name: str, public: tuple[str, ...]) -> tuple[type, ...]:
    """torch's private base class where it exists (user subclasses of it count too), else its public subclasses."""
    base = _lookup(module, name)
    if base is not _ABSENT:
        return (base,)
    import torch.nn as nn

    return tuple(getattr(nn, n) for n in public if hasattr(nn, n))


# --- pytrees: the outputs of models (tuples, dicts, transformers' ModelOutput) as lists of tensors --------


def tree_leaves(tree: Any) -> list:
    return _require("torch.utils._pytree", "tree_leaves", "reading a model's outputs")(tree)


def tree_map(fn: Callable, tree: Any) -> Any:
    return _require("torch.utils._pytree", "tree_map", "mapping a model's inputs")(fn, tree)


def tree_flatten_with_path(tree: Any) -> tuple:
    return _require("torch.utils._pytree", "tree_flatten_with_path", "naming a model's outputs")(tree)


def keystr(path: Any) -> str:
    return _require("torch.utils._pytree", "keystr", "naming a model's outputs")(path)


# --- torch.fx: generated code, as a GraphModule pickles it ----------------------------------------------


def forward_from_src(src: str, globals_: dict) -> Callable:
    return _require("torch.fx.graph_module", "_forward_from_src", "running a rewritten block")(src, globals_)


def format_import_block(globals_: dict, importer: Any) -> str:
    return _require("torch.fx.graph_module", "_format_import_block", "saving a rewritten block")(globals_, importer)


def user_preserved_attributes_key() -> str:
    """The ``GraphModule.meta`` key whose attributes survive ``copy``/pickling of a GraphModule."""
    key = _lookup("torch.fx.graph_module", "_USER_PRESERVED_ATTRIBUTES_KEY")
    return "_user_preserved_attributes" if key is _ABSENT else key


# --- serialization --------------------------------------------------------------------------------------


def weights_only_allowed_globals() -> set[str]:
    """The globals torch's weights-only unpickler accepts: its own allowlist and the user's additions. A torch
    without them is an error, never a guess: this list decides what is reported as code in a stranger's file."""
    module = "torch._weights_only_unpickler"
    own = _require(module, "_get_allowed_globals", "reading what a pickle would import")
    user = _require(module, "_get_user_allowed_globals", "reading what a pickle would import")
    return set(own()) | set(user())


# --- torch.compile and autograd -------------------------------------------------------------------------


def assume_constant_result(fn: Callable) -> Callable:
    """Run ``fn`` for real while dynamo traces its caller, its result taken as a constant. Without the private
    decorator, ``torch.compiler.disable`` does the same at one graph break per call site."""
    import torch

    import torch._dynamo  # noqa: F401  (torch.compiler does not import it)

    return getattr(torch._dynamo, "assume_constant_result", torch.compiler.disable)(fn)


_COND_HOOKS: list[tuple[Callable[[CodeType], bool], Callable[[Exception], None]]] = []


def restart_on_uncaptured_cond(is_ours: Callable[[CodeType], bool], on_refusal: Callable[[Exception], None]) -> bool:
    """Where dynamo cannot capture a ``torch.cond`` whose true branch's code ``is_ours`` (a graph break or a side
    effect inside it), call ``on_refusal`` with the error and make dynamo trace the frame again, instead of failing
    the user's compile: ``on_refusal`` changes what the second trace takes. Installed once; False where this torch
    lacks the names (the caller must then not rely on it)."""
    hop = _lookup("torch._dynamo.variables.higher_order_ops", "CondHigherOrderVariable")
    uncaptured = _lookup("torch._dynamo.exc", "UncapturedHigherOrderOpError")
    restart = _lookup("torch._dynamo.exc", "RestartAnalysis")
    if _ABSENT in (hop, uncaptured, restart):
        return False
    if not _COND_HOOKS:
        original = hop.call_function

        def call_function(self, tx, args, kwargs):
            try:
                return original(self, tx, args, kwargs)
            except uncaptured as exc:
                get_code = getattr(args[1], "get_code", None) if len(args) > 1 else None
                code = get_code() if get_code is not None else None
                hooks = [on for ours, on in _COND_HOOKS if code is not None and ours(code)]
                if not hooks:
                    raise
                for on in hooks:
                    on(exc)
                # The second trace takes another path on purpose: dynamo's record of the first must not bind it.
                speculation = getattr(tx, "speculation_log", None)
                if speculation is not None and hasattr(speculation, "clear"):
                    speculation.clear()
                raise restart(restart_reason="a stochastic-depth gate's torch.cond") from None

        hop.call_function = call_function
    if (is_ours, on_refusal) not in _COND_HOOKS:
        _COND_HOOKS.append((is_ours, on_refusal))
    return True


@functools.cache
def _graph_task_id() -> Callable[[], int] | None:
    found = _lookup("torch._C", "_current_graph_task_id")
    if found is _ABSENT:
        import torch

        warnings.warn(f"sdsurgeon: torch {torch.__version__} lacks torch._C._current_graph_task_id; under activation "
                      "checkpointing a recomputed block draws its gate anew", RuntimeWarning, stacklevel=3)
        return None
    return found


def in_backward() -> bool:
    """Whether autograd is running a backward pass now (a checkpointed block's recompute runs inside one)."""
    task_id = _graph_task_id()
    return task_id is not None and task_id() != -1


# --- op schemas and module classes ----------------------------------------------------------------------


def op_schema(target: Any) -> Any | None:
    """The schema of an ATen operator overload (what it mutates, what it aliases); None for anything else."""
    overload = _lookup("torch._ops", "OpOverload")
    if overload is _ABSENT:  # a torch that moved the class: any callable that carries a schema is an operator
        schema = getattr(target, "_schema", None)
        return schema if hasattr(schema, "is_mutable") else None
    if not isinstance(target, overload):
        return None
    schema = getattr(target, "_schema", _ABSENT)
    if schema is _ABSENT:
        _require("torch._ops", "OpOverload._schema", "reading what an operator mutates")  # raises: names it
    return schema


def private_aten(name: str, overload: str = "default") -> Any | None:
    """An ATen operator whose name is private (``aten._unsafe_view``): the overload, or None where this torch lacks it."""
    import torch

    return getattr(getattr(torch.ops.aten, name, None), overload, None)


def is_aten_op(target: Any) -> bool:
    """Whether ``target`` is an operator of torch.ops (an overload, or a packet of overloads)."""
    import torch

    kinds = tuple(k for k in (_lookup("torch._ops", "OpOverload"), _lookup("torch._ops", "OpOverloadPacket"))
                  if k is not _ABSENT)
    return bool(kinds) and isinstance(target, kinds)


def ops_named(pattern: "re.Pattern[str]") -> list[Any]:
    """Every operator registered now (its overload packet), in any namespace (aten's, a library's custom ops),
    whose name (``namespace::name``) matches ``pattern``."""
    import torch

    names = _lookup("torch._C", "_dispatch_get_all_op_names")
    found = []
    for full in (names() if names is not _ABSENT else []):
        namespace, _, name = full.partition("::")
        if not name or "." in name or not pattern.search(full):
            continue
        packet = getattr(getattr(torch.ops, namespace, None), name, None)
        if packet is not None:
            found.append(packet)
    return found


def check_functions() -> frozenset:
    """Calls whose only effect is to raise: ``torch._assert`` (timm's ``_assert``) and export's assert ops."""
    found = [_lookup("torch", "_assert")]
    for op, overloads in (("_assert_async", ("default", "msg")), ("_assert_scalar", ("default",)),
                          ("sym_constrain_range", ("default",)), ("sym_constrain_range_for_size", ("default",)),
                          ("_assert_tensor_metadata", ("default",))):
        found += [private_aten(op, o) for o in overloads]
    return frozenset(f for f in found if f is not None and f is not _ABSENT)


def batch_norm_classes() -> tuple[type, ...]:
    return _classes("torch.nn.modules.batchnorm", "_BatchNorm",
                    ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "LazyBatchNorm1d",
                     "LazyBatchNorm2d", "LazyBatchNorm3d"))


def instance_norm_classes() -> tuple[type, ...]:
    return _classes("torch.nn.modules.instancenorm", "_InstanceNorm",
                    ("InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "LazyInstanceNorm1d",
                     "LazyInstanceNorm2d", "LazyInstanceNorm3d"))


def pooling_classes() -> tuple[type, ...]:
    """Max, average and adaptive pooling of any dimension: positively homogeneous, a scale passes through."""
    return (_classes("torch.nn.modules.pooling", "_MaxPoolNd", ("MaxPool1d", "MaxPool2d", "MaxPool3d"))
            + _classes("torch.nn.modules.pooling", "_AvgPoolNd", ("AvgPool1d", "AvgPool2d", "AvgPool3d"))
            + _classes("torch.nn.modules.pooling", "_AdaptiveAvgPoolNd",
                       ("AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d"))
            + _classes("torch.nn.modules.pooling", "_AdaptiveMaxPoolNd",
                       ("AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d")))


def transformer_input_checks() -> list[tuple[Any, str]]:
    """(module, name) of the functions torch.nn's transformer layers and stacks check their masks and inputs with
    in Python (``if src.is_nested``): tracing records them as calls instead of running them on proxies. Those
    this torch lacks are left out (its layers may then not trace: torch.export still captures them)."""
    names = [(module, name) for module, name in PRIVATE
             if module in ("torch.nn.functional", "torch.nn.modules.transformer")]
    return [(importlib.import_module(module), name) for module, name in names if _lookup(module, name) is not _ABSENT]


def transformer_shape_readers() -> frozenset:
    """Of those, the ones that read only their tensor argument's shape (``_get_seq_len``): shape ops to detection."""
    found = _lookup("torch.nn.modules.transformer", "_get_seq_len")
    return frozenset() if found is _ABSENT else frozenset({found})
