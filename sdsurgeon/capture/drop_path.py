"""Drop-path modules a model already carries (timm, torchvision, transformers): find, switch off, keep."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from ..errors import CaptureError
from ..gate import StochasticDepth

_CLASS = re.compile(r"DropPath|StochasticDepth")
_RATE_ATTRS = ("drop_prob", "drop_rate", "p")  # timm/HF, some ports, torchvision
# LayerDrop (Fan et al. 2019) as transformers models carry it: the encoder's loop draws torch.rand per layer
# in Python and skips the call; a rate of 0 skips the draw, so the model captures and the gates take over.
# The rate lives in the config (read at forward: wav2vec2) or in a module attribute copied from it at init
# (``self.layerdrop = config.encoder_layerdrop``: BART, Marian, Whisper): both are rates, both are switched.
_LAYERDROP = re.compile(r"(^|_)layerdrop$")
LAYERDROP = "LayerDrop"  # the class name recorded for a config rate


@dataclass(frozen=True)
class ExistingDropPath:
    """A drop-path module found in the model: where, its class, and the rate it drops at."""

    path: str  # a module, or for a LayerDrop rate its attribute ("config.layerdrop", "model.encoder.layerdrop")
    cls: str
    rate: float

    @property
    def is_module(self) -> bool:
        return self.cls != LAYERDROP

    def to_dict(self) -> dict:
        return {"module": self.path, "class": self.cls, "rate": round(self.rate, 6)}


def _rate_attr(module: nn.Module) -> str | None:
    if isinstance(module, StochasticDepth) or not _CLASS.search(type(module).__name__):
        return None
    return next((a for a in _RATE_ATTRS if isinstance(getattr(module, a, None), (int, float))), None)


def is_drop_path(module: nn.Module) -> bool:
    """A drop-path module: identity in eval, so a scale passes through it (see fold)."""
    return _rate_attr(module) is not None


def _layerdrop_rates(model: nn.Module) -> Iterator[tuple[str, object, str]]:
    """(path, holder, attribute) of every LayerDrop rate: in the configs the model's modules hold (once per config)
    and in the modules' own attributes."""
    seen: set[int] = set()
    for path, m in model.named_modules():
        prefix = f"{path}." if path else ""
        config = m.__dict__.get("config")
        holders = [(f"{prefix}config.", config)] if config is not None and id(config) not in seen and hasattr(
            config, "to_dict") else []
        if holders:
            seen.add(id(config))
        holders.append((prefix, m))
        for where, holder in holders:
            for attr, value in sorted(vars(holder).items()):
                if _LAYERDROP.search(attr) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    yield f"{where}{attr}", holder, attr


def find_drop_paths(model: nn.Module) -> list[ExistingDropPath]:
    """Every drop-path module of ``model`` in module order, then its configs' LayerDrop rates (read-only)."""
    found = [ExistingDropPath(path, type(m).__name__, float(getattr(m, _rate_attr(m))))
             for path, m in model.named_modules() if _rate_attr(m) is not None]
    return found + [ExistingDropPath(path, LAYERDROP, float(getattr(holder, attr)))
                    for path, holder, attr in _layerdrop_rates(model)]


def _set_rates(model: nn.Module, rates: dict[str, float]) -> None:
    holders = {path: (holder, attr) for path, holder, attr in _layerdrop_rates(model)}
    for path, rate in rates.items():
        if path in holders:
            setattr(*holders[path], rate)
        else:
            module = model.get_submodule(path)
            setattr(module, _rate_attr(module), rate)


def switch_off(model: nn.Module) -> list[ExistingDropPath]:
    """Set every drop-path and LayerDrop rate to 0 (sdsurgeon's gates take over); returns what was there."""
    found = find_drop_paths(model)
    _set_rates(model, {d.path: 0.0 for d in found})
    return found


@contextlib.contextmanager
def switched_off(model: nn.Module) -> Iterator[list[ExistingDropPath]]:
    """``switch_off`` for the duration of a block, then the original rates back."""
    found = switch_off(model)
    try:
        yield found
    finally:
        _set_rates(model, {d.path: d.rate for d in found})


def leaf_classes(found: Sequence[ExistingDropPath]) -> list[str]:
    """Class names torch.fx must keep as leaves so their train/eval switch stays at run time."""
    return sorted({d.cls for d in found if d.is_module})


def restore_calls(gm: fx.GraphModule, model: nn.Module, found: Sequence[ExistingDropPath]) -> fx.GraphModule:
    """Pass: put each drop-path module's ops in a torch.export graph back as one call to the module.

    Mutates and returns ``gm``. torch.export inlines a drop path with its train-mode decision frozen
    in; the module call decides at run time again. Adds no state (drop paths hold none).
    """
    graph = gm.graph
    for d in found:
        if not d.is_module:
            continue  # a LayerDrop loop kept by the user never reaches this far: it cannot be captured
        region = [n for n in graph.nodes
                  if n.op == "call_function" and any(v[0] == d.path for v in n.meta.get("nn_module_stack", {}).values())]
        if not region:
            continue  # not called, or a rate of 0 made it the identity
        inside = set(region)
        sources = {i for n in region for i in n.all_input_nodes if i not in inside}
        tensors = [i for i in sources if isinstance(i.meta.get("val"), torch.Tensor) or i.op == "placeholder"]
        outputs = [n for n in region if any(u not in inside for u in n.users)]
        if len(tensors) != 1 or len(outputs) != 1:
            raise CaptureError(
                f"cannot keep the drop-path module {d.path} ({d.cls}) in a torch.export capture: it reads "
                f"{len(tensors)} tensors and gives {len(outputs)}; leave out --keep-existing to let sdsurgeon's gates replace it"
            )
        gm.add_submodule(d.path, model.get_submodule(d.path))
        with graph.inserting_before(outputs[0]):
            call = graph.call_module(d.path, (tensors[0],))
        call.meta["nn_module_stack"] = dict(outputs[0].meta.get("nn_module_stack", {}))
        outputs[0].replace_all_uses_with(call)
        for n in reversed(region):
            if not n.users:
                graph.erase_node(n)
    graph.lint()
    gm.recompile()
    return gm
