"""Kept only so that models pickled before the gate moved to sdsurgeon.gate (sdsurgeon.layers.StochasticDepth, graphs calling sdsurgeon.layers.draw) still unpickle."""
from .gate import StochasticDepth, batch_norm_with_stats, draw  # noqa: F401
