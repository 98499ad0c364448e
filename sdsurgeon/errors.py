"""User-facing errors: every failure a user can cause is a SurgeonError subclass with one clear line."""

from __future__ import annotations

import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` of a wrapped exception, colour codes stripped, for one-line errors."""
    lines = [line for line in _ANSI.sub("", str(exc)).strip().splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


class SurgeonError(Exception):
    """A failure the user can fix. The CLI prints ``str(err)`` on one line and exits 1.

    The message says what failed, where (file, module path, node) and what to do instead.
    """

    def __init__(self, message: str) -> None:
        # One line, always: newlines in wrapped exception texts would break the CLI contract.
        super().__init__(" ".join(str(message).split()))


class LoadError(SurgeonError):
    """A checkpoint or architecture could not be read or built."""


class UnsafeLoadError(LoadError):
    """Loading would unpickle code from a file the user has not said to trust."""


class CaptureError(SurgeonError):
    """No part of the model could be turned into a graph."""


class ConfigError(SurgeonError):
    """An option, input spec or schedule setting is invalid."""


class NoResidualSitesError(SurgeonError):
    """The model has no residual block to inject into."""


class RecipeMismatchError(SurgeonError):
    """A saved surgery recipe does not fit the architecture it is applied to."""


class WriteError(SurgeonError):
    """An output could not be written."""


class MissingDependencyError(SurgeonError):
    """An optional package a feature needs is not installed; the message says what to pip install."""


class ExportError(SurgeonError):
    """The model could not be exported to ONNX, or the ONNX file is not what it must be."""


class VerificationError(SurgeonError):
    """onnxruntime and PyTorch disagree beyond tolerance on the exported model."""

    def __init__(self, message: str, result=None) -> None:
        super().__init__(message)
        self.result = result
