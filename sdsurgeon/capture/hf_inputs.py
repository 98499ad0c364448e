"""Example inputs of a transformers model from its config: token ids below its vocabulary, image sizes."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from ..capture.inputs import InputSpec
from ..io.hf import is_hf

# Integer inputs and the config field bounding their values (token ids must index the embedding).
_ID_BOUNDS = {"input_ids": "vocab_size", "decoder_input_ids": "vocab_size", "token_type_ids": "type_vocab_size"}


_TOKENS = 16  # default sequence length when no input is given


_PIXELS = 64  # default image side for vision configs without an image_size


def complete_specs(model: nn.Module, specs: Sequence[InputSpec] | None) -> list[InputSpec] | None:
    """Input specs for a transformers model: token ids drawn below its vocabulary; defaults if none given.

    Without specs: ``input_ids`` of shape 1x16, or ``pixel_values`` of 1xCxHxW from the config.
    """
    if not is_hf(model):
        return None if specs is None else list(specs)
    config = model.config
    if not specs:
        name = model.main_input_name
        if name == "pixel_values":
            side = getattr(config, "image_size", _PIXELS)
            side = side[0] if isinstance(side, (list, tuple)) else side
            specs = [InputSpec(name, (1, getattr(config, "num_channels", 3), side, side))]
        else:
            length = min(_TOKENS, getattr(config, "max_position_embeddings", _TOKENS) or _TOKENS)
            specs = [InputSpec(name, (1, length), "int64")]
    out = []
    for s in specs:
        bound = getattr(config, _ID_BOUNDS.get(s.name or "", ""), None) if s.dtype in ("int64", "long", "int32", "int") else None
        out.append(InputSpec(s.name, s.shape, s.dtype, bound) if isinstance(bound, int) else s)
    return out
