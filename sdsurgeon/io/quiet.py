"""Silence torch's noisy exporters: their prints, warnings and loggers go to a buffer."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from typing import Iterator

from .._torch import NOISY_LOGGERS as _NOISY_LOGGERS


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[io.StringIO]:
    """Keep the exporter's prints, warnings and logs from the user unless ``verbose``."""
    log = io.StringIO()
    if verbose:
        yield log
        return
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL + 1)  # torch logs a failed trace at ERROR: that, too, is the exporter's
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            warnings.simplefilter("ignore")
            yield log
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
