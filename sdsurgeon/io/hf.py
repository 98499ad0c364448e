"""Hugging Face transformers folders: a save_pretrained folder in, a model out (never trust_remote_code)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..errors import LoadError, UnsafeLoadError, first_line
from ..io.trust import REMOTE_CODE, transformers_class


def is_folder(path: str | Path) -> bool:
    """A folder written by ``save_pretrained``: it holds a config.json."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file()


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LoadError("reading a Hugging Face folder needs transformers: pip install 'transformers>=5'") from None
    return transformers


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Around every call into transformers: its logger kept quiet (the CLI stays clean), and no way for it to
    ask on stdin whether to run a folder's code (it does for an ``auto_map`` it meets while
    ``trust_remote_code`` is unset, as in a composite config's sub-configs): its prompt is switched off and
    stdin reads as closed, so such a question can only end in its refusal."""
    transformers = _transformers()
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    dynamic = getattr(transformers, "dynamic_module_utils", None)
    timeout = getattr(dynamic, "TIME_OUT_REMOTE_CODE", None)
    stdin = sys.stdin
    try:
        if timeout is not None:
            dynamic.TIME_OUT_REMOTE_CODE = 0
        sys.stdin = io.StringIO()
        yield
    finally:
        sys.stdin = stdin
        if timeout is not None:
            dynamic.TIME_OUT_REMOTE_CODE = timeout
        logging.set_verbosity(level)
        logging.enable_progress_bar()


MAX_CONFIG_DEPTH = 64  # a real config nests a few levels (text_config.rope_scaling...); deeper is refused unread


def check_config(config: Any, where: str) -> None:
    """Refuse a config that maps anything to a folder's own code (``auto_map`` at any depth: a composite
    model's ``vision_config`` may carry one) or nests deeper than any model needs; iterative, so no
    nesting makes it recurse."""
    stack = [(config, 0)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_CONFIG_DEPTH:
            raise LoadError(f"{where} nests more than {MAX_CONFIG_DEPTH} levels deep, which no model config needs; "
                            "it was not read")
        if isinstance(value, dict):
            if "auto_map" in value:
                raise UnsafeLoadError(
                    f"{where} maps its model to Python code in the folder (auto_map); sdsurgeon never runs a "
                    "folder's own code (transformers' trust_remote_code stays off). Save the model with a "
                    "transformers class, or its state_dict and use --arch package.module:factory")
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def read_config(path: Path) -> dict:
    """A folder's config.json as a dict, checked (``check_config``) before transformers sees it."""
    where = str(path / "config.json")
    try:
        config = json.loads((path / "config.json").read_text())
    except RecursionError:
        raise LoadError(f"{where} nests too deeply to read, which no model config needs") from None
    except (OSError, ValueError) as exc:
        raise LoadError(f"{where} is not readable JSON ({first_line(exc)})") from None
    if not isinstance(config, dict):
        raise LoadError(f"{where} is not a JSON object")
    check_config(config, where)
    return config


def model_class(name: str | None):
    """The transformers class ``name`` (from ``config.architectures``); AutoModel when unknown."""
    transformers = _transformers()
    return transformers_class(transformers, name) or transformers.AutoModel


def load_folder(path: str | Path) -> nn.Module:
    """Load a ``save_pretrained`` folder with local files only: nothing is downloaded.

    The class comes from ``config.architectures`` (AutoModel if it names none or an unknown one).
    Attention runs the eager implementation: its graphs export to ONNX for every architecture
    (torch 2.13 cannot decompose SDPA inside Swin's windows).
    """
    from ..io.source import SOURCE_ATTR, ModelSource, tag

    path = Path(path)
    transformers = _transformers()
    config = read_config(path)
    names = config.get("architectures")
    cls = model_class(names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None)
    with quiet():
        _probe_folder(transformers, cls, path)
        try:
            model = cls.from_pretrained(path, local_files_only=True, attn_implementation="eager",
                                        trust_remote_code=REMOTE_CODE)
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for a bad folder
            raise LoadError(f"{path}: transformers could not load it ({first_line(exc)})") from None
    if cls is transformers.AutoModel:
        cls = type(model)
    config = {k: v for k, v in model.config.to_dict().items() if k != RECIPE_KEY}  # the architecture alone
    tag(model, SOURCE_ATTR, ModelSource("hf", cls.__name__, config))
    return model


def _probe_folder(transformers, cls, path: Path) -> None:
    """Build the folder's model on the meta device first, counted against the weights the folder holds:
    transformers would fill what the weights lack with fresh tensors, so a config.json asking for 10,000
    layers beside a 1 kB weights file would otherwise be built in full."""
    from ..io.checkpoint import TensorBudget, probe_bounded

    files = [f for f in path.iterdir() if f.is_file() and f.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    tensors = 0
    for f in files:
        if f.suffix != ".safetensors":
            tensors += f.stat().st_size // 4  # unknown without unpickling: as many as the bytes allow
            continue
        with contextlib.suppress(Exception):  # an unreadable header: from_pretrained says what is wrong
            from safetensors import safe_open

            with safe_open(str(f), "pt") as opened:
                tensors += len(list(opened.keys()))
    holds = TensorBudget(tensors, sum(f.stat().st_size for f in files), f"{path}'s weights")
    try:
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=REMOTE_CODE)
    except Exception:  # from_pretrained below says what is wrong with it
        return
    if cls is transformers.AutoModel:
        probe_bounded(lambda: transformers.AutoModel.from_config(config), holds, f"{path}'s config.json")
    else:
        probe_bounded(lambda: cls(config), holds, f"{path}'s config.json")


def build(name: str, config: dict, *, holds=None, recorded_in=None, empty: bool = False) -> nn.Module:
    """A fresh model of transformers class ``name`` from a recorded config (random weights).

    ``recorded_in``/``holds``: the file the config was read from and the tensors it holds; the config is
    checked as a folder's is, and may not make the model register more tensors than that. ``empty``: the
    parameters are on the meta device (they take no memory), for a caller that assigns every one of them
    (``load_state_strictly(..., assign=True)``); the buffers are built as the ordinary build makes them, its
    ``_init_weights`` included (a non-persistent buffer may get its value there, as transformers' own meta-device
    loading relies on), since a state_dict does not carry them.
    """
    from ..io.checkpoint import call_bounded
    from ..io.source import SOURCE_ATTR, ModelSource, tag

    if recorded_in is not None:
        check_config(config, f"the transformers config recorded in {recorded_in}")
    cls = model_class(name)
    config = {k: v for k, v in config.items() if k != RECIPE_KEY}
    with quiet():  # eager attention, as load_folder chooses it (the config carries the choice)
        try:
            # As a keyword: transformers 5.25 ignores a private `_attn_implementation` key in the dict.
            made = cls.config_class.from_dict(config, attn_implementation="eager")
        except Exception as exc:  # a config this transformers version cannot read
            raise LoadError(f"cannot rebuild {name} from its recorded config ({first_line(exc)})") from None
        with _parameters_on_meta() if empty else contextlib.nullcontext():
            model = call_bounded(lambda: cls(made), holds, f"{name} from its recorded config")
    tag(model, SOURCE_ATTR, ModelSource("hf", name, dict(config)))
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter a module registers meanwhile goes to the meta device as it is registered (torch's global
    registration hook), so the initialisation that follows writes nothing and no weight takes memory; buffers stay
    real. A parameter created on the CPU first is freed unwritten (an untouched allocation takes no memory). This is
    transformers' own way (``from_pretrained`` builds on meta, then loads) less its buffers, which are built for
    real here because nothing loads them afterwards."""
    from torch.nn.modules import module as module_hooks

    def to_meta(_module, _name, param):
        if type(param) is nn.Parameter and param.device.type != "meta":  # already meta: a tied weight, kept one
            return nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        return None

    handle = module_hooks.register_module_parameter_registration_hook(to_meta)
    try:
        yield
    finally:
        handle.remove()


# config.json key holding the recipe of an injected model, so its save_pretrained folder loads back gated.
RECIPE_KEY = "sdsurgeon"


def carry_recipe(model: nn.Module, recipe: dict | None) -> None:
    """Put ``recipe`` (a Recipe's dict) in a transformers model's config, where ``save_pretrained`` writes it
    to config.json; None takes it out (a folded model is the plain architecture again)."""
    if not is_hf(model):
        return
    if recipe is None:
        model.config.__dict__.pop(RECIPE_KEY, None)
    else:
        setattr(model.config, RECIPE_KEY, recipe)


@functools.cache
def base_config_keys() -> frozenset[str]:
    """The keys every transformers config has (its base class's: ``architectures``, ``dtype``, ...), which say
    nothing about one architecture's layers."""
    transformers = _transformers()
    base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
    with quiet():
        return frozenset(base().to_dict())


def is_hf(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict") and hasattr(model, "main_input_name")


