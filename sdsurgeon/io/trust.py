"""Who is trusted: what a file may import or call, the user's trusted factories, pickles, bounded YAML, sys.path."""

# A file never vouches for itself. What a weights-only file may import or call is what the *user*
# trusts: factories named with --arch on the command line (remembered in the user's trust store,
# never in the file), factories trusted with sdsurgeon.trust(), and the exact built-in factories of
# BUILTIN_FACTORIES. A factory spec is `module:attribute`, the attribute defined in that module's
# package, never a dotted or dunder path. Pickled code runs only with --trust-pickle; transformers
# folders load with trust_remote_code=False. This module imports no torch at load time.

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import io
import json
import os
import pickletools
import site
import sys
import sysconfig
import zipfile
from _compat_pickle import IMPORT_MAPPING, NAME_MAPPING
from pathlib import Path
from typing import Any, Callable, Iterable

from ..errors import ConfigError, LoadError, SurgeonError, UnsafeLoadError
from ..io.files import atomic_write

# Factories trusted without being named: an exact list, never a module prefix (a prefix let a file
# record `sdsurgeon.models:torch.serialization.os.system`).
BUILTIN_FACTORIES = frozenset({"sdsurgeon.models:cifar_resnet", "sdsurgeon.models:vit"})
REMOTE_CODE = False  # transformers' trust_remote_code: never on, so a folder's own .py files never run
STORE_FILE = "trusted.json"
MAX_YAML_BYTES = 2**20  # a batch config is small; more is refused unread
MAX_YAML_SIZE = 2**21  # nodes plus scalar characters of the document with every alias expanded
MAX_PICKLE_BYTES = 2**28  # a data.pkl larger than this is not scanned for globals

# Trust given in this process, by store path: kept even where the store cannot be written, and all a
# batch config or `plan` gives (they name factories for this run only and never write the store).
_given: dict[str, dict[str, str | None]] = {}


# --- the current folder ------------------------------------------------------------------------------


def drop_current_folder() -> None:
    """Take the current folder (and a script's own folder) off ``sys.path``, as ``python -P`` would.

    ``python -m`` puts the current folder first, a console script its own folder: a stray
    ``onnxruntime.py`` there would shadow the installed package. The folder becomes importable
    again only for an architecture the user names (appended last, see ``import_factory``).
    """
    here = os.path.realpath(os.getcwd())
    protected = set()
    with contextlib.suppress(Exception):
        paths = sysconfig.get_paths()
        protected = {os.path.realpath(p) for p in [*site.getsitepackages(), site.getusersitepackages(),
                                                   *(paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))]}
    script = sys.argv[0] if sys.argv else ""
    script_dir = os.path.realpath(os.path.dirname(os.path.abspath(script))) if os.path.isfile(script) else None
    kept = []
    for i, entry in enumerate(sys.path):
        real = os.path.realpath(entry or ".")
        if real not in protected and (entry in ("", ".") or real == here or (i == 0 and real == script_dir)):
            continue
        kept.append(entry)
    sys.path[:] = kept


def _append_to_path(folder: str) -> None:
    """Make ``folder`` importable after everything installed (never ahead of it)."""
    real = os.path.realpath(folder)
    if real not in {os.path.realpath(p or ".") for p in sys.path if p}:
        sys.path.append(real)


# --- the user's trust store --------------------------------------------------------------------------


def store_path() -> Path:
    """``$SDSURGEON_HOME/trusted.json``, else ``$XDG_CONFIG_HOME/sdsurgeon/trusted.json`` (``~/.config``)."""
    home = os.environ.get("SDSURGEON_HOME")
    if home:
        return Path(home) / STORE_FILE
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "sdsurgeon" / STORE_FILE


def _stored(path: Path) -> dict[str, str | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or unreadable: trusts nothing more
        return {}
    factories = data.get("factories") if isinstance(data, dict) else None
    if not isinstance(factories, dict):
        return {}
    return {spec: entry.get("root") if isinstance(entry, dict) and isinstance(entry.get("root"), str) else None
            for spec, entry in factories.items() if isinstance(spec, str)}


def trusted_factories() -> dict[str, str | None]:
    """Factories the user trusts: ``package.module:factory`` -> the folder its package was imported from."""
    path = store_path()
    return {**_stored(path), **_given.get(str(path), {})}


def _remember(spec: str, root: str | None, *, persist: bool = True) -> None:
    """Trust ``spec`` (imported from ``root``) in this process and, with ``persist``, in the user's store."""
    path = store_path()
    _given.setdefault(str(path), {})[spec] = root
    if not persist or spec in BUILTIN_FACTORIES:  # built-ins need no entry: the store lists the user's own
        return
    stored = _stored(path)
    if spec in stored and stored[spec] == root:
        return
    stored[spec] = root
    # A store that cannot be written (read-only home) only costs the user an --arch later.
    with contextlib.suppress(OSError, SurgeonError):
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_store(path, stored)


def _write_store(path: Path, stored: dict[str, str | None]) -> None:
    text = json.dumps({"version": 1, "factories": {s: {"root": r} for s, r in sorted(stored.items())}}, indent=1)
    atomic_write(path, lambda f: f.write(text.encode()))


def trust(spec: str, *, folder: str | os.PathLike | None = None) -> None:
    """Trust the factory ``package.module:factory``: files that record it may rebuild with it.

    The package is looked up, not imported, on ``sys.path`` and then in ``folder`` (default: the
    current folder); the folder it is found in is remembered with it, so a later load imports it from
    there and nowhere else. ``--arch`` on the command line and ``arch=`` in Python trust what they name.
    """
    module_name, _attr = parse_factory(spec)
    top = module_name.partition(".")[0]
    found = _find(top)
    if found is None:
        _append_to_path(str(folder) if folder is not None else os.getcwd())
        found = _find(top)
    if found is None:
        raise LoadError(f"cannot trust {spec!r}: no module {top!r} is importable here or in "
                        f"{folder if folder is not None else os.getcwd()}")
    _remember(spec, _root(found))


def _find(top: str):
    """The spec of a top-level module, found without running it (None: not importable)."""
    try:
        return importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None


def _builtin(spec: str) -> bool:
    return spec in BUILTIN_FACTORIES


def forget(spec: str) -> bool:
    """Stop trusting ``spec`` (``sdsurgeon trust forget``); False when the store did not hold it."""
    path = store_path()
    _given.get(str(path), {}).pop(spec, None)
    stored = _stored(path)
    if spec not in stored:
        return False
    del stored[spec]
    _write_store(path, stored)  # a failure is a WriteError naming the store
    return True


def stored_factories() -> dict[str, str | None]:
    """The user's trust store as written (``sdsurgeon trust list``): spec -> folder it is imported from."""
    return _stored(store_path())


def _root(spec) -> str | None:
    """The folder on sys.path that holds a top-level module (None: built into Python)."""
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:  # a package: the folder that holds its folder
        return os.path.dirname(os.path.realpath(locations[0]))
    if spec.origin and os.path.isabs(spec.origin):
        return os.path.dirname(os.path.realpath(spec.origin))
    return None


# --- factories ---------------------------------------------------------------------------------------


def parse_factory(spec: str) -> tuple[str, str]:
    """``module:attribute`` -> (module, attribute): dotted module names, one plain attribute, no dunder anywhere.

    A dotted attribute (``sdsurgeon.models:torch.serialization.os.system``) would walk from a trusted
    module to anything it imports; a dunder one (``__builtins__``, ``__class__``) to Python's internals.
    """
    module_name, sep, attr = str(spec).partition(":")
    names = module_name.split(".") + [attr]
    if not sep or not all(n.isidentifier() and not n.startswith("__") for n in names):
        raise ConfigError(f"--arch {spec!r}: expected package.module:factory (one name after the colon, no "
                          "dotted or __dunder__ parts), e.g. mymodels.resnet:resnet110",
                          what=f"{spec!r}: expected package.module:factory", option="--arch")
    return module_name, attr


def import_factory(spec: str, *, recorded_in: str | os.PathLike | None = None,
                   folders: Iterable[str | os.PathLike] = ()) -> Callable[..., Any]:
    """Resolve ``package.module:factory``; the one place sdsurgeon imports an architecture.

    Named by the user (``recorded_in`` None): imported from the installed packages, else from
    ``folders`` (the current folder, a batch config's folder), appended after them. Recorded in a
    file: imported only if it is built in or the user trusts it, from the folder it was trusted in;
    else refused before anything is imported. Either way the attribute must be defined in the named
    module or a submodule of it. Nothing is remembered here: ``remember`` does that once the factory
    has built a model.
    """
    module_name, attr = parse_factory(spec)
    top = module_name.partition(".")[0]
    label = f"--arch {spec!r}" if recorded_in is None else f"the architecture {spec!r} recorded in {recorded_in}"
    if recorded_in is not None and not _builtin(spec):
        _check_trusted(spec, top, recorded_in)
    elif recorded_in is None:
        for folder in folders:
            _append_to_path(str(folder))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise LoadError(
            f"{label}: cannot import {module_name!r} ({type(exc).__name__}: {exc}); "
            "install the package or run from the folder that contains it"
        ) from None
    try:  # one plain name (parse_factory): a lazy module (transformers) resolves it on first access
        obj = getattr(module, attr)
    except Exception:
        raise LoadError(f"{label}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise LoadError(f"{label}: {attr!r} is not callable; point at a class or function that builds the model")
    defined_in = getattr(obj, "__module__", None)
    if not isinstance(defined_in, str) or not (defined_in == module_name or defined_in.startswith(module_name + ".")):
        raise LoadError(f"{label}: {attr!r} is not defined in {module_name!r} (it comes from "
                        f"{defined_in if isinstance(defined_in, str) else 'nowhere it names'}); name a class or "
                        "function by the module that defines it")
    return obj


def remember(spec: str, *, persist: bool) -> None:
    """Trust a factory the user named, once it has built an ``nn.Module``: for this process, and with
    ``persist`` in the user's store (the command line's ``--arch`` only: never a config or ``plan``)."""
    if not _builtin(spec):
        _remember(spec, _root(_find(parse_factory(spec)[0].partition(".")[0])), persist=persist)


def _check_trusted(spec: str, top: str, recorded_in) -> None:
    """Refuse a recorded factory the user does not trust, or one that now resolves elsewhere; imports nothing."""
    factories = trusted_factories()
    if spec not in factories:
        raise UnsafeLoadError(
            f"{recorded_in} records the architecture {spec!r}, which you have not trusted on this machine, so "
            f"nothing was imported; if you trust it, pass --arch {spec} (sdsurgeon.trust({spec!r}) in Python)"
        )
    root = factories[spec]
    if root is not None:
        _append_to_path(root)
    found = _root(_find(top))
    if root is not None and found is not None and found != os.path.realpath(root):
        raise UnsafeLoadError(
            f"{recorded_in} records the architecture {spec!r}, which you trusted in {root}, but {top!r} is now "
            f"found in {found}, so nothing was imported; if you trust that one, pass --arch {spec}"
        )


def transformers_class(transformers, name: str | None):
    """The ``transformers`` model class ``name`` (None: not given or unknown); nothing else is ever called."""
    if not name:
        return None
    cls = getattr(transformers, name, None) if str(name).isidentifier() else None
    if cls is None:
        return None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsafeLoadError(f"{name!r} is not a transformers model class; it was not called")
    return cls


# --- pickles -----------------------------------------------------------------------------------------


def unsafe_globals(path: str | os.PathLike) -> list[str]:
    """What a torch.save file's pickle would import beyond torch's weights-only allowlist, read statically.

    Nothing is unpickled. Empty when the file names nothing beyond weights, or is not a readable pickle.
    """
    from .. import _torch

    allowed = _torch.weights_only_allowed_globals()
    return sorted(name for name in _pickled_globals(Path(path)) if name not in allowed)


def _pickled_globals(path: Path) -> set[str]:
    found: set[str] = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.filename.endswith("data.pkl") and info.file_size <= MAX_PICKLE_BYTES:
                        _scan(io.BytesIO(zf.read(info)), found)
        else:
            with open(path, "rb") as f:
                for _ in range(4):  # torch's legacy format: magic number, protocol, sys info, the object
                    if not _scan(f, found):
                        break
    except Exception:  # damaged: what was read so far is the answer
        pass
    return found



def _scan(stream, found: set[str]) -> bool:
    """Add the globals of one pickle in ``stream`` to ``found``; False at the end of the stream."""
    pushed: list[Any] = []  # the values the opcodes push, as far as STACK_GLOBAL needs them
    memo: dict[int, Any] = {}
    ops = 0
    for op, arg, _pos in pickletools.genops(stream):
        ops += 1
        name = op.name
        if name in ("GLOBAL", "INST"):
            module, _, attr = str(arg).partition(" ")
            found.add(_global_name(module, attr))
            pushed.append(None)
        elif name == "STACK_GLOBAL":
            module, attr = (pushed[-2:] if len(pushed) >= 2 else [None, None])
            found.add(_global_name(module, attr) if isinstance(module, str) and isinstance(attr, str) else "<a computed name>")
            pushed.append(None)
        elif name in ("MEMOIZE",):
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = pushed[-1] if pushed else None
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            pushed.append(memo.get(arg))
        elif name == "STOP":
            return True
        elif op.stack_after and isinstance(arg, str):
            pushed.append(arg)
        elif op.stack_after:
            pushed.append(None)
        del pushed[:-2]
    return ops > 0


def _global_name(module: str, attr: str) -> str:
    if (module, attr) in NAME_MAPPING:  # protocol 2 spells some Python 3 names the Python 2 way, as torch reads them
        module, attr = NAME_MAPPING[(module, attr)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{attr}"


# --- YAML --------------------------------------------------------------------------------------------


def load_yaml(text: str, where: str):
    """(data, root node) of a YAML document, read with the safe loader and bounded before it is built.

    Aliases share nodes, so a few lines can stand for billions of values (an alias bomb) that later
    code would expand; the document's expanded size is counted on the node graph first. A key given twice
    in one mapping, at any depth, is an error (PyYAML would keep the last one without a word).
    """
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text)} characters, more than a batch config may hold ({MAX_YAML_BYTES})")
    try:
        loader = yaml.SafeLoader(text)
        try:
            try:
                root = loader.get_single_node()
            except RecursionError:
                raise ConfigError(f"{where}: nested too deeply to read") from None
            if root is None:
                return None, None
            _check_expanded_size(root, where)
            return loader.construct_document(root), root
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, where) from None


def _yaml_error(exc, where: str) -> ConfigError:
    """PyYAML's error as one line with the file and line, its parts kept as fields."""
    mark = getattr(exc, "problem_mark", None)
    at = f"{where}:{mark.line + 1}" if mark else where
    # A MarkedYAMLError says its problem in a field; the others (a ReaderError: bytes that are not text)
    # only in their text, whose first line is the problem.
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigError(f"{at}: not valid YAML ({problem})", what=f"not valid YAML ({problem})", where=at)


def _check_expanded_size(root, where: str) -> None:
    import yaml

    def children(node) -> list:
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        return []

    sizes: dict[int, int] = {}
    open_: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:  # iterative post-order over the node graph, each shared node counted once per use
        node, done = stack.pop()
        key = id(node)
        if done:
            own = 1 + (len(node.value) if isinstance(node, yaml.ScalarNode) else 0)
            sizes[key] = size = own + sum(sizes[id(c)] for c in children(node))
            open_.discard(key)
            if size > MAX_YAML_SIZE:
                raise ConfigError(
                    f"{where}:{node.start_mark.line + 1}: the document's aliases expand to more than "
                    f"{MAX_YAML_SIZE} values and characters; a batch config needs no alias bomb"
                )
            continue
        if key in sizes:
            continue
        if key in open_:
            raise ConfigError(f"{where}:{node.start_mark.line + 1}: an alias refers to its own anchor (a recursive document)")
        if isinstance(node, yaml.MappingNode):
            _check_unique_keys(node, where)
        open_.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in sizes)


def _check_unique_keys(node, where: str) -> None:
    """A mapping's keys, once each: ``trust_pickle`` given twice must not let the last one win unseen."""
    import yaml

    lines: dict[tuple[str, str], int] = {}
    for key, _value in node.value:
        # A merge key (<<) brings another mapping's keys in on purpose; a key that is itself a collection
        # has no text to compare (PyYAML refuses it when it builds the mapping).
        if not isinstance(key, yaml.ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
            continue
        line = key.start_mark.line + 1
        if (key.tag, key.value) in lines:
            what = f"duplicate key {key.value!r} (also at line {lines[key.tag, key.value]})"
            raise ConfigError(f"{where}:{line}: {what}; give each key once", what=what, where=f"{where}:{line}",
                              hint="give each key once")
        lines[key.tag, key.value] = line
