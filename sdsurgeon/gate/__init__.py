"""The stochastic-depth gate, split by concern: spec, decision, eager and compiled executors, the torch patch."""

from .compiled import batch_norm_with_stats
from .decision import draw
from .module import StochasticDepth, gates
from .spec import MODES, SCALINGS, GateSpec

__all__ = ["StochasticDepth", "gates", "draw", "GateSpec", "MODES", "SCALINGS", "batch_norm_with_stats"]
