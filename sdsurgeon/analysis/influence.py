"""Block influence: how much each gated block changes the residual stream on calibration inputs (runs the model; changes nothing)."""

from __future__ import annotations

import torch
from torch import nn

from ..capture.inputs import normalize_inputs
from ..capture.modes import modes_kept
from ..gate import gates

# What block_influence measures, in words (reports quote it).
INFLUENCE_MEASURE = ("block influence = 1 - cos(skip, skip + p_l * f(x)) between the block's skip value and its output, "
                     "each sample's features flattened, averaged over the calibration samples (model in eval)")


def block_influence(model: nn.Module, inputs) -> dict[str, float]:
    """One figure per gated site (site id -> influence, in depth order): ``1 - cos(skip, output)``.

    ShortGPT's block influence (Men et al. 2024), taken per residual site: a block that leaves the
    residual stream pointing the same way (influence near 0) is the cheapest to remove. Measured with
    the model in eval (every branch on, scaled by its p_l), on ``inputs`` (a tensor, a tuple, a dict
    or ``(args, kwargs)``). Read-only: the model's modes are restored and nothing else changes.
    """
    found = gates(model)
    sums = {g.site_id: [0.0, 0] for g in found}

    def hook(gate, args, output):
        skip = args[0]
        if not isinstance(skip, torch.Tensor) or not isinstance(output, torch.Tensor) or skip.shape != output.shape:
            return
        a = skip.detach().double().reshape(skip.shape[0], -1) if skip.dim() else skip.detach().double().reshape(1, 1)
        b = output.detach().double().reshape(a.shape)
        cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
        total = sums[gate.site_id]
        total[0] += float((1 - cos).sum())
        total[1] += cos.numel()

    run_hooked(model, inputs, [(g, hook) for g in found])
    return {sid: (s / n if n else float("nan")) for sid, (s, n) in sums.items()}


def run_hooked(model: nn.Module, inputs, hooks, *, with_kwargs: bool = False) -> None:
    """One forward of ``model`` on ``inputs`` in eval, without grad, with each ``(module, hook)`` of ``hooks`` as a
    forward hook; the hooks are removed and the modes restored after, whatever happens (the model is run, never changed)."""
    args, kwargs = normalize_inputs(inputs)
    handles = [module.register_forward_hook(hook, with_kwargs=with_kwargs) for module, hook in hooks]
    try:
        with modes_kept(model, training=False), torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
