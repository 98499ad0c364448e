"""sdsurgeon: stochastic depth for any PyTorch checkpoint — find residual blocks, gate them, fold them."""

from .capture import InputSpec, register_leaf
from .detect import ResidualSite, find_residuals
from .errors import SurgeonError
from .inject import Recipe, apply_recipe, gates, inject
from .layers import StochasticDepth
from .load import load, save
from .plan import Plan, plan

__version__ = "0.1.0"

__all__ = [
    "InputSpec",
    "Plan",
    "Recipe",
    "ResidualSite",
    "StochasticDepth",
    "SurgeonError",
    "apply_recipe",
    "find_residuals",
    "gates",
    "inject",
    "load",
    "plan",
    "register_leaf",
    "save",
]
