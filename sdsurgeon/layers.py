"""The stochastic-depth gate: runs a residual branch with survival probability p (Huang et al. 2016)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import ConfigError

MODES = ("batch", "row")
SCALINGS = ("paper", "inverted")


class StochasticDepth(nn.Module):
    """Gate for one residual block: ``forward(skip, *branch_inputs) = skip + gate * branch(*branch_inputs)``.

    Training: ``batch`` mode draws one keep/drop per call; a dropped branch is not run at all
    (no forward, no backward). ``row`` mode draws one per sample (dim 0). ``paper`` scaling adds
    the branch unscaled in training and ``p * branch`` in eval; ``inverted`` divides by p in
    training and adds it unscaled in eval. Eval is deterministic.

    All settings are plain attributes: the gate adds nothing to the model's state_dict. The branch
    is a callable that shares its modules with the model; it is held outside the module tree so its
    parameters keep their original state_dict keys.
    """

    def __init__(
        self,
        p: float,
        branch: Callable[..., torch.Tensor],
        *,
        mode: str = "batch",
        scaling: str = "paper",
        seed: int | None = None,
        site_id: str = "",
        index: int = 0,
        copy_skip: bool = False,
    ) -> None:
        super().__init__()
        if not (0.0 < p <= 1.0):
            raise ConfigError(f"gate {site_id or index}: survival probability {p} is outside (0, 1]")
        if mode not in MODES:
            raise ConfigError(f"unknown gate mode {mode!r}; use one of: {', '.join(MODES)}")
        if scaling not in SCALINGS:
            raise ConfigError(f"unknown scaling {scaling!r}; use one of: {', '.join(SCALINGS)}")
        self.p = float(p)
        self.mode = mode
        self.scaling = scaling
        self.seed = seed
        self.site_id = site_id
        self.index = index
        # A dropped branch returns the skip itself; copy it when the block's output is later
        # modified in place (e.g. ReLU(inplace=True)), which would corrupt the skip's autograd.
        self.copy_skip = copy_skip
        object.__setattr__(self, "branch", branch)  # not a registered submodule: see class doc
        self._generator: torch.Generator | None = None

    def extra_repr(self) -> str:
        seed = "" if self.seed is None else f", seed={self.seed}"
        return f"{self.site_id!r}, p={self.p:.4g}, mode={self.mode}, scaling={self.scaling}{seed}"

    def _rand(self, *shape: int) -> torch.Tensor:
        """Uniform draws on the CPU: from this gate's own generator when seeded, else torch's global one."""
        if self.seed is None:
            return torch.rand(shape)
        if self._generator is None:
            # Distinct, reproducible stream per gate; a large odd multiplier keeps seeds from overlapping.
            self._generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.index)
        return torch.rand(shape, generator=self._generator)

    def keep(self) -> bool:
        """One batch-mode draw: True with probability p."""
        return self.p >= 1.0 or bool(self._rand() < self.p)

    def forward(self, skip: torch.Tensor, *branch_inputs: torch.Tensor) -> torch.Tensor:
        if not self.training:
            out = self.branch(*branch_inputs)
            return skip + out * self.p if self.scaling == "paper" else skip + out
        if self.mode == "batch":
            if not self.keep():
                return skip.clone() if self.copy_skip else skip
            out = self.branch(*branch_inputs)
            return skip + out / self.p if self.scaling == "inverted" else skip + out
        out = self.branch(*branch_inputs)
        mask = (self._rand(out.shape[0]) < self.p).to(device=out.device, dtype=out.dtype)
        if self.scaling == "inverted":
            mask = mask / self.p
        return skip + out * mask.view((-1,) + (1,) * (out.dim() - 1))
