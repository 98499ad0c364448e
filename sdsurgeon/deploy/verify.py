"""Verification: the exported ONNX file (onnxruntime), or a plain model loaded back, against PyTorch on fresh inputs."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import _torch
from ..capture.inputs import DTYPES, InputSpec, sequence_inputs
from ..capture.modes import modes_kept
from ..capture.torch_export import cache_off
from ..errors import ConfigError, VerificationError, first_line
from ..io.files import staged_pair
from .export import DATA_SUFFIX, OnnxExport, args_kwargs, batch_inputs, half_precision, named_inputs, write_onnx


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
    precision: str | None = None  # the model's half-precision dtype the tolerances were widened for
    sequence_lengths: list[int] = field(default_factory=list)  # of the token inputs, run by run (a dynamic axis)

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
        return {"ok": self.ok, "rtol": self.rtol, "atol": self.atol, "precision": self.precision,
                "batch_sizes": self.batch_sizes, "sequence_lengths": self.sequence_lengths,
                "max_abs": self.max_abs, "max_rel": self.max_rel, "tolerance_used": self.tolerance_used,
                "outputs": [o.to_dict() for o in self.outputs],
                "seconds": round(self.seconds, 3)}


def _fresh_inputs(model: nn.Module, args: tuple, kwargs: dict, batch: int | None, seed: int,
                  shorter: int = 0) -> dict[str, torch.Tensor]:
    """New random tensors shaped like the examples (batch axis resized), by forward argument name; with
    ``shorter``, token inputs' sequence axis is cut to ``length * (4 - shorter) // 4`` (at least 2)."""
    named = named_inputs(model, args, kwargs)
    is_batch = batch_inputs(list(named.values()))
    sequences = sequence_inputs(named) if shorter else {}
    g = torch.Generator().manual_seed(seed)
    fresh = {}
    for (name, t), b in zip(named.items(), is_batch):
        shape = (batch, *t.shape[1:]) if b and batch is not None else tuple(t.shape)
        if name in sequences and t.shape[1] > 2:
            shape = (shape[0], max(2, t.shape[1] * (4 - shorter) // 4), *shape[2:])
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

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise VerificationError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    onnx_inputs = session.get_inputs()
    dynamic = any(isinstance(i.shape[0], str) for i in onnx_inputs if i.shape) if onnx_inputs else False
    sequence = any(len(i.shape) > 1 and isinstance(i.shape[1], str) for i in onnx_inputs)

    def run(fresh: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [torch.from_numpy(g) for g in session.run(None, _feed(onnx_inputs, fresh))]

    names = [o.name for o in session.get_outputs()]
    return _compare(model, run, names, example_inputs, dynamic, rtol=rtol, atol=atol, runs=runs, seed=seed,
                    check=check, who="onnxruntime", what=str(path), kept="no ONNX file was kept", sequence=sequence)


@dataclass
class Reference:
    """A model's outputs on the fresh random inputs of a check, recorded first: the model itself can then be let go
    before what it is checked against is loaded (two models of a few GB need not be held at once)."""

    precision: torch.dtype | None  # the half-precision dtype the tolerances widen for
    batches: list[int | None]
    recorded: list[tuple[dict[str, torch.Tensor], list[torch.Tensor], str | None]]  # inputs, outputs, why not finite
    lengths: list[int] = field(default_factory=list)  # of the token inputs, run by run (a dynamic axis)
    names: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)


def reference_outputs(model: nn.Module, example_inputs, *, runs: int = 3, seed: int = 1) -> Reference:
    """``model``'s outputs (eval) on the inputs ``verify_module`` checks with: give it in place of the model."""
    started = time.perf_counter()
    args, kwargs = args_kwargs(example_inputs)
    names = [f"output {k}" for k in range(len(_tensors(_run_eval(model, args, kwargs))))]
    reference = _reference(model, example_inputs, True, runs=runs, seed=seed)
    reference.names, reference.started = names, started
    return reference


def verify_module(model: nn.Module | Reference, other: nn.Module, example_inputs, *, what: str, kept: str,
                  rtol: float = 1e-4, atol: float = 1e-5, runs: int = 3, seed: int = 1,
                  check: bool = True) -> Verification:
    """``other`` (eval) against ``model`` (eval) on fresh random inputs, as ``verify`` checks an ONNX file:
    the plain architecture loaded back from what was written, against the gated model. ``model`` may be its
    ``reference_outputs``, recorded before (then ``runs`` and ``seed`` are the ones recorded with)."""
    args, kwargs = args_kwargs(example_inputs)

    def run(fresh: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        with modes_kept(other, training=False), cache_off(other):
            return _tensors(other(**_rebind(other, fresh, args, kwargs)))

    reference = model if isinstance(model, Reference) else reference_outputs(model, example_inputs, runs=runs,
                                                                              seed=seed)
    return _check(reference, run, reference.names, rtol=rtol, atol=atol, check=check, who=what, what=what, kept=kept)


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in _torch.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _run_eval(model: nn.Module, args: tuple, kwargs: dict):
    with modes_kept(model, training=False), cache_off(model), torch.no_grad():
        return model(*args, **kwargs)


def _compare(model: nn.Module, run, names: list[str], example_inputs, dynamic: bool, *, rtol: float, atol: float,
             runs: int, seed: int, check: bool, who: str, what: str, kept: str, sequence: bool = False) -> Verification:
    """``run(fresh inputs) -> output tensors`` against ``model`` in eval, output by output, over ``runs`` inputs;
    with ``sequence`` (a dynamic sequence axis) each run after the first is shorter (three lengths)."""
    reference = _reference(model, example_inputs, dynamic, runs=runs, seed=seed, sequence=sequence)
    return _check(reference, run, names, rtol=rtol, atol=atol, check=check, who=who, what=what, kept=kept)


def _reference(model: nn.Module, example_inputs, dynamic: bool, *, runs: int, seed: int,
               sequence: bool = False) -> Reference:
    """``model``'s outputs in eval on ``runs`` fresh inputs shaped like ``example_inputs`` (with ``dynamic`` the last
    of another batch size; with ``sequence`` each run after the first shorter)."""
    started = time.perf_counter()
    args, kwargs = args_kwargs(example_inputs)
    named = named_inputs(model, args, kwargs)
    first = next((t for t in named.values() if t.dim()), None)
    example_batch = first.shape[0] if first is not None else None
    batches = [example_batch] * runs
    if dynamic and example_batch is not None and runs > 1:
        batches[-1] = 1 if example_batch > 1 else 3
    reference = Reference(half_precision(model), batches, [], started=started)
    with modes_kept(model, training=False), cache_off(model), torch.no_grad():
        for attempt, batch in enumerate(batches):
            fresh = _fresh_inputs(model, args, kwargs, batch, seed + attempt, attempt % 3 if sequence else 0)
            try:
                expected = _tensors(model(**_rebind(model, fresh, args, kwargs)))
            except Exception:
                if not (sequence and attempt % 3):
                    raise
                # the reference itself takes only the example's length (a capture specialised on it)
                sequence = False
                fresh = _fresh_inputs(model, args, kwargs, batch, seed + attempt)
                expected = _tensors(model(**_rebind(model, fresh, args, kwargs)))
            if sequence:
                reference.lengths += [fresh[n].shape[1] for n in sequence_inputs(fresh)][:1]
            finite = all(bool(torch.isfinite(e.detach()).all()) for e in expected if e.is_floating_point())
            reference.recorded.append((fresh, [e.detach() for e in expected], None if finite else _non_finite(model)))
    return reference


def _check(reference: Reference, run, names: list[str], *, rtol: float, atol: float, check: bool, who: str,
           what: str, kept: str) -> Verification:
    """``run(fresh inputs) -> output tensors`` against the recorded reference, output by output."""
    precision = reference.precision
    # Two computations of one model in bf16/fp16 (folded and gated, or another runtime) round apart by a few
    # units of the dtype's precision, relative to the size of the values: the tolerances widen to that.
    ulps = 4 * torch.finfo(precision).eps if precision is not None else 0.0
    rtol = max(rtol, ulps)
    atols: list[float] = [atol]
    batches = reference.batches
    worst: dict[int, list[float]] = {}
    failed_at: int | None = None
    with torch.no_grad():
        for attempt, (fresh, expected, not_finite) in enumerate(reference.recorded):
            batch = batches[attempt]
            got = run(fresh)
            if len(got) != len(expected):
                raise VerificationError(f"{what} has {len(got)} outputs but the model returns {len(expected)} tensors")
            for k, (e, g) in enumerate(zip(expected, got)):
                if tuple(g.shape) != tuple(e.shape):
                    raise VerificationError(f"output {names[k]}: {who} gives shape {tuple(g.shape)}, "
                                            f"PyTorch {tuple(e.shape)} (batch {batch})")
                if not all(bool(torch.isfinite(c).all()) for c in _chunks64(e)):
                    raise VerificationError(f"PyTorch's own output {names[k]} holds NaN or Inf (batch {batch}), so "
                                            f"there is nothing to check {what} against: {not_finite}; {kept}")
                scale = max((float(c.abs().max()) for c in _chunks64(e)), default=0.0)
                atols.append(max(atol, ulps * scale))
                max_abs, used, within = _errors(e, g, atols[-1], rtol)
                prev = worst.setdefault(k, [0.0, 0.0, 0.0])
                rel = max_abs / scale if scale else (0.0 if max_abs == 0 else float("inf"))
                prev[:] = max(prev[0], max_abs), max(prev[1], rel), max(prev[2], used)
                if failed_at is None and not within:
                    failed_at = attempt
    atol = max(atols)
    result = Verification(
        ok=failed_at is None, rtol=rtol, atol=atol, batch_sizes=[b for b in batches if b is not None],
        outputs=[OutputError(names[k], *v) for k, v in sorted(worst.items())],
        seconds=time.perf_counter() - reference.started,
        precision=None if precision is None else str(precision).removeprefix("torch."),
        sequence_lengths=reference.lengths,
    )
    if check and not result.ok:
        bad = max(result.outputs, key=lambda o: o.tolerance_used)
        fitted = f", fitted to {result.precision}" if precision is not None else ""
        raise VerificationError(
            f"{who} differs from PyTorch beyond rtol {rtol:g} / atol {atol:g}{fitted}: output {bad.name} max abs error "
            f"{bad.max_abs:.3g} ({bad.tolerance_used:.3g}x the tolerance, batch {batches[failed_at]}); {kept}",
            result,
        )
    return result


CHUNK = 1 << 20  # elements compared at a time in float64 (8 MiB each): an LM's logits are never copied whole


def _chunks64(t: torch.Tensor):
    """``t``'s elements in float64, a chunk at a time."""
    flat = t.detach().reshape(-1)
    for start in range(0, flat.numel(), CHUNK):
        yield flat[start:start + CHUNK].to(torch.float64)


def _errors(expected: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> tuple[float, float, bool]:
    """max |got - expected|, the largest share of the tolerance ``atol + rtol |expected|`` it uses, and whether every
    element is within it (a NaN only ``got`` holds is a miss), in float64 a chunk at a time."""
    max_abs, used, within, unbounded = 0.0, 0.0, True, False
    for e64, g64 in zip(_chunks64(expected), _chunks64(got)):
        diff = (g64 - e64).abs().nan_to_num(nan=float("inf"))
        allowed = atol + rtol * e64.abs()
        max_abs = max(max_abs, float(diff.max()))
        if bool((allowed > 0).all()):
            used = max(used, float((diff / allowed).max()))
        else:  # a zero tolerance somewhere: no share of it to give
            unbounded = True
        within = within and bool((diff <= allowed).all())
    if unbounded:
        used = 0.0 if max_abs == 0 else float("inf")
    return max_abs, used, within


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
    with staged_pair(path, DATA_SUFFIX) as tmp:
        exported = write_onnx(model, example_inputs, tmp, opset=opset, dynamic_batch=dynamic_batch, verbose=verbose)
        checked = verify(reference if reference is not None else model, tmp, example_inputs, rtol=rtol, atol=atol)
    exported.path = str(path)
    return exported, checked
