"""Dotted attribute paths on a module (fx's ``get_attr`` and ``call_module`` targets): the one resolver."""

from __future__ import annotations

from typing import Any


def resolve(root: Any, target: str) -> Any:
    """``root.a.b.c`` for ``target`` ``"a.b.c"``: a submodule, parameter, buffer or plain attribute.

    ``getattr`` at each step, not ``nn.Module.get_submodule``: a graph's ``get_attr`` may name a tensor
    or constant that is no module, and a pass asks the same question of the user's module and of a view.
    """
    obj = root
    for atom in target.split("."):
        obj = getattr(obj, atom)
    return obj


def resolves(root: Any, target: str) -> bool:
    """Whether ``resolve(root, target)`` finds something."""
    try:
        resolve(root, target)
        return True
    except AttributeError:
        return False
