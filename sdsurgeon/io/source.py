"""Where a model came from (an importable factory, a transformers config, a pickle), kept on the model through captures."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
from torch import nn

SOURCE_ATTR = "sdsurgeon_source"


@dataclass(frozen=True)
class ModelSource:
    """How to rebuild a model's architecture: an importable factory, or a pickled module."""

    kind: str  # "arch" | "hf" (a transformers class and its config) | "pickle"
    arch: str | None = None  # the factory, or the transformers class name
    arch_kwargs: dict = field(default_factory=dict)  # its keyword arguments, or the config


def tag(module: nn.Module, name: str, value) -> None:
    """Attach a plain attribute that survives copy.deepcopy, also on a GraphModule (which drops others)."""
    setattr(module, name, value)
    if isinstance(module, fx.GraphModule):
        from .. import _torch

        module.meta.setdefault(_torch.user_preserved_attributes_key(), {})[name] = value
