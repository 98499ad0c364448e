"""Checkpoint files in: state_dicts, safetensors, trusted pickles, TorchScript refused; architecture factories."""

from __future__ import annotations

import contextlib
import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from ..errors import ConfigError, LoadError, UnsafeLoadError, first_line
from ..io.files import not_regular
from ..io.source import tag
from ..io.trust import import_factory, remember as trust_named, unsafe_globals
from .source import SOURCE_ATTR, ModelSource

# Wrapper keys under which training scripts commonly nest a state_dict.
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def build(arch: str, arch_kwargs: dict | None = None, *, recorded_in: str | os.PathLike | None = None,
          folders: Iterable[str | os.PathLike] | None = None, remember: bool = False,
          holds: "TensorBudget | None" = None) -> nn.Module:
    """Call an architecture factory and check that it gives an nn.Module.

    ``recorded_in``: the file that names the factory (then it must be one the user trusts, see
    ``trust.import_factory``); None when the user named it, found on the installed packages and then
    in ``folders`` (default: the current folder). A factory the user named is trusted for this process
    once it has built a module, and with ``remember`` (the command line's ``--arch``) from then on.
    ``holds``: the tensors the file holds; arguments read from a file may not make the factory register
    more (a tiny file recording ``depth: 10**6`` is refused before it is built).
    """
    kwargs = dict(arch_kwargs or {})
    if recorded_in is None:
        label, given = f"--arch {arch!r}", "--arch-kwargs"
        folders = [os.getcwd()] if folders is None else folders
    else:
        label, given = f"the architecture {arch!r} recorded in {recorded_in}", "its recorded arguments"
    factory = import_factory(arch, recorded_in=recorded_in, folders=folders or ())
    model = call_bounded(lambda: factory(**kwargs), holds, f"{label} with {given} {_shown_kwargs(kwargs)}")
    if not isinstance(model, nn.Module):
        raise LoadError(f"{label} returned {type(model).__name__}, not a torch.nn.Module")
    if recorded_in is None:
        trust_named(arch, persist=remember)
    tag(model, SOURCE_ATTR, ModelSource("arch", arch, kwargs))
    return model


def _shown_kwargs(kwargs: dict) -> str:
    try:
        shown = json.dumps(kwargs, default=repr)
    except (RecursionError, ValueError):  # nested past what json writes, or a circular value: not shown
        return "{...}"
    return shown if len(shown) <= 200 else shown[:200] + "..."


@dataclass(frozen=True)
class TensorBudget:
    """What a file holds: its tensors and their bytes. A model built from the file's own description may
    register about as much, never arbitrarily more."""

    tensors: int
    nbytes: int
    where: str

    @classmethod
    def of(cls, state: dict, where: str) -> "TensorBudget":
        storages = {}
        for value in state.values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[(storage.data_ptr(), storage.device.type)] = storage.nbytes()
        return cls(len(state), sum(storages.values()), where)

    def allows(self, tensors: int, nbytes: int) -> bool:
        # Slack for what a state_dict leaves out (non-persistent buffers, tied weights saved once).
        return tensors <= 2 * self.tensors + 64 and nbytes <= 2 * self.nbytes + 2**26


class _OverBudget(Exception):
    pass


def probe_bounded(make: Callable[[], Any], holds: TensorBudget, label: str) -> bool:
    """Run ``make()`` on the meta device while counting the parameters and buffers modules register, and
    stop at the first one past ``holds``: neither memory nor time grows with a number read from a file.
    False when ``make`` cannot build on meta (some factories compute on their tensors)."""
    try:
        with _counting(holds), torch.device("meta"):
            make()
    except _OverBudget as exc:
        raise _too_much(label, holds, exc) from None
    except Exception:
        return False
    return True


def call_bounded(make: Callable[[], Any], holds: TensorBudget | None, label: str) -> Any:
    """``make()`` (a factory call), probed first under ``holds`` (``probe_bounded``), then built for real,
    still counted. Errors are one line naming ``label``."""
    if holds is not None:
        probe_bounded(make, holds, label)
    try:
        with _counting(holds) if holds is not None else contextlib.nullcontext():
            return make()
    except _OverBudget as exc:
        raise _too_much(label, holds, exc) from None
    except Exception as exc:  # the factory rejected its arguments (TypeError, ValueError, ...)
        raise LoadError(f"{label} failed: {first_line(exc)}") from None


def _too_much(label: str, holds: TensorBudget, exc: _OverBudget) -> LoadError:
    return LoadError(f"{label} would hold {exc}, far more than {holds.where} holds ({holds.tensors} tensors, "
                     f"{holds.nbytes:,} bytes); it was not built")


@contextlib.contextmanager
def _counting(holds: TensorBudget) -> Iterator[None]:
    """Count the parameters and buffers modules register meanwhile (torch's global registration hooks)."""
    from torch.nn.modules import module as module_hooks

    seen: set[int] = set()
    total = 0

    def count(_module, _name, tensor):
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
            if not holds.allows(len(seen), total):
                raise _OverBudget(f"more than {len(seen)} tensors of {total:,} bytes")
        return None

    handles = [module_hooks.register_module_parameter_registration_hook(count),
               module_hooks.register_module_buffer_registration_hook(count)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def parse_arch_kwargs(text: str | None) -> dict:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--arch-kwargs is not valid JSON ({exc.msg} at column {exc.colno}): {text[:80]!r}") from None
    except RecursionError:
        raise ConfigError("--arch-kwargs nests too deeply to read; a factory's arguments need a few levels at most") from None
    if not isinstance(value, dict):
        raise ConfigError(f"--arch-kwargs must be a JSON object like '{{\"depth\": 110}}', got {text!r}")
    return value


def check_regular(path: Path) -> None:
    # A FIFO or a device (/dev/zero) would block or never end.
    kind = not_regular(path)
    if kind:
        raise LoadError(f"{path} is {kind}, not a checkpoint file")


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise LoadError(f"{path} is not a readable safetensors file ({exc})") from None


def _zip_members(path: Path) -> list[zipfile.ZipInfo]:
    """The members of a zip file; none for anything else, or a zip damaged in any way zipfile can fail."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.infolist()
    except Exception:  # BadZipFile, NotImplementedError (an odd version), struct.error, ...: torch.load says more
        return []


def torch_load(path: Path, trust_pickle: bool) -> Any:
    members = _zip_members(path)
    if any(m.filename.endswith("constants.pkl") for m in members):
        raise LoadError(
            f"{path} is a TorchScript archive, which has no Python module to rewrite; load the model "
            "in Python, save model.state_dict(), and pass that file with --arch package.module:factory"
        )
    # torch.save stores members uncompressed, so the work of reading a checkpoint grows with its size; a
    # compressed member (a 41 kB file inflating to a 40 MiB pickle) is something torch never wrote.
    packed = next((m for m in members if m.compress_type != zipfile.ZIP_STORED), None)
    if packed is not None:
        raise LoadError(f"{path} holds a compressed member ({packed.filename!r}), which torch.save never writes; "
                        "it was not read. Save the checkpoint again with torch.save")
    try:
        # memory-mapped (a zip, as torch.save writes since 1.6): a tensor's pages are read when used, and a copy is
        # made only of what is written to
        return torch.load(path, map_location="cpu", weights_only=True, mmap=bool(members))
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
            f"{TRUST_PICKLE} if you trust its source, or save model.state_dict() and use --arch package.module:factory"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise LoadError(
            f"{path}: unpickling failed ({first_line(exc)}); the code that defined the model must be importable"
        ) from None


TRUST_PICKLE = "Pass --trust-pickle (trust_pickle: true in a batch config)"  # Python callers read trust_pickle=True


def is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    )


def state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if is_state_dict(obj):
        return obj
    if isinstance(obj, dict):
        for key in _STATE_DICT_KEYS:
            if is_state_dict(obj.get(key)):
                return obj[key]
    raise LoadError(
        f"{path} holds a {type(obj).__name__}, not a model or a state_dict "
        f"(looked for tensors at the top level and under {', '.join(_STATE_DICT_KEYS)})"
    )


def take_dtypes(model: nn.Module, state: dict) -> None:
    """Give each floating parameter and buffer of a freshly built ``model`` the dtype its stored tensor in
    ``state`` has (a bf16 checkpoint stays bf16: built from a config, a model is float32). The tensors stay the
    same objects, so weights tied by sharing one parameter stay tied."""
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            stored = state.get(name)
            if (isinstance(stored, torch.Tensor) and stored.is_floating_point() and tensor.is_floating_point()
                    and stored.dtype != tensor.dtype):
                tensor.data = tensor.data.to(stored.dtype)


def load_state_strictly(model: nn.Module, state: dict, path: Path, what: str,
                  hint: str = "check --arch and --arch-kwargs", *, assign: bool = False) -> None:
    """Load ``state`` into ``model``, every key and shape matching. ``assign``: the model takes ``state``'s tensors
    themselves (no copy: a model built empty holds the weights once; memory-mapped ones stay mapped), their
    dtypes too, and weights the model ties (one parameter under several names) stay one parameter."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        example = (missing or unexpected)[0]
        raise LoadError(
            f"the weights in {path} do not fit {what}: {len(missing)} missing and {len(unexpected)} unexpected "
            f"keys (e.g. {example!r}); {hint}"
        )
    if not assign:
        take_dtypes(model, state)
    tied = _tied(model) if assign else []
    try:
        model.load_state_dict(state, strict=True, assign=assign)
    except RuntimeError as exc:
        detail = next((l.strip() for l in str(exc).splitlines() if "size mismatch" in l), first_line(exc))
        raise LoadError(f"the weights in {path} do not fit {what}: {detail}") from None
    for first, others in tied:  # assign put a parameter per name: the tied names share the first one's again
        parameter = model.get_parameter(first)
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, parameter)


def _tied(model: nn.Module) -> list[tuple[str, list[str]]]:
    """Each parameter that several names reach: its first name and the others."""
    names: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(parameter), []).append(name)
    return [(found[0], found[1:]) for found in names.values() if len(found) > 1]


def fit_state(model: nn.Module, state: dict, path: Path, what: str,
              hint: str = "check --arch and --arch-kwargs") -> None:
    """Load ``state`` into ``model`` strictly (see load_state_strictly).

    A state_dict saved from DataParallel/DDP (every key ``module.``-prefixed, none fitting as it is) is
    unwrapped first: the one place that rule lives.
    """
    expected = set(model.state_dict())
    if not set(state) & expected and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    load_state_strictly(model, state, path, what, hint)


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict a weights file holds; reads no pickled code.

    A state_dict (``.pt``/``.pth``, also nested), ``.safetensors``, or an sdsurgeon file's state_dict.
    """
    path = Path(path)
    if not path.exists():
        raise LoadError(f"--weights {path}: no such file", where=str(path), option="--weights")
    check_regular(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = torch_load(path, trust_pickle=False)
    if is_sdsurgeon_file(obj) and "state_dict" in obj:
        obj = obj["state_dict"]
    elif is_sdsurgeon_file(obj):
        raise LoadError(f"--weights {path} holds a pickled model, not weights; save model.state_dict() instead",
                        where=str(path), option="--weights")
    return state_dict_of(obj, path)


def holds_weights_only(path: str | os.PathLike) -> bool:
    """Whether a model file is weights alone (a state_dict, safetensors), not a model that weights could go into.

    Reads the file without unpickling code; a file that cannot be read that way is not weights alone
    (loading it says what it is).
    """
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return False
    if path.suffix == ".safetensors":
        return True
    try:
        obj = torch_load(path, trust_pickle=False)
    except LoadError:  # a pickled model, TorchScript, damaged: not weights alone
        return False
    return not is_sdsurgeon_file(obj) and not isinstance(obj, nn.Module) and (
        is_state_dict(obj) or any(is_state_dict(obj.get(k)) for k in _STATE_DICT_KEYS if isinstance(obj, dict)))


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a weights file into ``model`` (strictly) and return it; reads no pickled code.

    Accepts a state_dict (``.pt``/``.pth``, also nested or ``module.``-prefixed), ``.safetensors``, or
    an sdsurgeon file. An injected model has its original's keys, so either one's weights fit.
    """
    path = Path(path)
    fit_state(model, read_weights(path), path, "the model", "give the state_dict saved from this model or its original")
    return model


FORMAT = "sdsurgeon"


def is_sdsurgeon_file(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("format"), str) and obj["format"] == FORMAT


CALIBRATION_FORMS = "a tensor (one positional input), a tuple of tensors, or a dict of tensors named as the forward's arguments"


def read_calibration(path: str | os.PathLike) -> torch.Tensor | tuple | dict:
    """Calibration inputs saved with ``torch.save``: a tensor, a tuple/list of tensors, or a dict of named tensors
    (``.safetensors``: named tensors). Reads no pickled code."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"--calibration {path}: no such file", where=str(path), option="--calibration")
    check_regular(path)
    obj = read_safetensors(path) if path.suffix == ".safetensors" else torch_load(path, trust_pickle=False)
    if isinstance(obj, list):
        obj = tuple(obj)
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, tuple) else (obj,)
    if not values or not all(isinstance(v, torch.Tensor) for v in values) or (
            isinstance(obj, dict) and not all(isinstance(k, str) and k.isidentifier() for k in obj)):
        raise LoadError(f"--calibration {path} holds {type(obj).__name__}, not inputs; save {CALIBRATION_FORMS}",
                        where=str(path), option="--calibration")
    return obj
