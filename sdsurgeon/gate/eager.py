"""The gate's eager executors: batch mode (run the branch or not), row mode (the kept rows only), the DDP anchor."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .decision import _distributed
from .spec import GateSpec


def scaled(spec: GateSpec, out: torch.Tensor) -> torch.Tensor:
    return out / spec.p if spec.scaling == "inverted" else out


def zero_gradient_anchor(out: torch.Tensor, branch: Callable, branch_inputs: tuple) -> torch.Tensor:
    """``out`` plus zero times one element of each of the branch's parameters.

    DDP (find_unused_parameters=False) needs a gradient for every parameter: a dropped branch gives zeros.
    The branch's own modules hold them, or (ATen graphs) the graph passes them in. Parameters FSDP2 holds
    sharded (DTensors: their unit was not called this step, see capture.in_place) are left out: the unit
    is absent from the step, and FSDP2 reduces nothing for it.
    """
    owned = branch.parameters() if isinstance(branch, nn.Module) else ()
    params = [*owned, *(t for t in branch_inputs if isinstance(t, nn.Parameter))]
    anchor = [p.reshape(-1)[:1] for p in params if p.requires_grad and not _sharded(p)]
    if anchor:
        out = out + torch.cat(anchor).sum().to(out.dtype) * 0
    return out


def _sharded(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # public since torch 2.5
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


def dropped(spec: GateSpec, branch: Callable, skip: torch.Tensor, branch_inputs: tuple) -> torch.Tensor:
    """The block's output when its branch is dropped: the skip (a copy where it is modified in place later)."""
    out = skip.clone() if spec.copy_skip else skip
    if _distributed() and torch.is_grad_enabled():
        out = zero_gradient_anchor(out, branch, branch_inputs)
    return out


def batch_forward(spec: GateSpec, branch: Callable, skip: torch.Tensor, branch_inputs: tuple, keep) -> torch.Tensor:
    """One decision for the whole batch: a dropped branch runs nothing, forward or backward."""
    if not keep:
        return dropped(spec, branch, skip, branch_inputs)
    return skip + scaled(spec, branch(*branch_inputs))


def row_forward(spec: GateSpec, branch: Callable, skip: torch.Tensor, branch_inputs: tuple,
                kept: torch.Tensor) -> torch.Tensor:
    """Per-sample draws; the branch runs on the kept samples only, scattered back into the skip."""
    n = skip.shape[0]
    if kept.numel() == 0:
        return dropped(spec, branch, skip, branch_inputs)
    if kept.numel() == n:
        return skip + scaled(spec, branch(*branch_inputs))
    kept = kept.to(skip.device)
    # Inputs sharing the skip's batch size are per-sample; others (masks, tables) pass whole.
    per_sample = spec.sample_inputs or (True,) * len(branch_inputs)
    sub = [t.index_select(0, kept) if ok and isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == n else t
           for t, ok in zip(branch_inputs, per_sample)]
    out = scaled(spec, branch(*sub))
    return skip.index_add(0, kept, out.to(skip.dtype))
