"""Train/eval flags saved and put back: capture, FLOP counting, export and verification switch them for a while."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


@contextlib.contextmanager
def modes_kept(*roots: nn.Module, training: bool | None = None) -> Iterator[None]:
    """Run a block with ``roots`` switched to ``training`` (None: as they are); every module's flag is put back.

    The switch goes through ``train()`` so a module that overrides it (to keep its norms frozen) still
    decides; the way back sets each flag as it was, whatever ``train()`` would do.
    """
    modes = {m: m.training for root in roots for m in root.modules()}
    try:
        if training is not None:
            for root in roots:
                root.train(training)
        yield
    finally:
        for m, was in modes.items():
            m.training = was
