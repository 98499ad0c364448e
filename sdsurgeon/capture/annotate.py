"""Shapes and FLOPs of every node of a captured graph, from one forward on example inputs."""

from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from .. import _torch
from ..errors import CaptureError, ConfigError, SurgeonError, first_line
from .fx import Capture
from .inputs import bind_placeholders
from .modes import modes_kept


def _cpu_flash_attention_flops(query, key, value, *_args, out_shape=None, **_kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


# A grouped matmul (mixture-of-experts layers run their experts as one): aten's, and those libraries register
# beside it (transformers::grouped_mm_fallback), by name. Not the scaled (quantised) or backward variants.
_GROUPED_MM = re.compile(r"::_?grouped_mm(_fallback)?$")


def _grouped_mm_flops(a_shape, b_shape, *_args, out_shape=None, **_kwargs) -> int:
    """2 * rows * K * N for each row against its own group's matrix: the experts each token was routed to."""
    if len(a_shape) == 2 and len(b_shape) == 3:  # (tokens, K) x (groups, K, N): each row its group's
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 3:  # (groups, M, K) x (groups, K, N): batched
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:  # (M, K) x (K, N), K split into groups
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    return 2 * a_shape[0] * a_shape[-1] * b_shape[-1]  # (groups, M, K) x (K, N) split by rows


def flop_counter_mode() -> FlopCounterMode:
    """torch's FLOP counter, taught the CPU's fused attention kernel (without it the attention of every SDPA
    model on the CPU counts zero and branch shares leave it out) and grouped matmuls (a mixture of experts'
    experts: without it an MoE layer counts its router only)."""
    kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {} if kernel is None or kernel in flop_counter.flop_registry else {kernel: _cpu_flash_attention_flops}
    mapping.update({op: _grouped_mm_flops for op in _torch.ops_named(_GROUPED_MM)
                    if op not in flop_counter.flop_registry})
    return FlopCounterMode(display=False, custom_mapping=mapping)


class _Annotator(fx.Interpreter):
    """Runs a part and records each node's output shape (``sd_shape``) and FLOPs (``sd_flops``)."""

    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode) -> None:
        super().__init__(gm)
        self.counter = counter

    def run_node(self, n: fx.Node):
        before = self.counter.get_total_flops()
        result = super().run_node(n)
        n.meta["sd_flops"] = self.counter.get_total_flops() - before
        if isinstance(result, torch.Tensor):
            n.meta["sd_shape"] = tuple(result.shape)
            n.meta["sd_dtype"] = result.dtype
        return result


def annotate(model: nn.Module, cap: Capture, args: tuple, kwargs: dict) -> Capture:
    """Run ``model`` once on example inputs (eval mode, grad on) and annotate every captured node.

    A whole-model capture is annotated by interpreting its graph: one forward. For a partial
    capture the model runs first, hooks record each part's real inputs, and each part is then
    interpreted on them. Sets ``cap.total_flops``; restores the modules' train/eval modes.
    """
    whole_graph = [p.path for p in cap.parts] == [""]
    calls: dict[str, tuple[tuple, dict]] = {}

    def recorder(path: str):
        def hook(_module, a, kw):
            calls.setdefault(path, (a, kw))

        return hook

    handles = [] if whole_graph else [
        model.get_submodule(p.path).register_forward_pre_hook(recorder(p.path), with_kwargs=True) for p in cap.parts
    ]
    try:
        # Eval: no batch-norm statistics updates, no dropout while counting. Grad on, as in training: without
        # it attention may take inference-only kernels (nn.MultiheadAttention's fast path; SDPA's fused kernel
        # where training would take the math path with a mask, timm's BEiT: 0.73 planned, 0.68 run) and the
        # plan's shares would not be those of a training step.
        with modes_kept(model, *(p.gm for p in cap.parts), training=False), torch.enable_grad(), \
                flop_counter_mode() as counter:
            try:
                if whole_graph:
                    _Annotator(cap.parts[0].gm, counter).run(*bind_placeholders(cap.parts[0].gm, args, kwargs))
                    total = counter.get_total_flops()
                else:
                    model(*args, **kwargs)
                    total = counter.get_total_flops()
            except SurgeonError:
                raise
            except Exception as exc:
                raise ConfigError(
                    f"the model failed on the example inputs ({first_line(exc)}); check --input-shape / --input"
                ) from None
            if not whole_graph:
                for part in cap.parts:
                    if part.path not in calls:
                        continue  # a part that did not run on this input keeps no annotations
                    try:
                        _Annotator(part.gm, counter).run(*bind_placeholders(part.gm, *calls[part.path]))
                    except SurgeonError:
                        raise
                    except Exception as exc:  # the trace specialised on something the real call differs in
                        raise CaptureError(
                            f"the torch.fx capture of {part.path} ({type(model.get_submodule(part.path)).__name__}) "
                            f"does not run on the inputs the model gives it ({first_line(exc)}); try --capture "
                            "export, or --leaf with its class"
                        ) from None
    finally:
        for h in handles:
            h.remove()
    cap.total_flops = total
    return cap
