"""sdsurgeon: stochastic depth for any PyTorch checkpoint — find residual blocks, gate them, fold them."""

__version__ = "0.1.0"  # first: submodules read it

import sys as _sys

if _sys.argv[:1] == ["-m"]:  # `python -m sdsurgeon`: runpy put the current folder first; drop it before torch loads
    from .trust import drop_current_folder as _drop_current_folder

    _drop_current_folder()

from .capture import InputSpec, register_leaf
from .detect import ResidualSite, find_residuals
from .errors import SurgeonError
from .export import export_onnx, verify
from .fold import find_folds, fold, fold_with_report, remove_gates
from .inject import Recipe, apply_recipe, gates, inject
from .gate import StochasticDepth
from .load import load, load_weights, save
from .plan import Plan, plan
from .trust import trust

__all__ = [
    "InputSpec",
    "Plan",
    "Recipe",
    "ResidualSite",
    "StochasticDepth",
    "SurgeonError",
    "apply_recipe",
    "export_onnx",
    "find_folds",
    "find_residuals",
    "fold",
    "fold_with_report",
    "gates",
    "inject",
    "load",
    "load_weights",
    "plan",
    "register_leaf",
    "remove_gates",
    "save",
    "trust",
    "verify",
]
