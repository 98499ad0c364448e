"""sdsurgeon: stochastic depth for any PyTorch checkpoint — find residual blocks, gate them, fold them."""

import os as _os
import sys as _sys
import types as _types

if _sys.argv[:1] == ["-m"]:
    # `python -m sdsurgeon`: runpy put the current folder first on sys.path, so a json.py or zipfile.py there
    # would shadow the standard library. Dropped before any other import, with sys and os alone (both loaded
    # at start-up); a folder that is also the standard library's or site-packages' stays.
    _here = _os.path.realpath(_os.getcwd())
    _site = _sys.modules.get("site")
    _kept = {_os.path.realpath(_os.path.dirname(_os.__file__)),
             *(_os.path.realpath(p) for p in (_site.getsitepackages() if _site else []))}
    _sys.path[:] = [p for p in _sys.path
                    if not (p in ("", ".") or _os.path.realpath(p) == _here) or _os.path.realpath(p) in _kept]

from ._version import __version__

from typing import TYPE_CHECKING

# The public API is imported on first use (PEP 562), so `import sdsurgeon` (and with it `sdsurgeon --help` and
# `--version`) does not import torch. Each name of __all__ -> the module that defines it; `sdsurgeon.inject`,
# `from sdsurgeon import inject` and `from sdsurgeon import *` import that module then.
_PUBLIC = {
    "ResidualSite": ".analysis.detect", "find_residuals": ".analysis.detect",
    "block_influence": ".analysis.influence",
    "Plan": ".analysis.plan", "plan": ".analysis.plan",
    "register_leaf": ".capture.fx",
    "InputSpec": ".capture.inputs",
    "export_onnx": ".deploy.export",
    "SurgeryOptions": ".options", "ConvertOptions": ".options",
    "verify": ".deploy.verify",
    "SurgeonError": ".errors",
    "StochasticDepth": ".gate",
    "load_weights": ".io.checkpoint",
    "trust": ".io.trust",
    "schedules": ".schedules",  # the module itself
    "load_training_state": ".schedules", "training_state": ".schedules",
    "load": ".sdfile", "save": ".sdfile",
    "find_folds": ".surgery.fold", "fold": ".surgery.fold", "fold_with_report": ".surgery.fold",
    "remove_gates": ".surgery.fold",
    "apply_recipe": ".surgery.inject", "gates": ".surgery.inject", "inject": ".surgery.inject",
    "PruneReport": ".surgery.prune", "prune": ".surgery.prune", "prune_curve": ".surgery.prune",
    "Recipe": ".surgery.recipe",
}

if TYPE_CHECKING:  # what type checkers and editors read; the same names as _PUBLIC (tests/test_cli_startup.py)
    from . import schedules
    from .analysis.detect import ResidualSite, find_residuals
    from .analysis.influence import block_influence
    from .analysis.plan import Plan, plan
    from .capture.fx import register_leaf
    from .capture.inputs import InputSpec
    from .deploy.export import export_onnx
    from .deploy.verify import verify
    from .errors import SurgeonError
    from .gate import StochasticDepth
    from .io.checkpoint import load_weights
    from .io.trust import trust
    from .options import ConvertOptions, SurgeryOptions
    from .schedules import load_training_state, training_state
    from .sdfile import load, save
    from .surgery.fold import find_folds, fold, fold_with_report, remove_gates
    from .surgery.inject import apply_recipe, gates, inject
    from .surgery.prune import PruneReport, prune, prune_curve
    from .surgery.recipe import Recipe


def __getattr__(name: str):
    where = _PUBLIC.get(name)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    module = importlib.import_module(where, __name__)
    value = module if where == "." + name else getattr(module, name)
    if isinstance(value, _types.FunctionType):  # a function a Python caller calls: its errors name its keywords
        from .options import in_python

        value = in_python(value)
        # pickled by reference as sdsurgeon.<name> (this wrapper), as it was before it was wrapped: a process pool
        # sends functions by name, and the defining module's name finds the unwrapped one, another object
        value.__module__, value.__qualname__ = __name__, name
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "ConvertOptions",
    "InputSpec",
    "Plan",
    "PruneReport",
    "Recipe",
    "ResidualSite",
    "StochasticDepth",
    "SurgeonError",
    "SurgeryOptions",
    "apply_recipe",
    "block_influence",
    "export_onnx",
    "find_folds",
    "find_residuals",
    "fold",
    "fold_with_report",
    "gates",
    "inject",
    "load",
    "load_training_state",
    "load_weights",
    "plan",
    "prune",
    "prune_curve",
    "register_leaf",
    "remove_gates",
    "save",
    "schedules",
    "training_state",
    "trust",
    "verify",
]
