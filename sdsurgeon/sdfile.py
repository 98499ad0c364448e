"""Load any model file (folders, weights, pickles, .sd.pt) and write the .sd.pt format: source + recipe + state_dict."""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from .capture.inputs import DTYPES
from .errors import ConfigError, LoadError, SurgeonError, UnsafeLoadError, WriteError, first_line
from .analysis.schedule import ScheduleSpec
from .io import hf
from .io.checkpoint import (
    FORMAT,
    TRUST_PICKLE,
    TensorBudget,
    build,
    check_regular,
    fit_state,
    is_sdsurgeon_file,
    is_state_dict,
    load_state_strictly,
    read_safetensors,
    state_dict_of,
    torch_load,
)
from .io.files import atomic_write
from .io.source import SOURCE_ATTR, ModelSource, tag
from .io.trust import trust
from .surgery.early_exit import check_record
from .surgery.inject import apply_recipe
from .surgery.recipe import RECIPE_ATTR, Recipe

FORMAT_VERSION = 1


# --- architectures ---------------------------------------------------------------------------------


# --- loading ---------------------------------------------------------------------------------------


def load(path: str | os.PathLike | None = None, **keywords) -> nn.Module:
    """Load a model from a checkpoint, an sdsurgeon file, or an architecture factory alone. The keywords
    (``trust_pickle``, ``arch``, ``arch_kwargs``, ``arch_folders``, ``remember_arch``) are ``load_recorded``'s.

    - a folder written by transformers' ``save_pretrained`` (config.json + weights), local files only,
      never running code of its own (``trust_remote_code`` stays off);
    - a state_dict (``.pt``/``.pth``/``.safetensors``) needs ``arch`` (``package.module:factory``);
    - a full pickled ``nn.Module`` is unpickled only with ``trust_pickle=True`` (unpickling runs code);
    - a file written by sdsurgeon is rebuilt from the factory and recipe it records, if that factory
      is one you trust (built in, named with ``arch`` before, or ``sdsurgeon.trust``d);
    - no path: a fresh model from ``arch``.

    ``arch`` is trusted from then on once it has built a model (remembered in the user's trust store;
    with ``remember_arch=False`` for this process only, as ``plan`` and batch configs name it). It is
    imported from the installed packages, else from ``arch_folders`` (default: the current folder).
    """
    model, recipe = load_recorded(path, **keywords)
    # the model built here is ours: the surgery is redone on it, no second copy
    return model if recipe is None else apply_recipe(model, recipe, in_place=True)


def load_recorded(
    path: str | os.PathLike | None = None,
    *,
    trust_pickle: bool = False,
    arch: str | None = None,
    arch_kwargs: dict | None = None,
    arch_folders: Iterable[str | os.PathLike] | None = None,
    remember_arch: bool = True,
) -> tuple[nn.Module, Recipe | None]:
    """``load`` without redoing a recorded surgery: the architecture holding the file's weights, and the recipe it
    records (an sdsurgeon file, or a folder an injected model's ``save_pretrained`` wrote), else None. What
    ``load`` applies (``surgery.inject.apply_recipe``), and what ``export`` folds without building a gate
    (``surgery.inject.fold_recipe``). A pickled model comes as it was pickled (gated, if it was), with None."""
    if arch_kwargs and not arch:
        raise ConfigError("--arch-kwargs needs --arch package.module:factory")

    def named() -> nn.Module:
        return build(arch, arch_kwargs, folders=arch_folders, remember=remember_arch)

    if path is None:
        if not arch:
            raise ConfigError("give a checkpoint file, or an architecture with --arch package.module:factory")
        return named(), None
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file")
    if path.is_dir():
        if not hf.is_folder(path):
            raise LoadError(f"{path} is a folder without config.json; give a checkpoint file, or a folder written "
                            "by a transformers model's save_pretrained")
        if arch:
            raise ConfigError(f"{path} is a transformers folder: its config.json names the architecture; drop --arch")
        model = hf.load_folder(path)
        return model, _recorded_in_folder(model, path)
    check_regular(path)
    if path.suffix == ".safetensors":
        return _from_state_dict(read_safetensors(path), path, arch, named), None
    obj = torch_load(path, trust_pickle)
    if is_sdsurgeon_file(obj):
        return _from_sdsurgeon_file(obj, path, trust_pickle, named if arch else None)
    if isinstance(obj, nn.Module):
        if arch:
            raise ConfigError(f"{path} holds a whole model; --arch is only for files that hold weights alone")
        tag(obj, SOURCE_ATTR, ModelSource("pickle"))
        return obj, None
    return _from_state_dict(state_dict_of(obj, path), path, arch, named), None


def _recorded_in_folder(model: nn.Module, path: Path) -> Recipe | None:
    """The recipe a folder an injected model's ``save_pretrained`` wrote records in config.json, checked."""
    recorded = getattr(model.config, hf.RECIPE_KEY, None)
    if recorded is None:
        return None
    try:
        _check_recipe(recorded)
        return Recipe.from_dict(recorded)
    except (SurgeonError, _Damaged, TypeError, ValueError, KeyError) as exc:
        raise LoadError(f"{path / 'config.json'}: its {hf.RECIPE_KEY!r} recipe is not usable: {exc}") from None


def _from_state_dict(
    state: dict[str, torch.Tensor], path: Path, arch: str | None, named: Callable[[], nn.Module]
) -> nn.Module:
    if not arch:
        raise LoadError(
            f"{path} holds weights only (a state_dict); say which architecture they belong to with "
            "--arch package.module:factory (and --arch-kwargs JSON if the factory takes arguments)"
        )
    model = named()
    fit_state(model, state, path, f"--arch {arch}")
    return model


# --- sdsurgeon files --------------------------------------------------------------------------------

# Recipe key -> what its value must be. A file is data from anywhere: every part is checked before use.
_RECIPE_KINDS: dict[str, tuple[type, ...]] = {
    "sites": (list,), "mode": (str,), "scaling": (str,), "seed": (int, type(None)), "p_L": (int, float, type(None)),
    "rule": (str, type(None)), "leaves": (list,), "inputs": (list, type(None)), "capture": (str,),
    "sync_ranks": (bool,), "keep_existing": (bool,), "replaced": (list,), "schedule": (dict, type(None)),
    "early_exit": (dict, type(None)),
}


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
    if d.get("schedule") is not None:
        ScheduleSpec.from_dict(d["schedule"])  # ConfigError: reported as an unusable recipe
    if d.get("early_exit") is not None:
        check_record(d["early_exit"])  # EarlyExitError (a ConfigError): likewise
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
        _need(is_state_dict(state) or (isinstance(state, dict) and not state),
              "its state_dict is not a mapping of names to tensors")
    if payload.get("recipe") is not None:
        _check_recipe(payload["recipe"])


def _from_sdsurgeon_file(
    payload: dict, path: Path, trust_pickle: bool, named: Callable[[], nn.Module] | None
) -> tuple[nn.Module, Recipe | None]:
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
                f"so it is refused. {TRUST_PICKLE} if you trust its source"
            )
        try:
            model = torch.load(io.BytesIO(payload["module"]), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise LoadError(f"{path}: unpickling its model failed ({first_line(exc)})") from None
        tag(model, SOURCE_ATTR, ModelSource("pickle"))
        return model, None
    arch, what = source["arch"], f"the architecture it records ({source['arch']})"
    if named is not None:
        model, what = named(), "--arch"
    else:  # what the file describes may build no more tensors than it holds
        holds = TensorBudget.of(payload["state_dict"], str(path))
        if source["kind"] == "hf":
            model = hf.build(arch, source.get("arch_kwargs") or {}, holds=holds, recorded_in=path, empty=True)
        else:
            model = build(arch, source.get("arch_kwargs") or {}, recorded_in=path, holds=holds)
    # The weights go in first, as the file's tensors themselves (memory-mapped, no copy: the model built here
    # is ours); the caller redoes (or folds) the surgery on that same model: the weights are held once. An
    # injected model has its original's state_dict keys, so they fit either way.
    load_state_strictly(model, payload["state_dict"], path, what, assign=True)
    unset = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if unset is not None:  # built empty (hf) and not among the file's tensors: nothing can compute with it
        raise LoadError(f"the weights in {path} do not fit {what}: they leave {unset!r} unset")
    return model, recipe


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


def rebuild_architecture(model: nn.Module) -> nn.Module | None:
    """A fresh instance of the architecture ``model`` came from (its recorded factory or transformers config,
    random weights), or None when it came from a pickle and nothing records how to build it."""
    return architecture_of(getattr(model, SOURCE_ATTR, None))


def architecture_of(source: ModelSource | None) -> nn.Module | None:
    """A fresh instance of the architecture a model's recorded ``source`` names (see rebuild_architecture)."""
    if source is None or source.kind not in ("arch", "hf"):
        return None
    if source.kind == "hf":
        return hf.build(source.arch, source.arch_kwargs)
    return build(source.arch, source.arch_kwargs, recorded_in="the model's recorded source")


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
