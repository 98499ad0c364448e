"""ONNX export of a folded model with torch.onnx (dynamo) and onnx.checker; input naming and batch dimensions."""

from __future__ import annotations

import contextlib
import inspect
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import _torch
from ..capture.inputs import normalize_inputs, sequence_inputs
from ..capture.modes import modes_kept
from ..capture.torch_export import cache_off
from ..capture.where import explain
from ..errors import ConfigError, ExportError, first_line
from ..io.files import companion_of, staged_pair, writing
from ..io.quiet import quiet

# Ops that would make inference random; a correct export of a folded model holds none.
RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
                        "Bernoulli", "Multinomial", "Dropout"})
# Weights past this many bytes are written as ONNX external data: ``<name>.onnx`` holds the graph and names
# ``<name>.onnx.data``, which holds the weights. A protobuf file cannot pass 2 GiB, and the graph's own size
# (nodes, attributes, constants) is known only by serializing it, which is what fails past 2 GiB: so the switch
# comes at 1.5 GiB of weights, leaving 0.5 GiB for the rest (torch.onnx's own threshold). Tests lower it.
EXTERNAL_DATA_BYTES = 1536 * 2**20
DATA_SUFFIX = ".data"


@dataclass
class OnnxExport:
    """What was written: the ONNX file and its graph."""

    path: str
    nodes: int
    op_types: dict[str, int]
    scale_nodes: int  # nodes made from kept multiplies (sd_scale_* modules)
    file_bytes: int
    opset: int
    inputs: list[str]
    outputs: list[str]
    dynamic_inputs: list[str]  # inputs whose first axis (batch) is dynamic
    seconds: float
    dynamic_axes: dict[str, list[str | None]] = field(default_factory=dict)  # input -> each axis' name
    experts: list[str] = field(default_factory=list)  # implementations exported instead ("a -> b")
    upcast_from: str | None = None  # the model's 16-bit dtype, written as float32
    data_bytes: int | None = None  # the external data file's size, where the weights are in one (past 2 GB)

    @property
    def data_path(self) -> str | None:
        """The external data file beside ``path`` that holds the weights, where there is one."""
        return None if self.data_bytes is None else str(companion_of(self.path, DATA_SUFFIX))

    def external_data(self) -> dict | None:
        return None if self.data_bytes is None else {"path": self.data_path, "bytes": self.data_bytes}

    def to_dict(self) -> dict:
        return {"path": self.path, "nodes": self.nodes, "scale_nodes": self.scale_nodes, "file_bytes": self.file_bytes,
                "opset": self.opset, "inputs": self.inputs, "outputs": self.outputs,
                "dynamic_inputs": self.dynamic_inputs, "op_types": self.op_types, "seconds": round(self.seconds, 3),
                "dynamic_axes": self.dynamic_axes, "experts": self.experts, "upcast_from": self.upcast_from,
                "external_data": self.external_data()}


# --- quiet exporter ---------------------------------------------------------------------------------------


# --- inputs -----------------------------------------------------------------------------------------------


def named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """Forward argument name -> tensor, in signature order (the order the ONNX graph's inputs take)."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"the example inputs do not fit {type(model).__name__}.forward ({exc}); check --input") from None
    named: dict[str, torch.Tensor] = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named.update({f"{name}_{i}": v for i, v in enumerate(value) if isinstance(v, torch.Tensor)})
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.update({k: v for k, v in value.items() if isinstance(v, torch.Tensor)})
        elif isinstance(value, torch.Tensor):
            named[name] = value
    return named


def batch_inputs(tensors: list[torch.Tensor]) -> list[bool]:
    """Which inputs share the batch axis: those whose first dimension equals the first input's."""
    first = next((t for t in tensors if t.dim() > 0), None)
    return [first is not None and t.dim() > 0 and t.shape[0] == first.shape[0] for t in tensors]


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict, sequence: bool):
    """torch.export spec making dim 0 of the batch inputs one shared dynamic "batch" dimension, and with
    ``sequence`` dim 1 of the token inputs their sequence dimension (``sequence_inputs``)."""
    dims = {"batch": torch.export.Dim("batch")}
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    tensors = [v for v in bound.arguments.values() if isinstance(v, torch.Tensor)]
    is_batch = iter(batch_inputs(tensors))
    axes = sequence_inputs(named_inputs(model, args, kwargs)) if sequence else {}
    spec = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            dynamic = {0: dims["batch"]} if next(is_batch) else {}
            if name in axes:
                dynamic[1] = dims.setdefault(axes[name], torch.export.Dim(axes[name]))
            spec[name] = dynamic or None
        else:
            spec[name] = None
    return spec


def output_names(output) -> list[str] | None:
    """The model's outputs by their names (transformers' ``logits``, ``last_hidden_state``; a dict's keys), in
    the order the ONNX graph gives them; None where they have no names (a tensor, a tuple)."""
    leaves, _ = _torch.tree_flatten_with_path(output)
    names = [re.sub(r"[^0-9A-Za-z_]+", "_", _torch.keystr(path)).strip("_") for path, _ in leaves]
    if not names or any(not n or n[0].isdigit() for n in names) or len(set(names)) != len(names):
        return None
    return names


def _with_batch(args: tuple, kwargs: dict, size: int) -> tuple[tuple, dict]:
    """The same inputs with the batch axis resized (torch.export treats a batch of 1 as a constant)."""
    flat = list(args) + list(kwargs.values())
    is_batch = iter(batch_inputs([t for t in flat if isinstance(t, torch.Tensor)]))

    def resize(value):
        if not isinstance(value, torch.Tensor) or not next(is_batch):
            return value
        reps = [size // value.shape[0] + 1] + [1] * (value.dim() - 1)
        return value.repeat(*reps)[:size].clone()

    new = [resize(v) for v in flat]
    return tuple(new[: len(args)]), dict(zip(kwargs, new[len(args):]))


# --- export -----------------------------------------------------------------------------------------------


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost exception: the exporter wraps the real failure in step-by-step advice."""
    seen = {id(exc)}
    while (inner := exc.__cause__ or exc.__context__) is not None and id(inner) not in seen:
        seen.add(id(inner))
        exc = inner
    return exc


def half_precision(model: nn.Module) -> torch.dtype | None:
    """The 16-bit floating dtype (bfloat16, float16) of ``model``'s parameters, where it has one (the lowest)."""
    found = {p.dtype for p in model.parameters() if p.is_floating_point() and p.dtype.itemsize == 2}
    return None if not found else (torch.bfloat16 if torch.bfloat16 in found else torch.float16)


@contextlib.contextmanager
def in_float32(model: nn.Module) -> Iterator[torch.dtype | None]:
    """For the block, a bf16/fp16 ``model``'s floating parameters and buffers in float32 (exactly: the way back
    is lossless); yields the dtype it had, None where it had none (nothing changes)."""
    precision = half_precision(model)
    changed: list[tuple[torch.Tensor, torch.dtype]] = []
    if precision is not None:
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                if t.is_floating_point() and t.dtype.itemsize == 2:
                    changed.append((t, t.dtype))
                    t.data = t.data.float()
    try:
        yield precision
    finally:
        with torch.no_grad():
            for t, dtype in changed:
                t.data = t.data.to(dtype)


# Experts implementations (transformers' MoE layers) by what the ONNX exporter can take: the fused grouped matmul
# has no ONNX translation, the per-expert loop branches on the routing (data-dependent), the batched one gathers
# each token's experts' weights and multiplies them in one bmm: plain ops, the same numbers.
_FOR_ONNX = {"grouped_mm": "batched_mm"}


@contextlib.contextmanager
def onnx_experts(model: nn.Module) -> Iterator[list[str]]:
    """For the block, the outermost modules that choose their experts implementation (transformers'
    ``set_experts_implementation``) run one the ONNX exporter can take; yields what it changed ("old -> new")."""
    changed: list[tuple[nn.Module, object]] = []
    said: list[str] = []
    inside: set[str] = set()
    for path, module in model.named_modules():
        if any(path.startswith(f"{p}.") for p in inside) or not callable(getattr(module, "set_experts_implementation", None)):
            continue
        can_set = getattr(module, "_can_set_experts_implementation", None)
        if not callable(getattr(module, "get_experts_implementation", None)) or (can_set is not None and not can_set()):
            continue
        inside.add(path)
        current = module.get_experts_implementation()
        chosen = ({k: _FOR_ONNX.get(v, v) for k, v in current.items()} if isinstance(current, dict)
                  else _FOR_ONNX.get(current, current))
        if chosen != current:
            module.set_experts_implementation(chosen)
            changed.append((module, current))
            said += sorted({f"{v} -> {_FOR_ONNX[v]}" for v in (current.values() if isinstance(current, dict) else [current])
                            if v in _FOR_ONNX})
    try:
        yield sorted(set(said))
    finally:
        for module, original in reversed(changed):
            module.set_experts_implementation(original)


def _write_onnx(model: nn.Module, args: tuple, kwargs: dict, dest: Path, *, opset: int | None,
                dynamic_batch: bool, verbose: bool) -> tuple[list[str], torch.dtype | None]:
    """Write the ONNX file; returns the experts implementations exported instead of the model's ("a -> b"), and
    the 16-bit dtype of a model written as float32 (onnxruntime's CPU provider lacks most bf16 kernels)."""
    named_inputs(model, args, kwargs)  # inputs that do not fit forward's signature: a clear error first
    with modes_kept(model, training=False), cache_off(model), torch.no_grad():
        try:
            names = output_names(model(*args, **kwargs))  # a wrong input shape is the user's, not the exporter's
        except Exception as exc:
            raise ConfigError(f"the model failed on the example inputs ({first_line(exc)}); "
                              "check --input-shape / --input") from None
    if dynamic_batch:
        first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)
        if first is not None and first.shape[0] == 1:
            args, kwargs = _with_batch(args, kwargs, 2)
    # Attention decomposed by its math kernel: the fused CPU kernel's decomposition ends in a view that a
    # symbolic batch cannot take (transformers' Swin with SDPA, captured or not: "Cannot view a tensor ...").
    # A key/value cache is generation's state, not the deployed function's output (transformers' use_cache).
    with quiet(verbose), modes_kept(model, training=False), cache_off(model), sdpa_kernel([SDPBackend.MATH]), \
            onnx_experts(model) as experts, in_float32(model) as precision:
        # A sequence axis the model fixes (a length baked into a mask or a buffer) stops the export: the
        # sequence is then fixed to the example's, and the batch alone is dynamic.
        tries = [True, False] if dynamic_batch and sequence_inputs(named_inputs(model, args, kwargs)) else [False]
        for sequence in tries:
            dynamic = _dynamic_shapes(model, args, kwargs, sequence) if dynamic_batch else None
            try:
                program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic,
                                            opset_version=opset, verbose=verbose, output_names=names)
                break
            except Exception as exc:
                failure = exc
        else:  # no try exported
            cause = explain(_root_cause(failure)).reason  # in the user's terms, at their line where it has one
            hint = "; the batch axis may not be free: try --static-batch" if dynamic_batch and "batch" in cause else ""
            raise ExportError(f"torch.onnx.export failed: {cause}{hint} (--verbose shows the exporter's log)") from None
        # program.model is the ONNX graph in memory, its weights the model's own tensors; program.model_proto
        # would copy them all into one protobuf message, which cannot pass 2 GB.
        written = program.model.opset_imports.get("", program.model.opset_imports.get("ai.onnx"))
        if opset is not None and written != opset:
            raise ExportError(f"the exporter cannot write opset {opset} for this model (it offers {written}); "
                              f"use --opset {written} or leave --opset out")
        _save(program, dest)
    return experts, precision


def _save(program, dest: Path) -> None:
    """Write the exported program at ``dest``: one file, or past ``EXTERNAL_DATA_BYTES`` of weights the graph at
    ``dest`` and the weights in ``<dest>.data`` beside it, each tensor written straight from the model's memory."""
    from google.protobuf.message import EncodeError

    weights = sum(v.const_value.nbytes for v in program.model.graph.initializers.values() if v.const_value is not None)
    try:
        with writing(dest):  # a full disk names the output this temp file stands for
            program.save(str(dest), external_data=weights > EXTERNAL_DATA_BYTES)
    except EncodeError:  # the graph without its weights is still over protobuf's 2 GB
        raise ExportError(f"the ONNX graph is over 2 GB even with its {weights / 2**30:.2f} GiB of weights in an "
                          "external data file (large constants in the graph itself?)") from None


def _describe(path: Path, seconds: float) -> OnnxExport:
    import onnx

    try:  # by its path: a model with external data is checked without loading its weights
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejects the exported model: {first_line(exc)}") from None
    proto = onnx.load(str(path), load_external_data=False)
    data = companion_of(path, DATA_SUFFIX)
    locations = {e.value for i in proto.graph.initializer for e in i.external_data if e.key == "location"}
    if locations - {data.name}:
        raise ExportError(f"the exported graph names external data {sorted(locations)}, not {data.name} beside it")
    nodes = list(proto.graph.node)
    random_ops = sorted({n.op_type for n in nodes} & RANDOM_OPS)
    if random_ops:
        raise ExportError(f"the exported graph holds random ops ({', '.join(random_ops)}); inference must be deterministic")
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    dynamic = [i.name for i in inputs if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param]
    axes = {i.name: [d.dim_param or None for d in i.type.tensor_type.shape.dim] for i in inputs}
    axes = {name: dims for name, dims in axes.items() if any(dims)}
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxExport(
        path=str(path), nodes=len(nodes), op_types=dict(Counter(n.op_type for n in nodes).most_common()),
        scale_nodes=sum(1 for n in nodes if _from_scale_module(n)), file_bytes=path.stat().st_size, opset=opset,
        inputs=[i.name for i in inputs], outputs=[o.name for o in proto.graph.output], dynamic_inputs=dynamic,
        dynamic_axes=axes,
        seconds=seconds, data_bytes=data.stat().st_size if locations else None,
    )


# a scope named by a Scale module, at the top or inside a block rewritten in place ('blocks.0.sd_scale_1')
_SCALE_SCOPE = re.compile(r"['.]sd_scale_\d+'")


def _from_scale_module(node) -> bool:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    return _SCALE_SCOPE.search(scopes) is not None


def write_onnx(model: nn.Module, example_inputs, dest: str | os.PathLike, *, opset: int | None = None,
               dynamic_batch: bool = True, verbose: bool = False) -> OnnxExport:
    """Export and check, writing straight to ``dest`` (callers stage it; see ``export_onnx``)."""
    args, kwargs = args_kwargs(example_inputs)
    started = time.perf_counter()
    experts, precision = _write_onnx(model, args, kwargs, Path(dest), opset=opset, dynamic_batch=dynamic_batch,
                                     verbose=verbose)
    result = _describe(Path(dest), time.perf_counter() - started)
    result.experts, result.upcast_from = experts, None if precision is None else str(precision).removeprefix("torch.")
    return result


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, opset: int | None = None,
                dynamic_batch: bool = True, verbose: bool = False) -> OnnxExport:
    """Export ``model`` (in eval mode) to ONNX at ``path`` with torch.onnx's dynamo exporter, then check it.

    ``example_inputs``: a tensor, tuple, dict or ``(args, kwargs)``. With ``dynamic_batch`` the first
    axis of every input that shares the first input's batch size is dynamic. The file is written
    atomically and checked with ``onnx.checker``; a graph holding random ops is refused. Past
    ``EXTERNAL_DATA_BYTES`` of weights they go to ``<path>.data`` beside it (``OnnxExport.data_path``).
    """
    with staged_pair(path, DATA_SUFFIX) as tmp:
        result = write_onnx(model, example_inputs, tmp, opset=opset, dynamic_batch=dynamic_batch, verbose=verbose)
    result.path = str(path)
    return result


def args_kwargs(example_inputs) -> tuple[tuple, dict]:
    inputs = normalize_inputs(example_inputs)
    if inputs is None:
        raise ConfigError("export needs example inputs: give --input-shape 1,3,224,224 or --input NAME:SHAPE[:DTYPE]")
    return inputs


# --- verification -----------------------------------------------------------------------------------------


