"""Read and write checkpoints safely: formats, trust, architecture factories (writes: files.py)."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import pickle
import re
import sys
import typing
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import hf
from .capture import tag
from .errors import ConfigError, LoadError, UnsafeLoadError, WriteError, first_line
from .files import atomic_write
from .inject import RECIPE_ATTR, Recipe, apply_recipe

SOURCE_ATTR = "sdsurgeon_source"
FORMAT = "sdsurgeon"
FORMAT_VERSION = 1
# Wrapper keys under which training scripts commonly nest a state_dict.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


@dataclass(frozen=True)
class ModelSource:
    """How to rebuild a model's architecture: an importable factory, or a pickled module."""

    kind: str  # "arch" | "hf" (a transformers class and its config) | "pickle"
    arch: str | None = None  # the factory, or the transformers class name
    arch_kwargs: dict = field(default_factory=dict)  # its keyword arguments, or the config


# --- architectures ---------------------------------------------------------------------------------


def import_factory(spec: str) -> Callable[..., Any]:
    """Resolve ``package.module:factory`` (the current folder is importable, as for `python -m`)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--arch {spec!r}: expected package.module:factory, e.g. mymodels.resnet:resnet110")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(
            f"--arch {spec!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
            "install the package or run from the folder that contains it"
        ) from None
    obj = module
    for atom in attr.split("."):
        if not hasattr(obj, atom):
            raise LoadError(f"--arch {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, atom)
    if not callable(obj):
        raise LoadError(f"--arch {spec!r}: {attr!r} is not callable; point at a class or function that builds the model")
    return obj


def build(arch: str, arch_kwargs: dict | None = None) -> nn.Module:
    """Call an architecture factory and check that it gives an nn.Module."""
    factory = import_factory(arch)
    try:
        model = factory(**(arch_kwargs or {}))
    except Exception as exc:  # the factory rejected its arguments (TypeError, ValueError, ...)
        raise LoadError(
            f"--arch {arch!r} with --arch-kwargs {json.dumps(arch_kwargs or {})} failed: {first_line(exc)}"
        ) from None
    if not isinstance(model, nn.Module):
        raise LoadError(f"--arch {arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    tag(model, SOURCE_ATTR, ModelSource("arch", arch, dict(arch_kwargs or {})))
    return model


def parse_arch_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--arch-kwargs is not valid JSON ({exc.msg} at column {exc.colno}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--arch-kwargs must be a JSON object like '{{\"depth\": 110}}', got {text!r}")
    return value


def _builds_a_module(factory: Callable[..., Any]) -> bool:
    """True for an nn.Module class, or a function whose return annotation is an nn.Module class."""
    if isinstance(factory, type):
        return issubclass(factory, nn.Module)
    try:
        returns = typing.get_type_hints(factory).get("return")
    except Exception:
        return False
    return isinstance(returns, type) and issubclass(returns, nn.Module)


def _build_recorded(arch: str, arch_kwargs: dict, path: Path) -> nn.Module:
    # A file names the factory that load() will call. It may only name something that declares it
    # builds a model (a Module class, or a function annotated to return one); anything else (e.g.
    # subprocess:run or a third-party writer) is never called, so a weights-only file cannot run code.
    if not _builds_a_module(import_factory(arch)):
        raise UnsafeLoadError(
            f"{path} names {arch!r} as its architecture, which is not declared to build an nn.Module "
            "(a Module class, or a function annotated '-> SomeModule'); it was not called. "
            f"If you trust it, pass --arch {arch} yourself"
        )
    return build(arch, arch_kwargs)


# --- loading ---------------------------------------------------------------------------------------


def load(
    path: str | os.PathLike | None = None,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
) -> nn.Module:
    """Load a model from a checkpoint, an sdsurgeon file, or an architecture factory alone.

    - a folder written by transformers' ``save_pretrained`` (config.json + weights), local files only;
    - a state_dict (``.pt``/``.pth``/``.safetensors``) needs ``arch`` (``package.module:factory``);
    - a full pickled ``nn.Module`` is unpickled only with ``trust_pickle=True`` (unpickling runs code);
    - a file written by sdsurgeon is rebuilt from the factory and recipe it records;
    - no path: a fresh model from ``arch``.
    """
    if arch_kwargs and not arch:
        raise ConfigError("--arch-kwargs needs --arch package.module:factory")
    if path is None:
        if not arch:
            raise ConfigError("give a checkpoint file, or an architecture with --arch package.module:factory")
        return build(arch, arch_kwargs)
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if path.is_dir():
        if not hf.is_folder(path):
            raise LoadError(f"{path} is a folder without config.json; give a checkpoint file, or a folder written "
                            "by a transformers model's save_pretrained")
        if arch:
            raise ConfigError(f"{path} is a transformers folder: its config.json names the architecture; drop --arch")
        return hf.load_folder(path)
    if path.suffix == ".safetensors":
        return _from_state_dict(_read_safetensors(path), path, arch, arch_kwargs)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_sdsurgeon_file(obj, path, trust_pickle, arch, arch_kwargs)
    if isinstance(obj, nn.Module):
        if arch:
            raise ConfigError(f"{path} holds a whole model; --arch is only for files that hold weights alone")
        tag(obj, SOURCE_ATTR, ModelSource("pickle"))
        return obj
    return _from_state_dict(_state_dict_of(obj, path), path, arch, arch_kwargs)


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{path} is not a readable safetensors file ({exc})") from None


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            if any(n.endswith("constants.pkl") for n in zf.namelist()):
                raise LoadError(
                    f"{path} is a TorchScript archive, which has no Python module to rewrite; load the model "
                    "in Python, save model.state_dict(), and pass that file with --arch package.module:factory"
                )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if not found:
            # torch's message leads with advice to unpickle anyway; the cause is after "WeightsUnpickler error:"
            cause = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            detail = cause.group(1).strip() if cause else first_line(exc)
            raise LoadError(f"{path} is not a PyTorch checkpoint or is damaged ({detail})") from None
        if not trust_pickle:
            raise UnsafeLoadError(
                f"{path} holds pickled Python objects ({found.group(1)}); unpickling runs code from the file, "
                "so it is refused. Pass --trust-pickle (trust_pickle=True in Python, trust_pickle: true in a batch config) if you trust its source, or save model.state_dict() "
                "and use --arch package.module:factory"
            ) from None
    except Exception as exc:
        raise LoadError(f"{path} is not a PyTorch checkpoint or is damaged ({first_line(exc)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LoadError(
            f"{path}: unpickling failed ({first_line(exc)}); the code that defined the model must be importable"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if _is_state_dict(obj.get(key)):
                return obj[key]
    raise LoadError(
        f"{path} holds a {type(obj).__name__}, not a model or a state_dict "
        f"(looked for tensors at the top level and under {', '.join(_STATE_DICT_KEYS)})"
    )


def _from_state_dict(
    state: dict[str, torch.Tensor], path: Path, arch: str | None, arch_kwargs: dict | None
) -> nn.Module:
    if not arch:
        raise LoadError(
            f"{path} holds weights only (a state_dict); say which architecture they belong to with "
            "--arch package.module:factory (and --arch-kwargs JSON if the factory takes arguments)"
        )
    model = build(arch, arch_kwargs)
    expected = set(model.state_dict())
    if not set(state) & expected and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel/DDP
    _load_weights(model, state, path, f"--arch {arch}")
    return model


def _load_weights(model: nn.Module, state: dict, path: Path, what: str,
                  hint: str = "check --arch and --arch-kwargs") -> None:
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise LoadError(
            f"the weights in {path} do not fit {what}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"keys (e.g. {example!r}); {hint}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((l.strip() for l in str(exc).splitlines() if "size mismatch" in l), first_line(exc))
        raise LoadError(f"the weights in {path} do not fit {what}: {detail}") from None


def _from_sdsurgeon_file(
    payload: dict, path: Path, trust_pickle: bool, arch: str | None, arch_kwargs: dict | None
) -> nn.Module:
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise LoadError(f"{path} is sdsurgeon format version {version}; this sdsurgeon reads version {FORMAT_VERSION}")
    source = payload["source"]
    recipe = Recipe.from_dict(payload["recipe"]) if payload.get("recipe") else None
    if source["kind"] == "pickle":
        if not trust_pickle:
            raise UnsafeLoadError(
                f"{path} was made from a pickled model and holds it pickled; unpickling runs code from the file, "
                "so it is refused. Pass --trust-pickle (trust_pickle=True in Python, trust_pickle: true in a batch config) if you trust its source"
            )
        model = torch.load(io.BytesIO(payload["module"]), map_location="cpu", weights_only=False)
        tag(model, SOURCE_ATTR, ModelSource("pickle"))
        return model
    if arch:
        model = build(arch, arch_kwargs)
    elif source["kind"] == "hf":
        arch = source["arch"]
        model = hf.build(arch, source.get("arch_kwargs") or {})
    else:
        arch = source["arch"]
        model = _build_recorded(arch, source.get("arch_kwargs") or {}, path)
    if recipe is not None:
        model = apply_recipe(model, recipe)
    _load_weights(model, payload["state_dict"], path, f"the architecture it records ({arch})")
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model`` (strictly) and return it; reads no pickled code.

    Accepts a state_dict (``.pt``/``.pth``, also nested or ``module.``-prefixed), ``.safetensors``, or
    an sdsurgeon file. An injected model has its original's keys, so either one's weights fit.
    """
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        state = _read_safetensors(path)
    else:
        obj = _torch_load(path, trust_pickle=False)
        if isinstance(obj, dict) and obj.get("format") == FORMAT and "state_dict" in obj:
            obj = obj["state_dict"]
        elif isinstance(obj, dict) and obj.get("format") == FORMAT:
            raise LoadError(f"--weights {path} holds a pickled model, not weights; save model.state_dict() instead")
        state = _state_dict_of(obj, path)
    expected = set(model.state_dict())
    if not set(state) & expected and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    _load_weights(model, state, path, "the model", "give the state_dict saved from this model or its original")
    return model


# --- writing ---------------------------------------------------------------------------------------


def save(
    model: nn.Module, path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None
) -> None:
    """Write ``model`` as an sdsurgeon file (atomically).

    A model whose architecture factory is known (it came from ``load``/``--arch``, or ``arch`` names
    it here) is saved weights-only: the factory, the surgery recipe and the state_dict; it loads
    without trusting pickles. Any other model is pickled whole and, like its source, needs
    ``trust_pickle`` to load.
    """
    source = ModelSource("arch", arch, dict(arch_kwargs or {})) if arch else getattr(model, SOURCE_ATTR, None)
    recipe = getattr(model, RECIPE_ATTR, None)
    payload: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "recipe": recipe.to_dict() if recipe else None,
    }
    if source is not None and source.kind in ("arch", "hf"):
        payload["source"] = {"kind": source.kind, "arch": source.arch, "arch_kwargs": source.arch_kwargs}
        payload["state_dict"] = model.state_dict()
    else:
        if recipe is not None and recipe.capture == "export":
            # Unpickling a GraphModule re-traces its code, which would freeze its train/eval switch.
            raise WriteError(
                f"cannot write {path}: the model was captured with torch.export and came from a pickled checkpoint, "
                "so it could only be saved pickled, which loses its train/eval switch; give its state_dict with "
                "--arch package.module:factory instead"
            )
        buffer = io.BytesIO()
        torch.save(model, buffer)
        payload["source"] = {"kind": "pickle"}
        payload["module"] = buffer.getvalue()
    atomic_write(path, lambda f: torch.save(payload, f))


def default_output(path: str | os.PathLike | None, suffix: str = ".sd.pt", arch: str | None = None) -> Path:
    """``<stem>.sd.pt`` beside the input (or named after the factory when there is no input file)."""
    if path is None:
        name = (arch or "model").rpartition(":")[2] or "model"
        return Path(f"{name}{suffix}")
    path = Path(path)
    if path.is_dir():  # a transformers folder: the file goes beside it, named after it
        folder = Path(os.path.normpath(path))
        folder = folder.resolve() if folder.name in ("", ".", "..") else folder
        return folder.with_name(folder.name + suffix)
    stem = path.name.removesuffix(".sd.pt") if path.name.endswith(".sd.pt") else path.stem
    return path.with_name(stem + suffix)
