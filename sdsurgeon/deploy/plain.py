"""The folded model shipped as its plain architecture: a safetensors state_dict or a save_pretrained folder, whole
layers deleted from it when pruned."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from torch import nn

from ..errors import ConfigError, LayerError, WriteError, first_line
from ..io import hf
from ..io.files import output_of, writing
from ..surgery.fold import FoldedSite, FoldReport

SUFFIXES = {"onnx": ".onnx", "safetensors": ".safetensors", "hf": ""}  # hf: a folder


@dataclass
class PlainExport:
    """What was written for the plain architecture."""

    path: str
    format: str  # "safetensors" | "hf"
    tensors: int  # tensors in the state_dict written
    file_bytes: int  # the file, or every file of the folder
    seconds: float

    def to_dict(self) -> dict:
        return {"path": self.path, "format": self.format, "tensors": self.tensors, "file_bytes": self.file_bytes,
                "seconds": round(self.seconds, 3)}


def not_plain(report: FoldReport) -> list[FoldedSite]:
    """The sites whose fold left what the architecture's own code does not compute: a kept multiply, a
    private copy of a shared weight, a removed block. Without any, the folded model *is* the original
    architecture with scaled weights."""
    return [s for s in report.sites if s.how in ("multiply", "dropped") or s.copied]


def refuse_unless_plain(report: FoldReport, fmt: str) -> None:
    """One line naming the sites that keep a model from being its plain architecture."""
    sites = not_plain(report)
    if not sites:
        return
    shown = ", ".join(s.id for s in sites[:4]) + (f" and {len(sites) - 4} more" if len(sites) > 4 else "")
    kinds = sorted({"a kept multiply" if s.how == "multiply" else "a removed block" if s.how == "dropped"
                    else "a copied shared weight" for s in sites})
    raise ConfigError(
        f"--format {fmt} writes the original architecture with scaled weights, but {len(sites)} site(s) fold into "
        f"something else ({' and '.join(kinds)}): {shown}; export them as ONNX (--format onnx)", option="--format")


def _configs(config: Any, count: int) -> list[Any]:
    """``config`` and the configs nested in it (a multimodal model's ``text_config``) that say ``count`` layers."""
    found, todo = [], [config]
    while todo:
        c = todo.pop()
        if getattr(c, "num_hidden_layers", None) == count:
            found.append(c)
        todo += [v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "num_hidden_layers")]
    return found


def _per_layer_keys(config: Any, count: int) -> list[str]:
    """The config's lists with one entry per layer: every list ``count`` long, but those of the base config class
    (``architectures``: about the model, not its layers) and token ids (``eos_token_id`` may be a list), which
    name no layer."""
    base = set(hf.base_config_keys())
    return [k for k, v in vars(config).items() if isinstance(v, (list, tuple)) and len(v) == count
            and k not in base and not k.endswith(("token_id", "token_ids")) and not k.startswith("_")]


def delete_layers(model: nn.Module, path: str, indices: Collection[int]) -> nn.Module:
    """Delete the layers ``indices`` of the ModuleList at ``path``, as the tools that prune LLM layers do. Mutates
    ``model`` and its config, and returns it.

    The config is rewritten to say what is left: ``num_hidden_layers`` (in every nested config that says the old
    count) and every per-layer list (``layer_types``, per-layer window sizes, ...: see _per_layer_keys) lose the
    deleted entries. Every module of a kept layer that holds a ``layer_idx`` (the layer itself, its attention:
    transformers' caches are indexed by it) gets the layer's new index.
    """
    layers = model.get_submodule(path)
    count, gone = len(layers), set(indices)
    if not gone <= set(range(count)) or len(gone) == count:
        raise LayerError(f"cannot delete layers {sorted(gone)} of {count} at {path}: a model keeps at least one "
                         "layer and deletes only those it has", where=path, option="--drop-layers")
    kept = [layer for i, layer in enumerate(layers) if i not in gone]
    config = getattr(model, "config", None)
    configs = [] if config is None else _configs(config, count)
    if config is not None and not configs:
        raise LayerError(f"{type(model).__name__}'s config does not say num_hidden_layers = {count} (the layers at "
                         f"{path}), so a folder with layers deleted would not load: use --format onnx",
                         where=path, option="--format")
    for c in configs:
        for key in _per_layer_keys(c, count):
            old = getattr(c, key)
            setattr(c, key, type(old)(v for i, v in enumerate(old) if i not in gone))
        c.num_hidden_layers = len(kept)
    for new, layer in enumerate(kept):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, type(layers)(kept))
    return model


def write_safetensors(model: nn.Module, dest: str | os.PathLike) -> PlainExport:
    """``model``'s state_dict as safetensors (shared tensors stored once, as ``safetensors.torch.save_model`` does:
    load it with ``safetensors.torch.load_model(model, path)``)."""
    from safetensors.torch import save_model

    started = time.perf_counter()
    try:
        with writing(dest):  # a full disk
            save_model(model, str(dest))
    except OSError as exc:
        raise WriteError(f"cannot write {output_of(dest)}: {exc.strerror}; choose another output with -o") from None
    return PlainExport(str(dest), "safetensors", len(model.state_dict()), Path(dest).stat().st_size,
                       time.perf_counter() - started)


def write_pretrained(model: nn.Module, dest: str | os.PathLike) -> PlainExport:
    """``model.save_pretrained(dest)`` (safetensors weights and its config): plain transformers loads it."""
    started = time.perf_counter()
    if not hasattr(model, "save_pretrained"):
        raise ConfigError(f"--format hf writes a transformers save_pretrained folder, but {type(model).__name__} is "
                          "not a transformers model; use --format safetensors", option="--format")
    try:
        with writing(dest), hf.quiet():  # a full disk
            model.save_pretrained(str(dest), safe_serialization=True)
    except OSError as exc:
        raise WriteError(f"cannot write {output_of(dest)}: {exc.strerror}; choose another output with -o") from None
    except WriteError:
        raise
    except Exception as exc:  # transformers refuses (a config it cannot serialise, ...)
        raise WriteError(f"transformers could not save {type(model).__name__}: {first_line(exc)}") from None
    size = sum(f.stat().st_size for f in Path(dest).rglob("*") if f.is_file())
    return PlainExport(str(dest), "hf", len(model.state_dict()), size, time.perf_counter() - started)


def load_plain(fmt: str, path: str | os.PathLike, fresh: nn.Module | type) -> nn.Module:
    """What a user without sdsurgeon gets back: ``fresh`` (the architecture) filled from the safetensors file,
    or the folder loaded by the architecture's own ``from_pretrained`` (``fresh`` may be the class itself)."""
    if fmt == "safetensors":
        from safetensors.torch import load_model

        load_model(fresh, str(path), strict=True)
        return fresh.eval()
    with hf.quiet():
        loaded = (fresh if isinstance(fresh, type) else type(fresh)).from_pretrained(str(path)).eval()
    loaded.config.use_cache = False  # as it was captured: a cache is no output to compare
    return loaded
