"""The parts an early exit reads, found by rule on a causal LM: its LM head and the final norm between the last layer and it."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ..capture.inputs import normalize_inputs
from ..errors import EarlyExitError
from .influence import run_hooked


def first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor of a value a module takes or returns (a tensor, a tuple/list, a mapping), or None."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return next((v for v in value if isinstance(v, torch.Tensor)), None)
    if isinstance(value, Mapping):
        return next((v for v in value.values() if isinstance(v, torch.Tensor)), None)
    return None


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and bool(torch.equal(a, b))


def find_head(model: nn.Module, option: str = "--early-exit") -> str:
    """The path of the model's LM head (``get_output_embeddings()``). Raises EarlyExitError where there is none
    (``option``: the flag the message names)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        raise EarlyExitError(f"{type(model).__name__} has no LM head (get_output_embeddings() gives none): "
                             f"{option} is for causal language models", what="no LM head",
                             where=type(model).__name__, option=option)
    return next(path for path, m in model.named_modules() if m is head)


def find_final_norm(model: nn.Module, layer_list: str, head: str, examples, option: str = "--early-exit") -> str:
    """The path of the module between the last layer and the LM head, "" for none needed: on one eval forward on
    ``examples``, the module whose input is the last layer's output and whose output is what the head reads (the
    outermost of several: a wrapper's own extra steps included). Raises EarlyExitError where none is found."""
    last = f"{layer_list}.{len(model.get_submodule(layer_list)) - 1}"
    seen: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    order: list[str] = []

    def wanted(path: str) -> bool:  # not the root, nor inside the layers (but the last) or the head
        inside = path == layer_list or path.startswith((f"{layer_list}.", f"{head}."))
        return path in (last, head) or (bool(path) and not inside)

    candidates = [(path, m) for path, m in model.named_modules() if wanted(path)]

    def hook_for(path: str):
        def hook(module, args, kwargs, output):
            if path not in seen:
                order.append(path)
                seen[path] = (first_tensor(args) if args else first_tensor(kwargs), first_tensor(output))
        return hook

    if normalize_inputs(examples) is None:
        raise EarlyExitError(f"{option} finds {type(model).__name__}'s final norm on one forward: give example "
                             "inputs (--input)", option=option)
    run_hooked(model, examples, [(m, hook_for(p)) for p, m in candidates], with_kwargs=True)
    out, read = seen.get(last, (None, None))[1], seen.get(head, (None, None))[0]
    if _same(out, read):
        return ""
    found = [p for p in order if p not in (last, head) and _same(seen[p][0], out) and _same(seen[p][1], read)]
    if not found:
        raise EarlyExitError(f"{type(model).__name__}: no module takes the last layer's output ({last}) to what the "
                             f"LM head ({head}) reads, so the exits have no final norm to share: {option} needs "
                             "one", what="no final norm", where=type(model).__name__, option=option)
    return min(found, key=lambda p: p.count("."))


__all__ = ["find_final_norm", "find_head", "first_tensor"]
