"""sdsurgeon: stochastic depth for any PyTorch checkpoint — find residual blocks, gate them, fold them."""

import sys as _sys

from ._version import __version__

if _sys.argv[:1] == ["-m"]:  # `python -m sdsurgeon`: runpy put the current folder first; drop it before torch loads
    from .io.trust import drop_current_folder as _drop_current_folder

    _drop_current_folder()

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
