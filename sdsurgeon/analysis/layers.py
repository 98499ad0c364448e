"""The model's layer list (the ModuleList whose every element holds gated sites), the sites of each layer, and the
angular distance each layer moves its hidden state (measured by running the model; nothing is changed)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import torch
from torch import nn

from ..errors import LayerError
from ..gate import gates
from .influence import run_hooked

# What layer_angular_distance measures, in words (reports quote it).
ANGULAR_MEASURE = ("angular distance = arccos(cos(layer input, layer output)) / pi over the hidden (last) dimension, "
                   "averaged over every token of the calibration inputs (Gromov et al. 2024; model in eval)")


@dataclass(frozen=True)
class LayerList:
    """The ModuleList at ``path`` and, per element (layer), the ids of the gated sites it holds, in depth order."""

    path: str
    sites: tuple[tuple[str, ...], ...]

    @property
    def count(self) -> int:
        return len(self.sites)

    def layer_of(self) -> dict[str, int]:
        """Site id -> the index of the layer holding it (sites outside the list are absent)."""
        return {site: i for i, held in enumerate(self.sites) for site in held}

    def covering(self, site_ids: Collection[str]) -> tuple[list[int], list[str]]:
        """The layers ``site_ids`` hold whole, and the ids that make up no whole layer (part of a layer, or outside
        the list), in depth order of ``site_ids``."""
        chosen = set(site_ids)
        whole = [i for i, held in enumerate(self.sites) if set(held) <= chosen]
        covered = {s for i in whole for s in self.sites[i]}
        return whole, [s for s in site_ids if s not in covered]


def _gated(module: nn.Module) -> list[str]:
    return [g.site_id for g in gates(module)]


def find_layers(model: nn.Module, *, gated: bool = True) -> LayerList:
    """The model's layer list: a ModuleList whose every element holds at least one gated site (``gated=False``:
    at least one parameter, for a model without gates; its ``sites`` are then empty).

    Where the model's config says ``num_hidden_layers``, the list must be that long (a list of attention heads or
    experts is not the layers). A list whose elements hold such lists is a list of stages, not of layers. Of those
    left the longest wins (the most blocks chosen one layer at a time); two of that length are refused, as no rule
    tells them apart.
    Raises LayerError when no list qualifies. Nothing is changed.
    """
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    expected = expected if isinstance(expected, int) and not isinstance(expected, bool) else None
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and (expected is None or len(module) == expected):
            held = tuple(tuple(_gated(layer)) for layer in module)
            if all(held) if gated else all(any(True for _ in layer.parameters()) for layer in module):
                found.append(LayerList(path, held))
    found = [f for f in found if not any(g.path.startswith(f"{f.path}.") or (not f.path and g.path) for g in found)]
    if not found:
        said = f" of num_hidden_layers = {expected} (its config)" if expected is not None else ""
        if not gated:
            raise LayerError(f"{type(model).__name__} has no layer list{said}: no nn.ModuleList whose every element "
                             "holds parameters", what="no layer list", where=type(model).__name__)
        raise LayerError(f"{type(model).__name__} has no layer list{said}: no nn.ModuleList whose every element holds a "
                         "gated block, so whole layers cannot be chosen; drop blocks with --drop N or --drop-sites REGEX",
                         what="no layer list", where=type(model).__name__, option="--drop-layers")
    longest = max(f.count for f in found)
    best = [f for f in found if f.count == longest]
    if len(best) > 1:
        raise LayerError(f"{type(model).__name__} has {len(best)} layer lists of {longest} layers "
                         f"({', '.join(f.path or '(root)' for f in best)}) and no rule tells which one is the model's "
                         "layers; drop blocks with --drop-sites REGEX instead",
                         what="ambiguous layer list", where=", ".join(f.path for f in best), option="--drop-layers")
    return best[0]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def layer_angular_distance(model: nn.Module, layers: LayerList, inputs) -> list[float]:
    """Per layer (in list order): the angular distance between its input and its output hidden state.

    Gromov et al. 2024 ("The Unreasonable Ineffectiveness of the Deeper Layers"): ``arccos(cos(x, y)) / pi``, 0 for a
    layer that leaves every token's hidden state pointing the same way (the cheapest to remove), taken over the
    last (hidden) dimension and averaged over every token. The input is the layer's first tensor argument, the
    output its first tensor result. Measured with the model in eval on ``inputs`` (a tensor, a tuple, a dict or
    ``(args, kwargs)``). Read-only: the model's modes are restored and nothing else changes.
    """
    sums = [[0.0, 0] for _ in range(layers.count)]

    def hook_for(i: int):
        def hook(layer, args, kwargs, output):
            x = _first_tensor(args, kwargs)
            y = _first_tensor(tuple(output), {}) if isinstance(output, (tuple, list)) else output
            if not isinstance(y, torch.Tensor):
                return
            if x is None or x.shape != y.shape or not x.dim():
                return
            a, b = x.detach().double().reshape(-1, x.shape[-1]), y.detach().double().reshape(-1, x.shape[-1])
            cos = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).clamp(-1.0, 1.0)
            sums[i][0] += float(torch.arccos(cos).sum() / torch.pi)
            sums[i][1] += cos.numel()
        return hook

    run_hooked(model, inputs, [(layer, hook_for(i)) for i, layer in enumerate(model.get_submodule(layers.path))],
               with_kwargs=True)
    return [s / n if n else float("nan") for s, n in sums]
