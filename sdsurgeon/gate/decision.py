"""Keep/drop draws: each gate's RNG stream (seeded alike on every rank: distributed), replay under activation checkpointing."""

from __future__ import annotations

from collections import OrderedDict

import torch

from .. import _torch
from ..distributed import distributed, rank, shared_seed
from .spec import GateSpec

# Draws a seeded gate remembers for checkpoint recomputes: micro-batches run forward before one backward.
REPLAY_LIMIT = 64


class Draws:
    """One gate's draws: its generator (made on first use), the last draw, and draws kept for replay.

    Activation checkpointing (``torch.utils.checkpoint``, reentrant or not, ``preserve_rng_state=True``)
    restores the global CPU RNG state before it recomputes a forward. A gate without a generator of its
    own draws from that global RNG, so the recompute draws the same again by itself. A gate with its own
    generator first draws a key from the global RNG and remembers ``key -> draw``: the recompute draws the
    same key and gets that draw back, whichever micro-batch or call it belongs to. The key only indexes
    this process's records; the decision still comes from the gate's stream, so ranks sharing a seed agree.
    """

    # The next call's decision, drawn before the call (``draw_ahead``), as a 1-tuple; None: none is pending.
    # A class default: gates pickled before it existed unpickle without it.
    ahead: tuple[bool | None] | None = None

    def __init__(self) -> None:
        self.generator: torch.Generator | None = None
        self.last: torch.Tensor | None = None  # the most recent draw (tests and tools read it)
        self.records: OrderedDict[int, torch.Tensor] = OrderedDict()

    def __getstate__(self):
        # the stream's position is kept, as the old gate pickled its generator; nothing to replay survives
        return {"generator": self.generator, "last": None, "records": OrderedDict()}

    def __setstate__(self, state):
        self.__dict__.update(state)

    def stream(self, spec: GateSpec) -> torch.Generator | None:
        """The gate's generator: seeded by ``seed``, or by a seed all ranks share; None: torch's global one."""
        if self.generator is None:
            seed = spec.seed
            if distributed():
                if seed is None and spec.sync_ranks:
                    seed = shared_seed()
                elif seed is not None and not spec.sync_ranks:
                    seed = seed + 7_919 * rank()  # independent, still reproducible, per rank
            if seed is None:
                return None
            # Distinct, reproducible stream per gate; a large odd multiplier keeps seeds from overlapping.
            self.generator = torch.Generator().manual_seed((seed * 1_000_003 + spec.index) % 2**63)
        return self.generator

    def uses_global_rng(self, spec: GateSpec) -> bool:
        """Whether draws come from torch's global generator (no seed, and no seed agreed between ranks)."""
        return spec.seed is None and not (distributed() and spec.sync_ranks)

    def rng_state(self) -> torch.Tensor | None:
        """The own stream's position; None before its first draw (it then starts from its seed again)."""
        return None if self.generator is None else self.generator.get_state()

    def set_rng_state(self, state: torch.Tensor | None) -> None:
        """Continue the own stream from ``state`` (``rng_state``); None: start it afresh at the next draw."""
        if state is None:
            self.generator = None
        else:
            self.generator = torch.Generator()
            self.generator.set_state(state)
        self.records.clear()

    def rand(self, spec: GateSpec, *shape: int) -> torch.Tensor:
        """Uniform draws on the CPU; a checkpoint recompute gets the draws its forward got (see the class)."""
        generator = self.stream(spec)
        if generator is None:
            draw = torch.rand(shape)
        else:
            key = int(torch.randint(0, 2**62, ()))
            replay = self.records.pop(key, None) if _torch.in_backward() else None
            if replay is not None and tuple(replay.shape) == shape:
                draw = replay
            else:  # a first forward; or a recompute that did not restore the RNG state: a fresh draw
                draw = torch.rand(shape, generator=generator)
                self.records[key] = draw
                if len(self.records) > REPLAY_LIMIT:
                    self.records.popitem(last=False)
        self.last = draw
        return draw

    def keep(self, spec: GateSpec) -> bool:
        """One batch-mode draw: True with probability p."""
        return spec.p >= 1.0 or bool(self.rand(spec) < spec.p)

    def draw_ahead(self, spec: GateSpec, training: bool) -> bool | None:
        """Draw the next call's batch-mode decision now (``next_decision`` hands it to that call)."""
        decision = self.decide(spec, training, None)
        self.ahead = (decision,)
        return decision

    def next_decision(self, spec: GateSpec, training: bool, skip: torch.Tensor) -> bool | torch.Tensor | None:
        """This call's decision: the one drawn ahead, if any, else one drawn now (``decide``)."""
        if self.ahead is not None:
            (decision,), self.ahead = self.ahead, None
            return decision
        return self.decide(spec, training, skip)

    def decide(self, spec: GateSpec, training: bool, skip: torch.Tensor) -> bool | torch.Tensor | None:
        """This call's decision: keep or not (batch mode), the kept rows (row mode); None when nothing is drawn."""
        if not training or spec.p >= 1.0:
            return None
        if spec.mode == "batch":
            return self.keep(spec)
        return (self.rand(spec, skip.shape[0]) < spec.p).nonzero().squeeze(1)


def decides_in_graph(spec: GateSpec, training: bool, has_cond_branch: bool) -> bool:
    """Whether a compiled model can decide this gate with torch.cond: batch mode, training, p < 1,
    unseeded, single process, and a branch torch.cond can take (``has_cond_branch``)."""
    # A seeded gate draws from its own generator, and distributed ranks must agree: both stay in Python.
    if spec.mode != "batch" or not training or spec.p >= 1.0 or spec.seed is not None or distributed():
        return False
    if not hasattr(torch, "cond"):  # an older torch: the Python decision, with its graph break
        return False
    return has_cond_branch


DRAW = object()  # forward's default: draw here (a gate called directly, outside a rewritten graph)

IN_GRAPH = object()  # draw's answer under torch.compile when the gate decides inside the graph (torch.cond)


def draw(gate, skip: torch.Tensor):
    """The gate's decision for its next call.

    The rewritten graph calls this right before each gate. Under torch.compile a batch-mode gate
    whose branch torch.cond can take decides inside the compiled graph (a traced ``torch.rand``,
    fresh every call: one graph for the whole model). Any other gate decides in Python, outside
    the graph: the compiled model breaks there and resumes on either side of the decision, so each
    such gate costs at most two compiled continuations, whatever the drop pattern.
    """
    if isinstance(skip, torch.fx.Proxy):
        # torch.fx re-traces a GraphModule's code when one is unpickled: the draw must stay a call in the
        # graph, not be made once here and frozen into it as a constant.
        tracer = skip.tracer
        if not isinstance(gate, torch.fx.Proxy):
            gate = tracer.create_proxy("get_attr", tracer.path_of_module(gate), (), {})
        return tracer.create_proxy("call_function", draw, (gate, skip), {})
    if torch.compiler.is_compiling() and gate.decides_in_graph():
        return IN_GRAPH
    return _draw_in_python(gate, skip)


@torch.compiler.disable  # the coin flip stays in Python: drawn afresh, never frozen into a graph
def _draw_in_python(gate, skip: torch.Tensor):
    return gate.draw(skip)
