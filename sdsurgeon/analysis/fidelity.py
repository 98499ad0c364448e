"""How close one model's outputs stay to a reference's on the same inputs, and how many parameters a model uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .. import _torch
from ..capture.inputs import normalize_inputs
from ..capture.modes import modes_kept


@dataclass(frozen=True)
class Fidelity:
    """Outputs of a model against a reference's, in eval, on the same inputs.

    ``rel_error``: ||out - ref|| / ||ref|| over the whole main output; ``cosine``: cosine similarity of
    each sample's output with the reference's, averaged; ``top1``: the share of samples whose argmax
    agrees, only where the output looks like class logits (one row of scores per sample).
    """

    rel_error: float
    cosine: float
    top1: float | None
    samples: int
    output: str  # which output was compared ("output", "logits", "output[0]", ...)

    def to_dict(self) -> dict:
        return {"rel_error": _round(self.rel_error), "cosine": _round(self.cosine),
                "top1_agreement": None if self.top1 is None else _round(self.top1), "samples": self.samples,
                "output": self.output}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def main_output(out) -> tuple[str, torch.Tensor]:
    """The output compared: the tensor itself, a mapping's ``logits``, else the first floating-point tensor."""
    if isinstance(out, torch.Tensor):
        return "output", out
    if hasattr(out, "keys") and "logits" in out.keys() and isinstance(out["logits"], torch.Tensor):
        return "logits", out["logits"]
    leaves, _ = _torch.tree_flatten_with_path(out)
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return "output" + _torch.keystr(path), leaf
    raise ValueError("the model returns no floating-point tensor to compare")


def compare(got, reference) -> Fidelity:
    """``got`` (a model's outputs) against ``reference`` (another's on the same inputs)."""
    name, ref = main_output(reference)
    _, out = main_output(got)
    if out.shape != ref.shape:
        raise ValueError(f"outputs differ in shape: {tuple(out.shape)} against {tuple(ref.shape)}")
    a, b = out.detach().double(), ref.detach().double()
    rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
    rows_a = a.reshape(a.shape[0], -1) if a.dim() > 1 else a.reshape(1, -1)
    rows_b = b.reshape(rows_a.shape)
    cosine = float(torch.nn.functional.cosine_similarity(rows_a, rows_b, dim=1, eps=1e-30).mean())
    logits = b.dim() == 2 and b.shape[1] > 1  # (samples, classes)
    top1 = float((a.argmax(1) == b.argmax(1)).double().mean()) if logits else None
    return Fidelity(rel, cosine, top1, rows_a.shape[0], name)


def outputs_and_parameters(model: nn.Module, inputs) -> tuple[object, int]:
    """The eval outputs on ``inputs`` (detached; modes put back) and the parameter elements they depend on.

    Parameters are counted by use (those autograd reaches), not by presence: a pruned block's weights stay
    in the module tree (its state_dict keys are the original's) but no longer take part, and an export
    leaves them out.
    """
    params = [p for p in dict(model.named_parameters()).values() if p.is_floating_point()]
    args, kwargs = normalize_inputs(inputs)
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with modes_kept(model, training=False), torch.enable_grad():
            out = model(*args, **kwargs)
            leaves = [t for t in _torch.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
            grads = torch.autograd.grad(sum(t.float().sum() for t in leaves), params, allow_unused=True) if leaves else ()
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
    used = sum(p.numel() for p, g in zip(params, grads) if g is not None)
    return _torch.tree_map(lambda t: t.detach() if isinstance(t, torch.Tensor) else t, out), used
