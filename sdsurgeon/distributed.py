"""What ranks must agree on: the seed gates share, the DDP zero-gradient anchor, FSDP2 units skipped whole."""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from .attrs import resolve
from .errors import ConfigError

# This module sits below the gate (the gate draws shared seeds and anchors its dropped branches), so it knows
# gates and graph forwards only through what they hand it: ``Unit``'s ``is_gate`` and an installed forward's
# ``unit`` attribute (surgery.install sets both).

# One seed per process group, agreed once: every rank's gates then draw the same stream.
_SHARED_SEEDS: dict[int, int] = {}


def distributed() -> bool:
    """Whether this process is one of several ranks of an initialised default process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank()


def shared_seed() -> int:
    """A seed drawn on rank 0 and broadcast once to every rank of the default process group."""
    key = id(dist.group.WORLD)
    if key not in _SHARED_SEEDS:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64)
        if dist.get_backend() == "nccl":  # nccl moves CUDA tensors only
            seed = seed.cuda()
        dist.broadcast(seed, src=0)
        _SHARED_SEEDS[key] = int(seed.item())
    return _SHARED_SEEDS[key]


# --- DDP: a dropped branch still gives every parameter a gradient ---


def zero_gradient_anchor(out: torch.Tensor, branch: Callable, branch_inputs: tuple) -> torch.Tensor:
    """``out`` plus zero times one element of each of the branch's parameters.

    DDP (find_unused_parameters=False) needs a gradient for every parameter: a dropped branch gives zeros.
    The branch's own modules hold them, or (ATen graphs) the graph passes them in. Parameters FSDP2 holds
    sharded (DTensors: their unit was not called this step, see ``Unit``) are left out: the unit
    is absent from the step, and FSDP2 reduces nothing for it.
    """
    owned = branch.parameters() if isinstance(branch, nn.Module) else ()
    params = [*owned, *(t for t in branch_inputs if isinstance(t, nn.Parameter))]
    anchor = [p.reshape(-1)[:1] for p in params if p.requires_grad and not _sharded_tensor(p)]
    if anchor:
        out = out + torch.cat(anchor).sum().to(out.dtype) * 0
    return out


def _sharded_tensor(tensor: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor  # public since torch 2.5
    except ImportError:
        return False
    return isinstance(tensor, DTensor)


# --- FSDP2: a unit whose every gate dropped is not called, so its weights are neither gathered nor reduced ---


class Unit:
    """A rewritten module's standing as an FSDP2 unit: whether a training call whose gates all drop may skip
    the unit whole. Decided again when the module's class changes (``fully_shard`` changes it).

    ``graph``: the module's installed graph (asked for lazily: it may have to be traced back from code);
    ``is_gate``: which of its modules are gates (they draw ``sync_ranks``, ``mode`` and ``draw_ahead()``).
    """

    def __init__(self, owner: nn.Module, graph: Callable[[], fx.Graph], is_gate: Callable[[nn.Module], bool]) -> None:
        self.owner = owner
        self._graph = graph
        self.is_gate = is_gate
        self._decided_for: type | None = None  # the owner's class when ``skippable`` was decided
        self._skippable = False

    def gates(self) -> list[nn.Module]:
        return [m for m in self.owner.modules() if self.is_gate(m)]

    def skippable(self) -> bool:
        """Whether the owner is a sharded unit that may skip its call (its class then learns to: ``_unit_call``)."""
        if self._decided_for is not type(self.owner):
            self._decided_for = type(self.owner)
            self._skippable = self._sharded() and self._reads_weights_only_in_gates()
        return self._skippable

    def _sharded(self) -> bool:
        """Whether the owner is an FSDP2 unit (``fully_shard``); its class then learns to skip dropped calls.

        FSDP2 gathers a unit's weights in a forward pre-hook, before the gates inside decide. A unit not
        called at all is neither gathered nor reduce-scattered that step (FSDP2's final backward callback
        expects that), so the decision is drawn before the call (``_unit_call``), every rank alike.
        """
        fsdp = _fsdp_module()
        if fsdp is None or not isinstance(self.owner, fsdp):
            return False
        if dist.is_available() and dist.is_initialized() and any(not g.sync_ranks for g in self.gates()):
            own = next(c for c in type(self.owner).__mro__ if not issubclass(c, fsdp))  # the class FSDP2 wrapped
            raise ConfigError(f"{own.__name__} is sharded with FSDP2 and its gates draw per rank "
                              "(sync_ranks=False, --per-rank-draws): ranks would gather different units and hang; "
                              "inject with the default sync_ranks=True")
        cls = type(self.owner)
        if cls.__dict__.get("__call__") is not _unit_call:
            cls.__call__ = _unit_call  # FSDP2's own generated class for this module class (FSDPModule, cls)
        return True

    def _reads_weights_only_in_gates(self) -> bool:
        """Whether the graph (the owner's, gates not looked into) reads none of the owner's parameters outside
        its gates' branches, every gate draws per batch and the graph calls each itself (none nested in another's
        branch, where a decision drawn ahead might never be used): then a call with every gate dropped needs none."""
        owner, graph, is_gate = self.owner, self._graph(), self.is_gate
        gates = self.gates()
        called = {id(owner.get_submodule(n.target)) for n in graph.nodes if n.op == "call_module"}
        if not gates or any(g.mode != "batch" or id(g) not in called for g in gates):
            return False

        def into_gates_only(node: fx.Node) -> bool:  # a weight read only to be handed to gates (their branches')
            return all(u.op == "call_module" and is_gate(owner.get_submodule(u.target)) for u in node.users)

        for node in graph.nodes:
            if node.op == "get_attr" and isinstance(resolve(owner, node.target), nn.Parameter) and not into_gates_only(node):
                return False
            if node.op == "call_module" and not is_gate(module := owner.get_submodule(node.target)):
                if any(True for _ in module.parameters()):
                    return False
        return True


def unit_of(module: nn.Module) -> Unit | None:
    """The ``Unit`` of the forward installed on ``module`` (an installed forward carries one as ``.unit``)."""
    unit = getattr(module.__dict__.get("forward"), "unit", None)
    return unit if isinstance(unit, Unit) else None


def prepare_units(model: nn.Module, _args) -> None:
    """Forward pre-hook on an injected model: before any of its blocks runs, each sharded one learns to skip
    (FSDP2 gathers a unit's weights before its own forward, too late to decide there)."""
    if torch.compiler.is_compiling():  # a compiled model calls every block (the gates decide inside the graph)
        return
    fsdp = _fsdp_module()
    if fsdp is None or not isinstance(model, fsdp):  # sharded the usual way, the root is a unit too; else
        return  # nothing to walk on every step (a block sharded alone still learns at its first call)
    for module in model.modules():
        if (unit := unit_of(module)) is not None:
            unit.skippable()


def watch_units(model: nn.Module) -> None:
    """Register ``prepare_units`` on ``model`` (once)."""
    if not any(hook is prepare_units for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(prepare_units)


def unwatch_units(model: nn.Module) -> None:
    """Take ``prepare_units`` off ``model`` (fold: no graph forward is left)."""
    for key, hook in list(model._forward_pre_hooks.items()):
        if hook is prepare_units:
            del model._forward_pre_hooks[key]


def _fsdp_module() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule  # public since torch 2.6
    except ImportError:
        return None
    return FSDPModule


def _unit_call(self: nn.Module, *args, **kwargs):
    """``__call__`` of a sharded unit running a graph forward: in training, its gates decide first; if every
    one drops and the graph reads no weight outside their branches, the graph runs without the FSDP hooks
    (no gather, no reduce-scatter, nor any other hook: the unit is absent from the step)."""
    unit = unit_of(self)
    if unit is None or not self.training or torch.compiler.is_compiling() or not unit.skippable():
        return nn.Module.__call__(self, *args, **kwargs)
    kept = [g.draw_ahead() for g in unit.gates()]
    if any(k is None or k for k in kept):
        return nn.Module.__call__(self, *args, **kwargs)
    return self.__dict__["forward"](*args, **kwargs)
