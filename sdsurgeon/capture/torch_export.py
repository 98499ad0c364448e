"""nn.Module -> ATen-level fx.GraphModule via torch.export (strict=False) that still switches train/eval."""

from __future__ import annotations

import contextlib
import inspect
from typing import Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.export import Dim

from .. import _torch
from ..errors import CaptureError
from .modes import modes_kept
from .where import explain, user_frame

_aten = torch.ops.aten
# Ops taking (input, p, train): captured in train mode with train=True baked in.
DROPOUT_OPS = frozenset({
    _aten.dropout.default, _aten.feature_dropout.default,
    _aten.alpha_dropout.default, _aten.feature_alpha_dropout.default,
})
_BATCH_NORM_TRAINING_ARG = 5  # aten.batch_norm(input, weight, bias, mean, var, training, momentum, eps, cudnn)
_BATCH_NORM_RUNNING_MEAN_ARG = 3  # aten.batch_norm(input, weight, bias, running_mean, ...)
_SDPA_DROPOUT_ARG = 4  # aten.scaled_dot_product_attention(q, k, v, mask, dropout_p, ...)
TRAINING = "training"  # the get_attr node that reads the GraphModule's own train/eval flag


def export_graph(model: nn.Module, args: tuple, kwargs: dict, *, training: bool = True) -> fx.GraphModule:
    """Capture ``model`` on example inputs as one ATen-level GraphModule that behaves like a module.

    The model is captured in train mode (so dropout and batch-norm statistics are in the graph) with
    every input dimension dynamic where the model allows it (raise a batch of 1 to 2 first, see
    ``at_least_two``: torch.export fixes size-1 dimensions). Then ``follow_train_eval`` makes those ops read the GraphModule's
    ``training`` flag, so ``.train()``/``.eval()`` work as on the original. The result shares
    parameters and buffers with ``model`` and has its state_dict keys. Capture transformers models
    inside ``cache_off`` (a cache is not a training input). ``training=False`` captures the eval-mode
    function instead (what ONNX export captures).
    """
    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    dynamic = {name: _torch.tree_map(_any_size, value) for name, value in bound.items()}
    with modes_kept(model, training=training), _quiet_export():
        try:
            program = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
        except Exception as exc:  # torch.export raises many types; all mean "cannot capture"
            what = f"torch.export could not capture {type(model).__name__}: {explain(exc).reason}"
            hint = "try --capture fx (with --leaf CLASS for the module that fails) or another input spec"
            frame = user_frame(exc)
            raise CaptureError(f"{what}; {hint}", what=what, hint=hint,
                               where=None if frame is None else str(frame)) from None
    gm = program.module(check_guards=False)
    # module() binds train()/eval() to methods that refuse: drop them so nn.Module's own apply.
    gm.__dict__.pop("train", None)
    gm.__dict__.pop("eval", None)
    # Its pre-hook checks inputs against the example's ranges (batch >= 2 after the raise above);
    # the graph itself is generic, and a wrong input still fails in the op that cannot take it.
    gm.validate_inputs = False
    # module() also hooks in input checks and a context for nn.Module inputs (there are none); the
    # hooks are local lambdas, which would make the model impossible to pickle.
    for hooks in (gm._forward_pre_hooks, gm._forward_hooks, gm._forward_pre_hooks_with_kwargs,
                  gm._forward_hooks_with_kwargs, gm._forward_hooks_always_called):
        hooks.clear()
    # Unpickling re-traces the generated code with this tracer; export's own needs arguments it lacks.
    gm._tracer_cls, gm._tracer_extras = None, {}
    follow_train_eval(gm)
    gm.train(model.training)
    return gm


def follow_train_eval(gm: fx.GraphModule) -> fx.GraphModule:
    """Pass: make train-mode-only ops of a train-mode capture read ``gm.training`` at run time.

    Mutates and returns ``gm``. Dropout's and batch norm's ``train`` flags, attention dropout's rate
    and batch norm's ``num_batches_tracked += 1`` all become conditional on the flag; views become
    reshapes (eval may give another memory layout than the train-mode trace saw).
    """
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else next(iter(graph.nodes))
    with graph.inserting_after(anchor):
        training = graph.create_node("get_attr", TRAINING, name=TRAINING)
    used = False
    for n in list(graph.nodes):
        if n.op != "call_function":
            continue
        if n.target in DROPOUT_OPS and len(n.args) > 2 and n.args[2] is True:
            n.update_arg(2, training)
        elif (n.target is _aten.batch_norm.default and n.args[_BATCH_NORM_TRAINING_ARG] is True
              and n.args[_BATCH_NORM_RUNNING_MEAN_ARG] is not None):
            # Without running statistics a batch norm uses the batch's in eval too (nn.BatchNorm's rule).
            n.update_arg(_BATCH_NORM_TRAINING_ARG, training)
        elif n.target is _aten.scaled_dot_product_attention.default and _sdpa_dropout(n):
            with graph.inserting_before(n):
                rate = graph.call_function(train_only, (training, _sdpa_dropout(n)))
            if "dropout_p" in n.kwargs:
                n.update_kwarg("dropout_p", rate)
            else:
                n.update_arg(_SDPA_DROPOUT_ARG, rate)
        elif n.target is _aten.view.default and not _written_through(n):
            # The capture saw train-mode memory layouts; eval may lay a tensor out otherwise (attention
            # without dropout does), and a view only works on the layout it was traced with.
            n.target = _aten.reshape.default
            continue
        elif n.target is _torch.private_aten("_assert_tensor_metadata"):
            # dtype checks the capture recorded at every .to(): they would count as users of the
            # value they check and so hide residual branches; the ops themselves still check dtypes.
            graph.erase_node(n)
            continue
        elif n.target is _aten.add_.Tensor and _is_batch_counter(n):
            with graph.inserting_before(n):
                counted = graph.call_function(count_batch, (n.args[0], training))
            n.replace_all_uses_with(counted)
            graph.erase_node(n)
        else:
            continue
        used = True
    if not used:
        graph.erase_node(training)
    graph.lint()
    gm.recompile()
    return gm


@contextlib.contextmanager
def cache_off(model: nn.Module) -> Iterator[None]:
    """transformers-style ``use_cache`` off in every config the model's modules hold, then as it was (plan never
    changes a model). Every one, not the top one alone: an encoder-decoder's stacks read copies of their own (T5's
    decoder builds an ``EncoderDecoderCache`` from its copy, and a capture cannot return one)."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules()) if getattr(c, "use_cache", None)}
    cached = {key: c.use_cache for key, c in configs.items()}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for key, c in configs.items():
            c.use_cache = cached[key]


def train_only(training: bool, value: float) -> float:
    """``value`` in training, 0 in eval (attention dropout's rate)."""
    return value if training else 0.0


def count_batch(counter: torch.Tensor, training: bool) -> torch.Tensor:
    """Batch norm's ``num_batches_tracked += 1``, done only in training, as nn.BatchNorm does."""
    return counter.add_(1) if training else counter


def _any_size(value):
    """The dimensions of a tensor input that may vary at run time (torch.export fixes any the model needs fixed).

    The batch always; every dimension of an integer input (token ids, masks: sequence lengths vary);
    a float input's other dimensions (image sides) stay fixed, because symbolic image sides make
    torch.export slow (a 2-stage Swin: 80 s instead of 2.8 s to plan, 2 cores).
    """
    if not isinstance(value, torch.Tensor) or not value.dim():
        return None
    varying = range(value.dim()) if not value.dtype.is_floating_point else range(1)
    return {i: Dim.AUTO for i in varying}


def _sdpa_dropout(n: fx.Node) -> float:
    rate = n.kwargs.get("dropout_p", n.args[_SDPA_DROPOUT_ARG] if len(n.args) > _SDPA_DROPOUT_ARG else 0.0)
    return rate if isinstance(rate, float) and rate > 0 else 0.0


def _written_through(n: fx.Node) -> bool:
    """Whether an in-place op writes into this view (then it must stay a view)."""
    return any((schema := _torch.op_schema(u.target)) is not None and schema.is_mutable
               and u.args and u.args[0] is n for u in n.users)


def _is_batch_counter(n: fx.Node) -> bool:
    counter = n.args[0]
    return (isinstance(counter, fx.Node) and counter.op == "get_attr"
            and str(counter.target).endswith("num_batches_tracked") and n.args[1] == 1)


def check_train_eval(model: nn.Module, gm: fx.GraphModule, args: tuple, kwargs: dict, *, front_end: str = "export") -> None:
    """Raise CaptureError unless ``gm`` computes what ``model`` does, in eval and in train mode.

    Train mode is compared under one RNG seed (dropout draws the same masks in the same order).
    Catches train-only behaviour torch.export froze into the graph that ``follow_train_eval`` does
    not know. Buffers (batch-norm statistics) are restored afterwards; the model is not changed.
    """
    # the buffers alone: a forward updates those (batch-norm statistics), never its parameters, and a copy of every
    # weight would double the memory a large model takes (and write to weights that are memory-mapped)
    saved = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items() if not isinstance(v, nn.Parameter)}
    with modes_kept(model, gm):
        for training in (False, True):
            model.train(training)
            gm.train(training)
            with torch.no_grad(), _rng(0):
                expected = _leaves(model(*args, **kwargs))
            _restore(model, saved)
            with torch.no_grad(), _rng(0):
                got = _leaves(gm(*args, **kwargs))
            _restore(model, saved)
            if len(expected) != len(got) or not all(
                e.shape == g.shape and torch.allclose(e, g, rtol=1e-4, atol=1e-5) for e, g in zip(expected, got)
            ):
                mode = "train" if training else "eval"
                advice = ("try --capture fx with --leaf for the module that does it" if front_end == "export"
                          else "mark the module that does it with --leaf, or try --capture export")
                what = (f"the torch.{front_end} capture of {type(model).__name__} differs from the model in {mode} "
                        "mode (its forward decides something the capture froze)")
                raise CaptureError(f"{what}; {advice}", what=what, hint=advice)


def _leaves(output) -> list[torch.Tensor]:
    return [t for t in _torch.tree_leaves(output) if isinstance(t, torch.Tensor)]


def _restore(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            if k in saved:
                v.copy_(saved[k])


@contextlib.contextmanager
def _rng(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """torch.export logs failures it then raises; the caller reports them in one line instead."""
    from ..io.quiet import quiet

    with quiet(False):
        yield


def at_least_two(inputs):
    """Raise a batch dimension of 1 to 2 (repeating the sample): torch.export fixes size-1 dims."""
    def grow(t):
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1:
            return torch.cat([t, t])
        return t

    return _torch.tree_map(grow, inputs)

