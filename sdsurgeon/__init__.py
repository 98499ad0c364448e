"""sdsurgeon: stochastic depth for any PyTorch checkpoint — find residual blocks, gate them, fold them."""

import os as _os
import sys as _sys

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
from . import schedules
from .schedules import load_training_state, training_state
from .sdfile import load, save
from .surgery.fold import find_folds, fold, fold_with_report, remove_gates
from .surgery.inject import apply_recipe, gates, inject
from .surgery.prune import PruneReport, prune, prune_curve
from .surgery.recipe import Recipe

__all__ = [
    "InputSpec",
    "Plan",
    "PruneReport",
    "Recipe",
    "ResidualSite",
    "StochasticDepth",
    "SurgeonError",
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
