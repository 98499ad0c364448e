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
from .capture import DTYPES, tag
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
    if _is_sdsurgeon_file(obj):
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


def _zip_names(path: Path) -> list[str]:
    """The member names of a zip file; none for anything else, or a zip damaged in any way zipfile can fail."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.namelist()
    except Exception:  # BadZipFile, NotImplementedError (an odd version), struct.error, ...: torch.load says more
        return []


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    if any(n.endswith("constants.pkl") for n in _zip_names(path)):
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


# --- sdsurgeon files --------------------------------------------------------------------------------

# Recipe key -> what its value must be. A file is data from anywhere: every part is checked before use.
_RECIPE_KINDS: dict[str, tuple[type, ...]] = {
    "sites": (list,), "mode": (str,), "scaling": (str,), "seed": (int, type(None)), "p_L": (int, float, type(None)),
    "rule": (str, type(None)), "leaves": (list,), "inputs": (list, type(None)), "capture": (str,),
    "sync_ranks": (bool,), "keep_existing": (bool,), "replaced": (list,),
}


def _is_sdsurgeon_file(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"] == FORMAT


def _shown(value: Any) -> str:
    """A value read from a file, for a message: short, whatever it is."""
    text = repr(value) if isinstance(value, (str, int, float, type(None))) else f"of type {type(value).__name__}"
    return text if len(text) <= 60 else text[:60] + "..."


class _Damaged(Exception):
    """Internal: what is wrong with an sdsurgeon file's contents."""


def _need(ok: bool, what: str) -> None:
    if not ok:
        raise _Damaged(what)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_recipe(d) -> None:
    _need(isinstance(d, dict), "its recipe is not a mapping")
    unknown = sorted(str(k) for k in d if k not in _RECIPE_KINDS)
    _need(not unknown, f"unknown recipe key {unknown[0]!r}" if unknown else "")
    _need("sites" in d, "its recipe has no 'sites'")
    for key, value in d.items():
        kinds = _RECIPE_KINDS[key]
        _need(isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds),
              f"recipe key {key!r} holds {type(value).__name__}")
    for site in d["sites"]:
        _need(isinstance(site, (list, tuple)) and len(site) == 2 and isinstance(site[0], str) and _is_number(site[1]),
              "a recipe site is not [site id, p]")
    _need(all(isinstance(x, str) for x in d.get("leaves", [])), "recipe leaves are not strings")
    for spec in d.get("inputs") or []:
        _need(isinstance(spec, dict) and isinstance(spec.get("shape"), list), "a recipe input has no shape")
        _need(spec.get("dtype", "float32") in DTYPES, f"a recipe input has an unknown dtype {spec.get('dtype')!r}")
        name, high = spec.get("name"), spec.get("high")
        _need(name is None or (isinstance(name, str) and name.isidentifier()), "a recipe input's name is not a name")
        _need(high is None or (isinstance(high, int) and not isinstance(high, bool) and 0 < high < 2**62),
              "a recipe input's value range is not a positive integer")
    for entry in d.get("replaced", []):
        _need(isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)
              and _is_number(entry[1]), "a replaced drop path is not [module path, rate]")


def _check_payload(payload: dict) -> None:
    source = payload.get("source")
    _need(isinstance(source, dict), "it has no 'source' (how to rebuild the architecture)")
    kind = source.get("kind")
    _need(isinstance(kind, str) and kind in ("arch", "hf", "pickle"), f"unknown source kind {_shown(kind)}")
    if kind == "pickle":
        _need(isinstance(payload.get("module"), (bytes, bytearray)), "its pickled model is missing")
    else:
        _need(isinstance(source.get("arch"), str) and bool(source["arch"]), "its source names no architecture")
        kwargs = source.get("arch_kwargs")
        _need(kwargs is None or (isinstance(kwargs, dict) and all(isinstance(k, str) for k in kwargs)),
              "its architecture arguments are not a mapping of names")
        state = payload.get("state_dict")
        _need(_is_state_dict(state) or (isinstance(state, dict) and not state),
              "its state_dict is not a mapping of names to tensors")
    if payload.get("recipe") is not None:
        _check_recipe(payload["recipe"])


def _from_sdsurgeon_file(
    payload: dict, path: Path, trust_pickle: bool, named: Callable[[], nn.Module] | None
) -> nn.Module:
    version = payload.get("version")
    if not (type(version) is int and version == FORMAT_VERSION):  # noqa: E721  (not a bool, a tensor, ...)
        raise LoadError(f"{path} is sdsurgeon format version {_shown(version)}; this sdsurgeon reads version "
                        f"{FORMAT_VERSION}")
    try:
        _check_payload(payload)
        recipe = Recipe.from_dict(payload["recipe"]) if payload.get("recipe") else None
    except SurgeonError as exc:  # a recorded input shape out of bounds, ...
        raise LoadError(f"{path}: its recipe is not usable: {exc}") from None
    except (_Damaged, TypeError, ValueError, KeyError) as exc:
        raise LoadError(f"{path} is a damaged sdsurgeon file: {exc}") from None
    source = payload["source"]
    if source["kind"] == "pickle":
        if not trust_pickle:
            raise UnsafeLoadError(
                f"{path} was made from a pickled model and holds it pickled; unpickling runs code from the file, "
                f"so it is refused. {_TRUST_PICKLE} if you trust its source"
            )
        try:
            model = torch.load(io.BytesIO(payload["module"]), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise LoadError(f"{path}: unpickling its model failed ({first_line(exc)})") from None
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
        if _is_sdsurgeon_file(obj) and "state_dict" in obj:
            obj = obj["state_dict"]
        elif _is_sdsurgeon_file(obj):
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
