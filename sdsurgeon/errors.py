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

    The message says what failed, where (file, module path, node) and what to do instead. The same
    parts are kept as fields, so a caller that words things its own way never parses the message:

    - ``what``: what failed, without the option it is about and without the advice;
    - ``where``: the file, module path or node;
    - ``hint``: what to do instead;
    - ``option``: the command-line option the message is about (``--input``); the message then reads
      ``f"{option} {what}"``, and a batch config names its own key in its place;
    - ``field``: the options field it is about (``pL``, see options.py), which each front end spells its own
      way: the command line as its flag, a batch config as its key.
    """

    def __init__(self, message: str, *, what: str | None = None, where: str | None = None,
                 hint: str | None = None, option: str | None = None, field: str | None = None) -> None:
        # One line, always: newlines in wrapped exception texts would break the CLI contract.
        super().__init__(" ".join(str(message).split()))
        self.what, self.where, self.hint, self.option, self.field = what, where, hint, option, field

    def __reduce__(self):  # keyword fields survive pickling (batch workers send records across processes)
        return (_rebuild, (type(self), self.args, self.__dict__))


def _rebuild(cls: type, args: tuple, fields: dict) -> SurgeonError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(fields)
    return err


def option_error(option: str, what: str, *, hint: str | None = None, cls: type | None = None,
                 field: str | None = None) -> SurgeonError:
    """``{option} {what}``, with both kept as fields: a batch config puts its own key where the option was."""
    return (cls or ConfigError)(f"{option} {what}", what=what, option=option, hint=hint, field=field)


class LoadError(SurgeonError):
    """A checkpoint or architecture could not be read or built."""


class UnsafeLoadError(LoadError):
    """Loading would unpickle code from a file the user has not said to trust."""


class CaptureError(SurgeonError):
    """No part of the model could be turned into a graph."""


class DroppedOutputError(SurgeonError, AttributeError):
    """A rewritten block's output that the model dropped when it was traced was used after all (an AttributeError
    too, so that ``getattr(value, name, default)`` and ``hasattr`` keep their meaning)."""


class SpecializedCallError(SurgeonError):
    """A module rewritten on its recorded call got another value for an argument its graph fixed."""


class ConfigError(SurgeonError):
    """An option, input spec or schedule setting is invalid."""


class NoResidualSitesError(SurgeonError):
    """The model has no residual block to inject into."""


class LayerError(ConfigError):
    """Whole layers cannot be chosen or removed: no layer list, two candidates, or sites that are part of a layer."""


class EarlyExitError(ConfigError):
    """An early exit cannot be set up on (``inject --early-exit``) or measured on (``draft``) this model: no LM head, no
    layer list, no final norm found by rule, or an exit layer it does not have."""


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

    def __init__(self, message: str, result=None, **fields) -> None:
        super().__init__(message, **fields)
        self.result = result


class UnscaledSaveWarning(UserWarning):
    """An injected model whose own save path (``save_pretrained``) will write weights that load unscaled: paper
    scaling chosen for a model that brings one (surgery.inject.resolve_scaling)."""
