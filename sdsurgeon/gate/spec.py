"""GateSpec: a gate's settings (p, mode, scaling, seed, ...), frozen and validated once."""

from __future__ import annotations

from dataclasses import dataclass

from ..choices import MODES, SCALINGS
from ..errors import ConfigError


@dataclass(frozen=True)
class GateSpec:
    """What one gate does; change it with ``dataclasses.replace`` (validated again)."""

    p: float
    mode: str = "batch"
    scaling: str = "paper"
    seed: int | None = None
    site_id: str = ""
    index: int = 0
    # A dropped branch returns the skip itself; copy it when the block's output is later
    # modified in place (e.g. ReLU(inplace=True)), which would corrupt the skip's autograd.
    copy_skip: bool = False
    sync_ranks: bool = True
    # Which branch inputs may be per-sample (row mode subsets them); None: any with the batch size.
    sample_inputs: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        if not (0.0 < self.p <= 1.0):
            raise ConfigError(f"gate {self.site_id or self.index}: survival probability {self.p} is outside (0, 1]")
        if self.mode not in MODES:
            raise ConfigError(f"unknown gate mode {self.mode!r}; use one of: {', '.join(MODES)}")
        if self.scaling not in SCALINGS:
            raise ConfigError(f"unknown scaling {self.scaling!r}; use one of: {', '.join(SCALINGS)}")
        object.__setattr__(self, "p", float(self.p))
        if self.sample_inputs is not None:
            object.__setattr__(self, "sample_inputs", tuple(self.sample_inputs))
