"""Read and write checkpoints: formats, the sdsurgeon file, architecture factories (trust decisions: trust.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from . import hf
from .capture import tag
from .errors import ConfigError, LoadError, SurgeonError, UnsafeLoadError, WriteError, first_line
from .files import atomic_write, not_regular
from .inject import RECIPE_ATTR, Recipe, apply_recipe
from .trust import import_factory, trust, unsafe_globals

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


def build(arch: str, arch_kwargs: dict | None = None, *, recorded_in: str | os.PathLike | None = None,
          folders: Iterable[str | os.PathLike] | None = None) -> nn.Module:
    """Call an architecture factory and check that it gives an nn.Module.

    ``recorded_in``: the file that names the factory (then it must be one the user trusts, see
    ``trust.import_factory``); None when the user named it, found on the installed packages and then
    in ``folders`` (default: the current folder).
    """
    kwargs = dict(arch_kwargs or {})
    if recorded_in is None:
        label, given = f"--arch {arch!r}", "--arch-kwargs"
        folders = [os.getcwd()] if folders is None else folders
    else:
        label, given = f"the architecture {arch!r} recorded in {recorded_in}", "its recorded arguments"
    factory = import_factory(arch, recorded_in=recorded_in, folders=folders or ())
    try:
        model = factory(**kwargs)
    except Exception as exc:  # the factory rejected its arguments (TypeError, ValueError, ...)
        shown = json.dumps(kwargs, default=repr)
        shown = shown if len(shown) <= 200 else shown[:200] + "..."
        raise LoadError(f"{label} with {given} {shown} failed: {first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise LoadError(f"{label} returned {type(model).__name__}, not a torch.nn.Module")
    tag(model, SOURCE_ATTR, ModelSource("arch", arch, kwargs))
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


# --- loading ---------------------------------------------------------------------------------------


def load(
    path: str | os.PathLike | None = None,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    arch_folders: Iterable[str | os.PathLike] | None = None,
) -> nn.Module:
    """Load a model from a checkpoint, an sdsurgeon file, or an architecture factory alone.

    - a folder written by transformers' ``save_pretrained`` (config.json + weights), local files only,
      never running code of its own (``trust_remote_code`` stays off);
    - a state_dict (``.pt``/``.pth``/``.safetensors``) needs ``arch`` (``package.module:factory``);
    - a full pickled ``nn.Module`` is unpickled only with ``trust_pickle=True`` (unpickling runs code);
    - a file written by sdsurgeon is rebuilt from the factory and recipe it records, if that factory
      is one you trust (built in, named with ``arch`` before, or ``sdsurgeon.trust``d);
    - no path: a fresh model from ``arch``.

    ``arch`` is trusted from then on (remembered in the user's trust store). It is imported from the
    installed packages, else from ``arch_folders`` (default: the current folder).
    """
    if arch_kwargs and not arch:
        raise ConfigError("--arch-kwargs needs --arch package.module:factory")

    def named() -> nn.Module:
        return build(arch, arch_kwargs, folders=arch_folders)

    if path is None:
        if not arch:
            raise ConfigError("give a checkpoint file, or an architecture with --arch package.module:factory")
        return named()
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
    _check_regular(path)
    if path.suffix == ".safetensors":
        return _from_state_dict(_read_safetensors(path), path, arch, named)
    obj = _torch_load(path, trust_pickle)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_sdsurgeon_file(obj, path, trust_pickle, named if arch else None)
    if isinstance(obj, nn.Module):
        if arch:
            raise ConfigError(f"{path} holds a whole model; --arch is only for files that hold weights alone")
        tag(obj, SOURCE_ATTR, ModelSource("pickle"))
        return obj
    return _from_state_dict(_state_dict_of(obj, path), path, arch, named)


def _check_regular(path: Path) -> None:
    # A FIFO or a device (/dev/zero) would block or never end.
    kind = not_regular(path)
    if kind:
        raise LoadError(f"{path} is {kind}, not a checkpoint file")


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
    except Exception as exc:
        failure = exc
    # What the file would import decides, read without unpickling; torch's message (which advises
    # weights_only=False) does not.
    unsafe = unsafe_globals(path)
    if not unsafe:
        # torch's message leads with advice to unpickle anyway; the cause is after "WeightsUnpickler error:"
        cause = re.search(r"WeightsUnpickler error:\s*(.+)", str(failure))
        detail = cause.group(1).strip() if cause else first_line(failure)
        raise LoadError(f"{path} is not a PyTorch checkpoint or is damaged ({detail})") from None
    if not trust_pickle:
        shown = ", ".join(unsafe[:3]) + (f" and {len(unsafe) - 3} more" if len(unsafe) > 3 else "")
        raise UnsafeLoadError(
            f"{path} holds pickled Python objects ({shown}); unpickling runs code from the file, so it is refused. "
            f"{_TRUST_PICKLE} if you trust its source, or save model.state_dict() and use --arch package.module:factory"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LoadError(
            f"{path}: unpickling failed ({first_line(exc)}); the code that defined the model must be importable"
        ) from None


_TRUST_PICKLE = "Pass --trust-pickle (trust_pickle=True in Python, trust_pickle: true in a batch config)"


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
    state: dict[str, torch.Tensor], path: Path, arch: str | None, named: Callable[[], nn.Module]
) -> nn.Module:
    if not arch:
        raise LoadError(
            f"{path} holds weights only (a state_dict); say which architecture they belong to with "
            "--arch package.module:factory (and --arch-kwargs JSON if the factory takes arguments)"
        )
    model = named()
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
    payload: dict, path: Path, trust_pickle: bool, named: Callable[[], nn.Module] | None
) -> nn.Module:
    version = payload.get("version")
    if version != FORMAT_VERSION:
        raise LoadError(f"{path} is sdsurgeon format version {version}; this sdsurgeon reads version {FORMAT_VERSION}")
    recipe = Recipe.from_dict(payload["recipe"]) if payload.get("recipe") else None
    source = payload["source"]
    if source["kind"] == "pickle":
        if not trust_pickle:
            raise UnsafeLoadError(
                f"{path} was made from a pickled model and holds it pickled; unpickling runs code from the file, "
                f"so it is refused. {_TRUST_PICKLE} if you trust its source"
            )
        model = torch.load(io.BytesIO(payload["module"]), map_location="cpu", weights_only=False)
        tag(model, SOURCE_ATTR, ModelSource("pickle"))
        return model
    arch, what = source["arch"], f"the architecture it records ({source['arch']})"
    if named is not None:
        model, what = named(), "--arch"
    elif source["kind"] == "hf":
        model = hf.build(arch, source.get("arch_kwargs") or {})
    else:
        model = build(arch, source.get("arch_kwargs") or {}, recorded_in=path)
    if recipe is not None:
        model = apply_recipe(model, recipe)
    _load_weights(model, payload["state_dict"], path, what)
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model`` (strictly) and return it; reads no pickled code.

    Accepts a state_dict (``.pt``/``.pth``, also nested or ``module.``-prefixed), ``.safetensors``, or
    an sdsurgeon file. An injected model has its original's keys, so either one's weights fit.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"--weights {path}: no such file")
    _check_regular(path)
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
    without trusting pickles wherever that factory is trusted (``arch`` given here is trusted, as
    ``load(arch=...)`` trusts it). Any other model is pickled whole and, like its source, needs
    ``trust_pickle`` to load.
    """
    if arch:
        with contextlib.suppress(SurgeonError):  # not importable here: a later load names it with --arch
            trust(arch)
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
