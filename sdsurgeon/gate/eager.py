"""The gate's eager executors: batch mode (run the branch or not), row mode (the kept rows only), a dropped branch."""

from __future__ import annotations

from typing import Callable

import torch

from ..distributed import distributed, zero_gradient_anchor
from .spec import GateSpec


def scaled(spec: GateSpec, out: torch.Tensor) -> torch.Tensor:
    return out / spec.p if spec.scaling == "inverted" else out


def dropped(spec: GateSpec, branch: Callable, skip: torch.Tensor, branch_inputs: tuple) -> torch.Tensor:
    """The block's output when its branch is dropped: the skip (a copy where it is modified in place later)."""
    out = skip.clone() if spec.copy_skip else skip
    if distributed() and torch.is_grad_enabled():
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
