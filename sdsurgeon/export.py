"""ONNX export with torch.onnx (dynamo), onnx.checker, and verification against PyTorch with onnxruntime."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree

from .capture import DTYPES, InputSpec, normalize_inputs
from .errors import ConfigError, ExportError, VerificationError, first_line
from .files import staged

# Ops that would make inference random; a correct export of a folded model holds none.
RANDOM_OPS = frozenset({"RandomUniform", "RandomUniformLike", "RandomNormal", "RandomNormalLike",
                        "Bernoulli", "Multinomial", "Dropout"})
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch.fx", "torch._dynamo", "onnxscript", "onnx_ir")
_PROTOBUF_LIMIT = 2**31 - 1


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

    def to_dict(self) -> dict:
        return {"path": self.path, "nodes": self.nodes, "scale_nodes": self.scale_nodes, "file_bytes": self.file_bytes,
                "opset": self.opset, "inputs": self.inputs, "outputs": self.outputs,
                "dynamic_inputs": self.dynamic_inputs, "op_types": self.op_types, "seconds": round(self.seconds, 3)}


@dataclass
class OutputError:
    name: str
    max_abs: float  # max |ort - torch|
    max_rel: float  # max_abs relative to the output's scale: max |ort - torch| / max |torch|
    tolerance_used: float  # max |ort - torch| / (atol + rtol |torch|): the check passes while this is <= 1

    def to_dict(self) -> dict:
        return {"name": self.name, "max_abs": self.max_abs, "max_rel": self.max_rel,
                "tolerance_used": self.tolerance_used}


@dataclass
class Verification:
    """onnxruntime against PyTorch on fresh random inputs: worst errors per output over all runs."""

    ok: bool
    rtol: float
    atol: float
    batch_sizes: list[int]
    outputs: list[OutputError] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def tolerance_used(self) -> float:
        return max((o.tolerance_used for o in self.outputs), default=0.0)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "rtol": self.rtol, "atol": self.atol, "batch_sizes": self.batch_sizes,
                "max_abs": self.max_abs, "max_rel": self.max_rel, "tolerance_used": self.tolerance_used,
                "outputs": [o.to_dict() for o in self.outputs],
                "seconds": round(self.seconds, 3)}


# --- quiet exporter ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[io.StringIO]:
    """Keep the exporter's prints, warnings and logs from the user unless ``verbose``."""
    log = io.StringIO()
    if verbose:
        yield log
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)  # torch logs a failed trace at ERROR: that, too, is the exporter's
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            yield log
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes.items():
            m.training = training


# --- inputs -----------------------------------------------------------------------------------------------


def _named_inputs(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
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


def _batch_inputs(tensors: list[torch.Tensor]) -> list[bool]:
    """Which inputs share the batch axis: those whose first dimension equals the first input's."""
    first = next((t for t in tensors if t.dim() > 0), None)
    return [first is not None and t.dim() > 0 and t.shape[0] == first.shape[0] for t in tensors]


def _dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    """torch.export spec making dim 0 of the batch inputs one shared dynamic "batch" dimension."""
    batch = torch.export.Dim("batch")
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    tensors = [v for v in bound.arguments.values() if isinstance(v, torch.Tensor)]
    is_batch = iter(_batch_inputs(tensors))
    spec = {}
    for name, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            spec[name] = {0: batch} if next(is_batch) else None
        else:
            spec[name] = None
    return spec


def _with_batch(args: tuple, kwargs: dict, size: int) -> tuple[tuple, dict]:
    """The same inputs with the batch axis resized (torch.export treats a batch of 1 as a constant)."""
    flat = list(args) + list(kwargs.values())
    is_batch = iter(_batch_inputs([t for t in flat if isinstance(t, torch.Tensor)]))

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


def _write_onnx(model: nn.Module, args: tuple, kwargs: dict, dest: Path, *, opset: int | None,
                dynamic_batch: bool, verbose: bool) -> None:
    _named_inputs(model, args, kwargs)  # inputs that do not fit forward's signature: a clear error first
    with _eval_mode(model), torch.no_grad():
        try:
            model(*args, **kwargs)  # one forward: a wrong input shape is the user's, not the exporter's, error
        except Exception as exc:
            raise ConfigError(f"the model failed on the example inputs ({first_line(exc)}); "
                              "check --input-shape / --input") from None
    if dynamic_batch:
        first = next((t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.dim()), None)
        if first is not None and first.shape[0] == 1:
            args, kwargs = _with_batch(args, kwargs, 2)
    dynamic = _dynamic_shapes(model, args, kwargs) if dynamic_batch else None
    # Attention decomposed by its math kernel: the fused CPU kernel's decomposition ends in a view that a
    # symbolic batch cannot take (transformers' Swin with SDPA, captured or not: "Cannot view a tensor ...").
    with quiet(verbose), _eval_mode(model), sdpa_kernel([SDPBackend.MATH]):
        try:
            program = torch.onnx.export(model, args, kwargs=kwargs or None, dynamo=True, dynamic_shapes=dynamic,
                                        opset_version=opset, verbose=verbose)
        except Exception as exc:
            cause = first_line(_root_cause(exc))
            hint = "; the batch axis may not be free: try --static-batch" if dynamic_batch and "batch" in cause else ""
            raise ExportError(f"torch.onnx.export failed: {cause}{hint} (--verbose shows the exporter's log)") from None
        if program.model_proto.ByteSize() > _PROTOBUF_LIMIT:
            raise ExportError("the model is over 2 GB, which needs ONNX external data; sdsurgeon does not write that yet")
        written = next((o.version for o in program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if opset is not None and written != opset:
            raise ExportError(f"the exporter cannot write opset {opset} for this model (it offers {written}); "
                              f"use --opset {written} or leave --opset out")
        program.save(str(dest), external_data=False)


def _describe(path: Path, seconds: float) -> OnnxExport:
    import onnx

    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejects the exported model: {first_line(exc)}") from None
    nodes = list(proto.graph.node)
    random_ops = sorted({n.op_type for n in nodes} & RANDOM_OPS)
    if random_ops:
        raise ExportError(f"the exported graph holds random ops ({', '.join(random_ops)}); inference must be deterministic")
    initializers = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    dynamic = [i.name for i in inputs if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param]
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxExport(
        path=str(path), nodes=len(nodes), op_types=dict(Counter(n.op_type for n in nodes).most_common()),
        scale_nodes=sum(1 for n in nodes if _from_scale_module(n)), file_bytes=path.stat().st_size, opset=opset,
        inputs=[i.name for i in inputs], outputs=[o.name for o in proto.graph.output], dynamic_inputs=dynamic,
        seconds=seconds,
    )


def _from_scale_module(node) -> bool:
    scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), "")
    return "'sd_scale_" in scopes


def write_onnx(model: nn.Module, example_inputs, dest: str | os.PathLike, *, opset: int | None = None,
               dynamic_batch: bool = True, verbose: bool = False) -> OnnxExport:
    """Export and check, writing straight to ``dest`` (callers stage it; see ``export_onnx``)."""
    args, kwargs = _inputs(example_inputs)
    started = time.perf_counter()
    _write_onnx(model, args, kwargs, Path(dest), opset=opset, dynamic_batch=dynamic_batch, verbose=verbose)
    return _describe(Path(dest), time.perf_counter() - started)


def export_onnx(model: nn.Module, example_inputs, path: str | os.PathLike, *, opset: int | None = None,
                dynamic_batch: bool = True, verbose: bool = False) -> OnnxExport:
    """Export ``model`` (in eval mode) to ONNX at ``path`` with torch.onnx's dynamo exporter, then check it.

    ``example_inputs``: a tensor, tuple, dict or ``(args, kwargs)``. With ``dynamic_batch`` the first
    axis of every input that shares the first input's batch size is dynamic. The file is written
    atomically and checked with ``onnx.checker``; a graph holding random ops is refused.
    """
    with staged(path) as tmp:
        result = write_onnx(model, example_inputs, tmp, opset=opset, dynamic_batch=dynamic_batch, verbose=verbose)
    result.path = str(path)
    return result


def _inputs(example_inputs) -> tuple[tuple, dict]:
    inputs = normalize_inputs(example_inputs)
    if inputs is None:
        raise ConfigError("export needs example inputs: give --input-shape 1,3,224,224 or --input NAME:SHAPE[:DTYPE]")
    return inputs


# --- verification -----------------------------------------------------------------------------------------


def _fresh_inputs(model: nn.Module, args: tuple, kwargs: dict, batch: int | None, seed: int) -> dict[str, torch.Tensor]:
    """New random tensors shaped like the examples (batch axis resized), by forward argument name."""
    named = _named_inputs(model, args, kwargs)
    is_batch = _batch_inputs(list(named.values()))
    g = torch.Generator().manual_seed(seed)
    fresh = {}
    for (name, t), b in zip(named.items(), is_batch):
        shape = (batch, *t.shape[1:]) if b and batch is not None else tuple(t.shape)
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in DTYPES:
            raise ConfigError(f"input {name!r} has dtype {dtype}, which verification cannot generate")
        if t.is_floating_point() or t.dtype == torch.bool:
            fresh[name] = InputSpec(name, shape, dtype).make(g)
        else:  # integer inputs (token ids, indices): stay within the example's range
            low, high = int(t.min()), int(t.max()) + 1
            fresh[name] = torch.randint(low, max(high, low + 1), shape, generator=g, dtype=t.dtype)
    return fresh


def verify(model: nn.Module, path: str | os.PathLike, example_inputs, *, rtol: float = 1e-4, atol: float = 1e-5,
           runs: int = 3, seed: int = 1, check: bool = True) -> Verification:
    """Run the ONNX file with onnxruntime and ``model`` (eval) on ``runs`` fresh random inputs; compare.

    The inputs are shaped like ``example_inputs``; when the file's batch axis is dynamic the last run
    uses another batch size. An output passes when ``|ort - torch| <= atol + rtol * |torch|``
    everywhere; ``tolerance_used`` is the worst ``|ort - torch| / (atol + rtol |torch|)``. With ``check``
    (the default) a miss raises VerificationError; else see ``.ok``.
    """
    import onnxruntime as ort

    started = time.perf_counter()
    args, kwargs = _inputs(example_inputs)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    onnx_inputs = session.get_inputs()
    named = _named_inputs(model, args, kwargs)
    first = next((t for t in named.values() if t.dim()), None)
    example_batch = first.shape[0] if first is not None else None
    dynamic = any(isinstance(i.shape[0], str) for i in onnx_inputs if i.shape) if onnx_inputs else False
    batches = [example_batch] * runs
    if dynamic and example_batch is not None and runs > 1:
        batches[-1] = 1 if example_batch > 1 else 3
    worst: dict[int, list[float]] = {}
    names = [o.name for o in session.get_outputs()]
    failed_at: int | None = None
    with _eval_mode(model), torch.no_grad():
        for run, batch in enumerate(batches):
            fresh = _fresh_inputs(model, args, kwargs, batch, seed + run)
            expected = [t for t in _pytree.tree_leaves(model(**_rebind(model, fresh, args, kwargs)))
                        if isinstance(t, torch.Tensor)]
            feed = _feed(onnx_inputs, fresh)
            got = session.run(None, feed)
            if len(got) != len(expected):
                raise VerificationError(
                    f"{path} has {len(got)} outputs but the model returns {len(expected)} tensors"
                )
            for k, (e, g) in enumerate(zip(expected, got)):
                e64 = e.detach().to(torch.float64)
                g64 = torch.from_numpy(g).to(torch.float64)
                if tuple(g64.shape) != tuple(e64.shape):
                    raise VerificationError(f"output {names[k]}: onnxruntime gives shape {tuple(g64.shape)}, "
                                            f"PyTorch {tuple(e64.shape)} (batch {batch})")
                if not bool(torch.isfinite(e64).all()):
                    raise VerificationError(f"PyTorch's own output {names[k]} holds NaN or Inf (batch {batch}), so "
                                            f"there is nothing to check the ONNX file against: {_non_finite(model)}; "
                                            "no ONNX file was kept")
                diff = (g64 - e64).abs().nan_to_num(nan=float("inf"))  # NaN from onnxruntime alone: a miss
                allowed = atol + rtol * e64.abs()
                scale = float(e64.abs().max()) if e64.numel() else 0.0
                max_abs = float(diff.max()) if diff.numel() else 0.0
                used = float((diff / allowed).max()) if diff.numel() and bool((allowed > 0).all()) else (
                    0.0 if max_abs == 0 else float("inf"))
                prev = worst.setdefault(k, [0.0, 0.0, 0.0])
                rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
                prev[:] = max(prev[0], max_abs), max(prev[1], rel), max(prev[2], used)
                if failed_at is None and not bool((diff <= allowed).all()):
                    failed_at = run
    result = Verification(
        ok=failed_at is None, rtol=rtol, atol=atol, batch_sizes=[b for b in batches if b is not None],
        outputs=[OutputError(names[k], *v) for k, v in sorted(worst.items())],
        seconds=time.perf_counter() - started,
    )
    if check and not result.ok:
        bad = max(result.outputs, key=lambda o: o.tolerance_used)
        raise VerificationError(
            f"onnxruntime differs from PyTorch beyond rtol {rtol:g} / atol {atol:g}: output {bad.name} max abs error "
            f"{bad.max_abs:.3g} ({bad.tolerance_used:.3g}x the tolerance, batch {batches[failed_at]}); "
            "no ONNX file was kept",
            result,
        )
    return result


def _non_finite(model: nn.Module) -> str:
    """Where a model's NaN or Inf comes from: its weights (named), or an overflow on the inputs."""
    bad = {name: int((~torch.isfinite(t)).sum()) for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())}
    if not bad:
        return "its weights are finite, so it overflows on random inputs"
    first = next(iter(bad))
    return (f"its weights hold {sum(bad.values())} NaN or Inf values in {len(bad)} tensors (first: {first}); "
            "check the checkpoint (a diverged training run?)")


def _rebind(model: nn.Module, fresh: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> dict:
    """Keyword arguments for model(...) with the fresh tensors in place of the examples."""
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    call = {}
    for name, value in bound.arguments.items():
        kind = bound.signature.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ConfigError(f"{type(model).__name__}.forward takes *args/**kwargs, which verification cannot bind")
        call[name] = fresh.get(name, value)
    return call


def _feed(onnx_inputs, fresh: dict[str, torch.Tensor]) -> dict:
    tensors = list(fresh.values())
    feed = {}
    for k, i in enumerate(onnx_inputs):
        t = fresh[i.name] if i.name in fresh else tensors[k]  # the exporter names inputs after forward's arguments
        feed[i.name] = t.numpy()
    return feed


def export_verified(model: nn.Module, example_inputs, path: str | os.PathLike, *, reference: nn.Module | None = None,
                    opset: int | None = None, dynamic_batch: bool = True, rtol: float = 1e-4, atol: float = 1e-5,
                    verbose: bool = False) -> tuple[OnnxExport, Verification]:
    """Export, check and verify; ``path`` appears only if every check passed.

    onnxruntime is compared against ``reference`` (default: ``model``), e.g. the injected model
    before folding, so the check covers the fold as well as the export.
    """
    with staged(path) as tmp:
        exported = write_onnx(model, example_inputs, tmp, opset=opset, dynamic_batch=dynamic_batch, verbose=verbose)
        checked = verify(reference if reference is not None else model, tmp, example_inputs, rtol=rtol, atol=atol)
    exported.path = str(path)
    return exported, checked
