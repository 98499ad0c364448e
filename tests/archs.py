"""Tiny architectures importable as ``--arch archs:FACTORY`` (put tests/ on sys.path first).

The classes live here, not in test functions, so that a model pickled whole with torch.save can be
unpickled again at load time.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """x + fc2(relu(fc1(x))): one residual site."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


class TinyResNet(nn.Module):
    """A residual MLP with ``blocks`` residual sites (2 by default)."""

    def __init__(self, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Linear(width, width)
        self.blocks = nn.Sequential(*[Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


class PlainMLP(nn.Module):
    """No residual addition at all: zero sites."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_resnet(width: int = 8, blocks: int = 2) -> TinyResNet:
    return TinyResNet(width, blocks)


def no_residual(width: int = 8) -> PlainMLP:
    return PlainMLP(width)


def not_a_module():
    """A factory that returns something other than an nn.Module."""
    return {"fc.weight": torch.zeros(2, 2)}


NOT_CALLABLE = 42


class DataDependent(nn.Module):
    """Residual blocks behind a data-dependent branch: sdsurgeon captures the blocks, torch.export fails."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.blocks = nn.Sequential(Block(width), Block(width))

    def forward(self, x):
        return self.blocks(x) if x.sum() > 0 else self.blocks(-x)


def data_dependent(width: int = 8) -> DataDependent:
    return DataDependent(width)


# --- for tests/test_batch.py: models that misbehave inside a batch worker process -----------------


def _in_worker() -> bool:
    """True in a process started by multiprocessing (a batch worker), False in pytest itself."""
    import multiprocessing

    return multiprocessing.parent_process() is not None


class KillOnExport(nn.Module):
    """A linear layer that SIGKILLs its own process while torch.onnx exports it (in a worker only).

    Pass it as a leaf (``leaf: [KillOnExport]``) so torch.fx keeps its forward, and with it the kill.
    """

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        if torch.onnx.is_in_onnx_export() and _in_worker():
            import os
            import signal

            os.kill(os.getpid(), signal.SIGKILL)
        return self.fc(x)


class DiesOnExport(nn.Module):
    """TinyResNet-like (input (N, 8)), whose stem kills the worker mid-export, after the ONNX temp file exists."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = KillOnExport(width)
        self.blocks = nn.Sequential(Block(width))
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)))


def dies_on_export(width: int = 8) -> DiesOnExport:
    return DiesOnExport(width)


def sleepy_resnet(seconds: float = 60.0, width: int = 8) -> TinyResNet:
    """A TinyResNet that takes ``seconds`` to build in a worker (for batch timeouts); instant elsewhere."""
    if _in_worker():
        import time

        time.sleep(seconds)
    return TinyResNet(width)


# --- for tests/test_hf.py: a model neither capture front-end can read -----------------------------------


class SignGatedBlock(Block):
    """Block, but only where the batch sums positive: Python control flow on tensor values."""

    def forward(self, x):
        if x.sum() > 0:  # a data-dependent branch: torch.fx cannot trace it, torch.export cannot capture it
            return super().forward(x)
        return x


class Uncapturable(nn.Module):
    """Residual blocks with data-dependent control flow in the root and in every block: no front-end can capture it."""

    def __init__(self, width: int = 8, blocks: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[SignGatedBlock(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        if x.mean() > 0:
            x = -x
        return self.head(self.blocks(x))


def uncapturable(width: int = 8, blocks: int = 2) -> Uncapturable:
    return Uncapturable(width, blocks)


# --- for tests/test_cli.py: site ids as long as real models' ----------------------------------------------------


class LongNames(nn.Module):
    """Residual blocks deep in long module names (site ids of 40-odd characters, as in transformers models)."""

    def __init__(self, width: int = 8, blocks: int = 3) -> None:
        super().__init__()
        self.encoder_stack = nn.Module()
        self.encoder_stack.attention_output_block = nn.ModuleList([Block(width) for _ in range(blocks)])
        self.head = nn.Linear(width, 3)

    def forward(self, x):
        for block in self.encoder_stack.attention_output_block:
            x = block(x)
        return self.head(x)


def long_names(width: int = 8, blocks: int = 3) -> LongNames:
    return LongNames(width, blocks)
