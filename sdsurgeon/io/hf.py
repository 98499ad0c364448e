"""Hugging Face transformers folders: a save_pretrained folder in, a model out (never trust_remote_code)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

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
        raise LoadError("reading a Hugging Face folder needs transformers: pip install 'sdsurgeon[hf]'") from None
    return transformers


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers reports config oddities and loading progress on its own logger; keep the CLI clean."""
    logging = _transformers().utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        logging.enable_progress_bar()


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
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise LoadError(f"{path / 'config.json'} is not readable JSON ({exc})") from None
    if not isinstance(config, dict):
        raise LoadError(f"{path / 'config.json'} is not a JSON object")
    names = config.get("architectures")
    cls = model_class(names[0] if isinstance(names, list) and names and isinstance(names[0], str) else None)
    if cls is transformers.AutoModel and config.get("auto_map"):
        raise UnsafeLoadError(
            f"{path / 'config.json'} maps its model to Python code in the folder (auto_map); sdsurgeon never runs "
            "a folder's own code (transformers' trust_remote_code stays off). Save the model with a transformers "
            "class, or its state_dict and use --arch package.module:factory"
        )
    with quiet():
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


def build(name: str, config: dict) -> nn.Module:
    """A fresh model of transformers class ``name`` from a recorded config (random weights)."""
    from ..io.source import SOURCE_ATTR, ModelSource, tag

    cls = model_class(name)
    with quiet():
        try:  # eager attention, as load_folder chooses it (the config carries the choice)
            config = {k: v for k, v in config.items() if k != RECIPE_KEY}
            model = cls(cls.config_class.from_dict(dict(config, _attn_implementation="eager")))
        except Exception as exc:  # a config this transformers version cannot read
            raise LoadError(f"cannot rebuild {name} from its recorded config ({first_line(exc)})") from None
    tag(model, SOURCE_ATTR, ModelSource("hf", name, dict(config)))
    return model


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


def is_hf(model: nn.Module) -> bool:
    config = getattr(model, "config", None)
    return config is not None and hasattr(config, "to_dict") and hasattr(model, "main_input_name")


