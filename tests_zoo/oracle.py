"""The independent site-count oracle: which modules' outputs are residual branches, counted by calling them.

A model built with stochastic depth switched on (timm ``drop_path_rate > 0``, torchvision
``stochastic_depth_prob > 0``) carries a drop-path module exactly on the output of every residual
branch. The oracle runs one eval forward with forward hooks and records, in call order, every call
of such a module: that list is the expected set of sites (a module made but never called does not
count; one called twice counts twice). For models without drop paths the zoo names the branch-output
modules from the library's own block classes instead. Nothing here reads sdsurgeon.

The same call list makes the hand-scaled reference: a copy of the model, drop rates 0, whose hooks
multiply the k-th call's output by p_k.
"""

from __future__ import annotations

import copy
import re
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

# Drop-path classes of timm (DropPath), torchvision (StochasticDepth) and the ports that copy them.
DROP_PATH_CLASS = re.compile(r"DropPath|StochasticDepth")
# timm puts nn.Identity (or None) in the slot of a block whose rate is 0 (the first block of a
# linear decay): the slot's name says what it is.
DROP_PATH_SLOT = re.compile(r"drop_path|stochastic_depth")
RATE_ATTRS = ("drop_prob", "p", "drop_rate")


def is_drop_path_class(module: nn.Module) -> bool:
    return bool(DROP_PATH_CLASS.search(type(module).__name__))


def fill_empty_slots(model: nn.Module) -> int:
    """Put nn.Identity in every ``drop_path*`` attribute that is None (timm resnet, rexnet, xception).

    Their forward then calls it exactly where a drop path would sit (``if self.drop_path is not None``),
    which changes no number. Returns how many slots were filled.
    """
    filled = 0
    for module in list(model.modules()):
        for name, value in list(vars(module).items()):
            if value is None and DROP_PATH_SLOT.search(name) and not name.startswith("_"):
                setattr(module, name, nn.Identity())
                filled += 1
    return filled


def drop_path_modules(model: nn.Module) -> list[str]:
    """Paths of the drop-path modules and of identity modules sitting in a drop-path slot."""
    found = []
    for path, m in model.named_modules():
        leaf = path.rpartition(".")[2]
        if is_drop_path_class(m) or (type(m) is nn.Identity and DROP_PATH_SLOT.search(leaf)):
            found.append(path)
    return found


def _rate_attr(m: nn.Module) -> str | None:
    if not is_drop_path_class(m):
        return None
    return next((a for a in RATE_ATTRS if type(getattr(m, a, None)) in (int, float)), None)


def zero_drop_rates(model: nn.Module) -> dict[nn.Module, float]:
    """Set every drop-path module's rate to 0 (our own switch, not sdsurgeon's); returns the old rates."""
    old = {}
    for m in model.modules():
        attr = _rate_attr(m)
        if attr is not None:
            old[m] = getattr(m, attr)
            setattr(m, attr, 0.0)
    return old


def liven(model: nn.Module, calibration: torch.Tensor, seed: int = 0) -> nn.Module:
    """Random weights that let every branch count, in place: without this the checks could not fail.

    Libraries start residual branches at (nearly) zero on purpose: timm's ``zero_init_last`` batch
    norms, LeViT's ``bn_weight_init=0``, layer scales of 1e-6 (ConvNeXt) or 1e-5 (PoolFormer, CaiT).
    A branch that outputs zero hides a missed site and a wrong scale alike. So every parameter the
    library set to one constant is redrawn (biases N(0, 0.1), the rest U(0.5, 1.5)), linear layers get
    torch's default init instead of transformers' std 0.02 (whose attention branches barely move the
    output), and the batch
    norms' running statistics are set from one train-mode forward on ``calibration`` (drop rates 0),
    so eval outputs keep a sane scale.
    """
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if type(m) is nn.Linear:  # torch's default init, not timm's std 0.02: attention branches count too
                m.reset_parameters()
        for name, p in model.named_parameters():
            if p.numel() and bool((p == p.reshape(-1)[0]).all()):
                fresh = (torch.randn(p.shape, generator=g) * 0.1 if name.endswith("bias")
                         else torch.rand(p.shape, generator=g) + 0.5)
                p.copy_(fresh.to(p.dtype))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if norms:
        rates = zero_drop_rates(model)
        momenta = {m: m.momentum for m in norms}
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: after one batch, that batch's statistics
        was = model.training
        model.train()
        torch.manual_seed(seed)
        with torch.no_grad():
            _forward(model, calibration)
        model.train(was)
        for m, momentum in momenta.items():
            m.momentum = momentum
            m.num_batches_tracked.zero_()
        for m, rate in rates.items():  # the drop rates back as built
            setattr(m, _rate_attr(m), rate)
    return model


def _forward(model: nn.Module, inputs) -> object:
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def called(model: nn.Module, paths: Iterable[str], inputs) -> list[str]:
    """The given modules' paths, one entry per call, in call order, over one eval no-grad forward."""
    calls: list[str] = []
    handles = []
    for path in paths:
        module = model.get_submodule(path)
        handles.append(module.register_forward_hook(lambda _m, _a, _o, path=path: calls.append(path)))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            _forward(model, inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return calls


def linear_ps(L: int, p_L: float) -> list[float]:
    """The paper's linear decay, written out here: p_l = 1 - l/L (1 - p_L), l = 1..L."""
    return [1.0 - (l / L) * (1.0 - p_L) for l in range(1, L + 1)]


class ScaledCalls:
    """Forward hooks multiplying the k-th call (in call order) of the branch-output modules by ps[k].

    A pre-hook on the root restarts the count at each forward, so every forward is scaled alike.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], ps: Sequence[float]) -> None:
        self.ps = list(ps)
        self.k = 0
        self.handles = [model.register_forward_pre_hook(self._restart)]
        for path in dict.fromkeys(paths):
            self.handles.append(model.get_submodule(path).register_forward_hook(self._scale))

    def _restart(self, *_):
        self.k = 0

    restart = _restart

    def _scale(self, _module, _args, out):
        if self.k >= len(self.ps):
            raise AssertionError(f"branch module called {self.k + 1} times, more than the {len(self.ps)} sites")
        p = self.ps[self.k]
        self.k += 1
        return out * p

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def reference(model: nn.Module, branch_paths: Callable[[nn.Module], list[str]], inputs,
              p_L: float | None = None) -> nn.Module:
    """An independent copy of ``model``: drop rates 0, empty slots filled, and (with ``p_L``) each branch
    output scaled by its linear-decay p_l through hooks. Eval-mode numbers only mean the paper's inference."""
    ref = copy.deepcopy(model)
    fill_empty_slots(ref)
    zero_drop_rates(ref)
    if p_L is not None:
        calls = called(ref, branch_paths(ref), inputs)
        ref.scaled_calls = ScaledCalls(ref, calls, linear_ps(len(calls), p_L))  # restart() before a call not via forward
    return ref


def parent(path: str) -> str:
    return path.rpartition(".")[0]
