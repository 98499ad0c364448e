"""Progress of long work as the library reports it: the reporter interface, and the silent default.

The library never prints: a function that can take more than a few seconds takes ``progress`` (a
``Progress``) and tells it which stage it is in. The CLI passes one that draws on stderr; a library user
passes nothing (``SILENT``) or their own subclass. Stages nest (``stage`` inside ``stage``) and may also
overlap (batch's jobs, started and ended by ``start``/``end`` in any order).
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator


class Progress:
    """A progress reporter; this base class reports nothing. Override ``start``, ``advance`` and ``end``.

    ``start(name, total)`` opens a stage named for the user ("export ONNX"), ``total`` its number of steps
    when known, and returns a handle; ``advance(handle)`` marks steps done; ``end(handle)`` closes it, on
    success or failure alike. Reporters must be quick and must not raise: they run inside the work.
    """

    def start(self, name: str, total: int | None = None) -> Any:
        """A stage begins; returns the handle that ``advance`` and ``end`` take."""
        return None

    def advance(self, handle: Any, steps: int = 1) -> None:
        """``steps`` more steps of the stage ``handle`` are done."""

    def end(self, handle: Any) -> None:
        """The stage ``handle`` is over (done, failed or interrupted)."""

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """``with progress.stage("prune curve", total=n) as advance: ... advance()``: start, and end on leaving."""
        handle = self.start(name, total)
        try:
            yield lambda steps=1: self.advance(handle, steps)
        finally:
            self.end(handle)


class _Silent(Progress):
    def __repr__(self) -> str:  # what help() and the API docs show as the default
        return "SILENT"


SILENT = _Silent()  # the default everywhere: no reports

__all__ = ["Progress", "SILENT"]
