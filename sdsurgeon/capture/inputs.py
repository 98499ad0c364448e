"""Example inputs: InputSpec, their creation within bounds, and binding them to a graph's placeholders."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.fx as fx

from ..errors import ConfigError, option_error

MAX_INPUT_ELEMENTS = 2**28  # per example input (1 GiB of float32)


DTYPES = {
    "float32": torch.float32, "float": torch.float32, "float64": torch.float64, "double": torch.float64,
    "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32, "bool": torch.bool,
}


def parse_shape(text: str, option: str = "--input-shape") -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d <= 0 for d in shape):
        raise option_error(option, f"{text!r}: expected positive integers separated by commas, e.g. 1,3,32,32")
    return shape


@dataclass(frozen=True)
class InputSpec:
    """One example input: forward argument ``name`` (None = next positional), its shape and dtype."""

    name: str | None
    shape: tuple[int, ...]
    dtype: str = "float32"
    high: int | None = None  # integer inputs are drawn from [0, high): token ids below the vocabulary size

    def __post_init__(self) -> None:
        # Every spec (command line, config, a file's recipe, a transformers config) passes here before a
        # tensor is made: an absurd shape is a clear error, not an allocation that takes the machine.
        shape = self.shape
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                 for d in shape)):
            raise ConfigError(f"input shape {shape!r}: expected whole numbers, e.g. 1,3,32,32")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ConfigError(
                f"input shape {','.join(map(str, shape))} has {math.prod(shape):,} elements, more than the "
                f"{MAX_INPUT_ELEMENTS:,} an example input may have; a small example (batch 1) is enough"
            )

    @classmethod
    def parse(cls, text: str) -> "InputSpec":
        """``NAME:SHAPE[:DTYPE]``, e.g. ``input_ids:1,16:int64``."""
        fields = text.split(":")
        if len(fields) not in (2, 3) or not fields[0].isidentifier():
            raise option_error("--input", f"{text!r}: expected NAME:SHAPE[:DTYPE], e.g. x:1,3,32,32 or ids:1,16:int64")
        dtype = fields[2] if len(fields) == 3 else "float32"
        if dtype not in DTYPES:
            raise option_error("--input", f"{text!r}: unknown dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
        return cls(fields[0], parse_shape(fields[1], "--input"), dtype)

    def make(self, generator: torch.Generator | None = None) -> torch.Tensor:
        dtype = DTYPES[self.dtype]
        if dtype.is_floating_point:
            return torch.randn(self.shape, generator=generator).to(dtype)
        if dtype == torch.bool or self.name == "attention_mask":
            return torch.ones(self.shape, dtype=dtype)  # attend to everything
        return torch.randint(0, self.high or 2, self.shape, generator=generator, dtype=dtype)

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}
        return d if self.high is None else {**d, "high": self.high}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(d.get("name"), tuple(d["shape"]), d.get("dtype", "float32"), d.get("high"))


def parse_specs(shape: str | Sequence[int] | None, named: Iterable[str] | None, *,
                shape_option: str = "--input-shape") -> list[InputSpec] | None:
    """The example inputs a front end was given: one unnamed float32 input of ``shape`` (text as ``1,3,32,32``, or
    numbers), then one per ``NAME:SHAPE[:DTYPE]`` of ``named``; None when neither is given. The command line and
    batch configs both read theirs here (a config passes its key as ``shape_option``)."""
    specs = []
    if shape is not None:
        text = shape if isinstance(shape, str) else ",".join(map(str, shape))
        specs.append(InputSpec(None, parse_shape(text, shape_option)))
    specs += [InputSpec.parse(text) for text in named or ()]
    return specs or None


def make_example_inputs(specs: Iterable[InputSpec], seed: int = 0) -> ExampleInputs:
    """Positional and keyword example tensors for ``model(*args, **kwargs)``."""
    g = torch.Generator().manual_seed(seed)
    args, kwargs = [], {}
    for spec in specs:
        if spec.name is None:
            args.append(spec.make(g))
        else:
            kwargs[spec.name] = spec.make(g)
    return tuple(args), kwargs


def copy_inputs(inputs: ExampleInputs) -> ExampleInputs:
    """Clones of a job's example tensors, for one stage: a forward that writes its input in place changes the
    stage's copy, never what the next stage runs on (one draw per job, each stage its own copy)."""
    args, kwargs = inputs
    return tuple(a.clone() for a in args), {k: v.clone() for k, v in kwargs.items()}


def normalize_inputs(example_inputs) -> ExampleInputs | None:
    """Accept a tensor, a tuple of positional tensors, a dict of keyword tensors, or (args, kwargs)."""
    if example_inputs is None:
        return None
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if (
        isinstance(example_inputs, tuple) and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple) and isinstance(example_inputs[1], dict)
    ):
        return example_inputs
    return tuple(example_inputs), {}


def specs_of(inputs: ExampleInputs) -> list[InputSpec]:
    """Input specs describing example tensors (non-tensor arguments are not recorded)."""
    args, kwargs = inputs
    named = [(None, a) for a in args] + list(kwargs.items())
    return [InputSpec(n, tuple(t.shape), str(t.dtype).removeprefix("torch."), _high(t))
            for n, t in named if isinstance(t, torch.Tensor)]


def _high(t: torch.Tensor) -> int | None:
    """For integer examples, the range to draw again from (token ids must stay below the vocabulary)."""
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex() or not t.numel():
        return None
    return max(int(t.max()) + 1, 2)


def bind_placeholders(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """Positional values for gm's placeholders from a call's args and kwargs (defaults filled in)."""
    values, pending = [], list(args)
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        name = n.target.lstrip("*")
        if name in kwargs:
            values.append(kwargs[name])
        elif pending:
            values.append(pending.pop(0))
        elif n.args:
            values.append(n.args[0])
        else:
            raise ConfigError(f"no example value for input {name!r}; give it with --input {name}:SHAPE")
    return values


ExampleInputs = tuple[tuple, dict]


def sequence_inputs(named: dict[str, torch.Tensor]) -> dict[str, str]:
    """Input name -> the name of its sequence axis (axis 1), for token inputs: integer tensors of two or more
    dimensions (ids, attention masks, token types, positions). Those named ``decoder_*`` share a decoder
    sequence, the others the sequence; an input whose length differs from its group's first keeps it fixed."""
    groups: dict[str, int] = {}
    out = {}
    for name, t in named.items():
        if t.dim() < 2 or t.is_floating_point() or t.dtype == torch.bool:
            continue
        axis = "decoder_sequence" if name.startswith("decoder_") else "sequence"
        if groups.setdefault(axis, t.shape[1]) == t.shape[1]:
            out[name] = axis
    return out
