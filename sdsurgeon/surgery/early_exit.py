"""LayerSkip's early-exit loss on an injected causal LM: the pure loss and curricula, and the hooks that add it in training."""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..analysis.exits import find_final_norm, find_head, first_tensor
from ..analysis.layers import find_layers
from ..choices import EXIT_CURRICULA, EXIT_SCALES
from ..errors import EarlyExitError, LayerError

EARLY_EXIT_ATTR = "sdsurgeon_early_exit"  # the EarlyExit state on the model's root (a plain attribute, no weights)


# --- pure: weights, curricula, the loss ---------------------------------------------------------------------------

def loss_scales(layer_ids: Sequence[int], n_layers: int, scale_type: str = "sum_l", e_scale: float = 1.0) -> list[float]:
    """The weight of each layer's loss, for ``layer_ids`` in ascending order (the last layer's, L - 1, is the task
    loss): torchtune's ``early_exit_loss`` scale functions (torchtune/modules/early_exit_loss.py: one, l, sum_l, inv_l,
    sqrt_l, inv_sqrt_l), s_l = f(l) * (e_scale if l < L - 1 else 1), normalised to sum to 1. f(l) is 1, l + 1, the
    running sum of (l + 1) over ``layer_ids`` in order (torch.cumsum, as there), 1 / (l + 1), sqrt(l + 1) and
    1 / sqrt(l + 1)."""
    if scale_type not in EXIT_SCALES:
        raise EarlyExitError(f"unknown exit scale type {scale_type!r}; use one of: {', '.join(EXIT_SCALES)}")
    running, raw = 0.0, []
    for l in layer_ids:
        running += l + 1
        f = {"one": 1.0, "l": l + 1.0, "sum_l": running, "inv_l": 1.0 / (l + 1), "sqrt_l": math.sqrt(l + 1),
             "inv_sqrt_l": 1.0 / math.sqrt(l + 1)}[scale_type]
        raw.append(f * (e_scale if l < n_layers - 1 else 1.0))
    total = sum(raw)
    return [s / total for s in raw]


def active_exits(exits: Sequence[int], n_layers: int, step: int, curriculum: str = "none", *, rotation: int = 2,
                 ramp: int = 0) -> list[int]:
    """The exits of ``exits`` (layer indices, 0-based, of ``n_layers``) whose loss counts at training ``step``.

    none: all. rotational (LayerSkip's C_rot,R): l with l % R == step % R. gradual (torchtune's
    GradualEarlyExitCurriculum with fraction_scale * max_steps = ``ramp``): l once step >= ramp (L - l) / L, so exits
    switch on from the last layer towards the first and all are on from ``ramp``. torchtune evaluates that rule one
    step late (its counter is read before it is advanced); here ``step`` is the optimizer step the model trains at.
    """
    if curriculum not in EXIT_CURRICULA:
        raise EarlyExitError(f"unknown exit curriculum {curriculum!r}; use one of: {', '.join(EXIT_CURRICULA)}")
    if curriculum == "rotational":
        return [l for l in exits if l % rotation == step % rotation]
    if curriculum == "gradual":
        return [l for l in exits if step >= ramp * (n_layers - l) / n_layers]
    return list(exits)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """A causal LM's loss: position t predicts label t + 1, mean over the labels that are not ``ignore_index``."""
    logits = logits[..., :-1, :].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1), ignore_index=ignore_index)


def combined_loss(task_loss: torch.Tensor, exit_losses: Mapping[int, torch.Tensor], n_layers: int,
                  scale_type: str = "sum_l", e_scale: float = 1.0) -> torch.Tensor:
    """LayerSkip's training loss: sum over the active exits and the last layer of s_l * loss_l (``loss_scales``), the
    last layer's loss being the model's own task loss. With no exit active it is the task loss."""
    ids = sorted(exit_losses) + [n_layers - 1]
    losses = [exit_losses[l] for l in ids[:-1]] + [task_loss]
    return sum(s * loss for s, loss in zip(loss_scales(ids, n_layers, scale_type, e_scale), losses))


# --- finding the parts (by rule: analysis.exits) and recording them ---------------------------------------------------------------

def resolve(model: nn.Module, settings: Mapping[str, Any], examples) -> dict:
    """The recipe's record of the early exit of ``model`` (gated already): ``settings`` (layers, scale, scale_type,
    curriculum, rotation, ramp) with the parts found by rule: the layer list (``find_layers``), the LM head
    (``get_output_embeddings``) and the final norm: on one eval forward on ``examples``, the module whose input is
    the last layer's output and whose output is what the head reads ("" where the head reads the last layer's output
    itself). Raises EarlyExitError where a part is missing or an exit layer is out of range."""
    where = type(model).__name__
    head = find_head(model)
    try:
        layers = find_layers(model)
    except LayerError as exc:
        raise EarlyExitError(f"--early-exit needs the model's layer list: {exc}", what="no layer list",
                             where=where, option="--early-exit") from None
    n = layers.count
    exits = sorted(set(settings.get("layers") or range(n - 1)))
    wrong = [l for l in exits if l >= n - 1]
    if wrong:
        raise EarlyExitError(f"--exit-layer {wrong[0]}: {where} has {n} layers (0 to {n - 1}) and the last one's loss "
                             f"is the task loss; exits are layers 0 to {n - 2}", what="exit layer out of range",
                             where=where, option="--exit-layer")
    if not exits:
        raise EarlyExitError(f"{where} has one layer: no layer before the last to exit from", where=where,
                             option="--early-exit")
    norm = find_final_norm(model, layers.path, head, examples)
    return {"layers": exits, "n_layers": n, "layer_list": layers.path, "head": head, "norm": norm,
            "scale": float(settings.get("scale", 1.0)), "scale_type": settings.get("scale_type", "sum_l"),
            "curriculum": settings.get("curriculum", "none"), "rotation": int(settings.get("rotation", 2)),
            "ramp": int(settings.get("ramp", 0))}


_PATH = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*|[0-9]+)(\.([A-Za-z_][A-Za-z0-9_]*|[0-9]+))*$")


def check_record(d: Any) -> None:
    """Refuse a recorded early exit (a recipe read from a file: data from anywhere) that is not ``resolve``'s shape:
    EarlyExitError names what is wrong."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise EarlyExitError(f"its early exit record {what}")

    def count(v: Any, least: int) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= least

    need(isinstance(d, dict), "is not a mapping")
    keys = {"layers", "n_layers", "layer_list", "head", "norm", "scale", "scale_type", "curriculum", "rotation", "ramp"}
    need(set(d) == keys, f"has keys {sorted(map(str, d))}, not {sorted(keys)}")
    need(count(d["n_layers"], 2), "has no layer count of 2 or more")
    need(isinstance(d["layers"], list) and bool(d["layers"]) and all(count(l, 0) and l < d["n_layers"] - 1
                                                                     for l in d["layers"]),
         "has exit layers that are not layers before the last")
    for key in ("layer_list", "head"):
        need(isinstance(d[key], str) and bool(_PATH.match(d[key])), f"has a {key} that is not a module path")
    need(isinstance(d["norm"], str) and (d["norm"] == "" or bool(_PATH.match(d["norm"]))),
         "has a norm that is not a module path")
    need(isinstance(d["scale"], (int, float)) and not isinstance(d["scale"], bool) and math.isfinite(d["scale"])
         and d["scale"] > 0, "has a scale that is not a number above zero")
    need(d["scale_type"] in EXIT_SCALES, "has an unknown scale type")
    need(d["curriculum"] in EXIT_CURRICULA, "has an unknown curriculum")
    need(count(d["rotation"], 1) and count(d["ramp"], 0), "has a rotation below 1 or a negative ramp")


# --- the thin wiring: hooks that survive deepcopy and pickling ---------------------------------------------------

class EarlyExit:
    """The early exit's settings (the recipe's record), the curriculum's step and, during one training forward, the
    exits' hidden states. Plain data: no module is held, so copies and pickles of the model stay one model."""

    def __init__(self, record: Mapping[str, Any]) -> None:
        self.record = dict(record)
        self.step = 0
        self._armed: list[int] | None = None
        self._captured: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {"record": self.record, "step": self.step}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["record"])
        self.step = state["step"]

    def active(self, step: int | None = None) -> list[int]:
        """The exits whose loss counts at ``step`` (default: the current one)."""
        r = self.record
        return active_exits(r["layers"], r["n_layers"], self.step if step is None else step, r["curriculum"],
                            rotation=r["rotation"], ramp=r["ramp"])


class _Arm:
    """Forward pre-hook of the root: a training forward with labels arms the exits the curriculum has on."""

    def __init__(self, state: EarlyExit) -> None:
        self.state = state

    def __call__(self, module, args, kwargs):
        labels = kwargs.get("labels")
        self.state._captured = {}
        self.state._armed = (self.state.active() or None) if module.training and labels is not None else None


class _Keep:
    """Forward hook of an exit layer: keeps its output hidden state while armed."""

    def __init__(self, state: EarlyExit, layer: int) -> None:
        self.state, self.layer = state, layer

    def __call__(self, module, args, output):
        if self.state._armed and self.layer in self.state._armed:
            self.state._captured[self.layer] = first_tensor(output)


class _AddLoss:
    """Forward hook of the root: the returned loss becomes ``combined_loss`` of the task loss and the exits'."""

    def __init__(self, state: EarlyExit) -> None:
        self.state = state

    def __call__(self, module, args, kwargs, output):
        state, r = self.state, self.state.record
        captured, armed = state._captured, state._armed
        state._captured, state._armed = {}, None
        if not armed:
            return None
        as_tuple = not hasattr(output, "keys")
        task = output[0] if as_tuple else output.get("loss")
        if not isinstance(task, torch.Tensor) or set(captured) != set(armed):
            return None  # the model computed no loss of its own, or a layer did not run: the plain result
        head = module.get_submodule(r["head"])
        norm = module.get_submodule(r["norm"]) if r["norm"] else nn.Identity()
        labels = kwargs["labels"]
        own = getattr(module, "loss_function", None)
        extra = {k: kwargs[k] for k in ("num_items_in_batch",) if kwargs.get(k) is not None}
        losses = {}
        for l, h in captured.items():
            logits = head(norm(h))
            losses[l] = (own(logits=logits, labels=labels, vocab_size=logits.shape[-1], **extra) if callable(own)
                         else shifted_cross_entropy(logits, labels))
        loss = combined_loss(task, losses, r["n_layers"], r["scale_type"], r["scale"])
        if as_tuple:
            return (loss, *output[1:])
        output["loss"] = loss
        return output


def install(model: nn.Module, record: Mapping[str, Any]) -> EarlyExit:
    """Put the early exit ``record`` (``resolve``'s) on ``model``: a state attribute and three kinds of hooks, kept by
    ``copy.deepcopy`` and pickling like any module attribute; ``save_pretrained`` writes weights only."""
    if hasattr(model, EARLY_EXIT_ATTR):
        raise EarlyExitError(f"{type(model).__name__} already has an early exit")
    state = EarlyExit(record)
    layers = model.get_submodule(record["layer_list"])
    model.register_forward_pre_hook(_Arm(state), with_kwargs=True)
    for l in record["layers"]:
        layers[l].register_forward_hook(_Keep(state, l))
    model.register_forward_hook(_AddLoss(state), with_kwargs=True)
    setattr(model, EARLY_EXIT_ATTR, state)
    return state


def uninstall(model: nn.Module) -> None:
    """Take the early exit off ``model`` (a folded model is for inference: no exit loss, whatever its labels)."""
    if early_exit_of(model) is None:
        return
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key in [k for k, hook in hooks.items() if isinstance(hook, (_Arm, _Keep, _AddLoss))]:
                del hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_pre_hooks_with_kwargs.pop(key, None)
    delattr(model, EARLY_EXIT_ATTR)


def early_exit_of(model: nn.Module) -> EarlyExit | None:
    """The model's early-exit state (inject --early-exit), or None."""
    state = getattr(model, EARLY_EXIT_ATTR, None)
    return state if isinstance(state, EarlyExit) else None


__all__ = ["EarlyExit", "active_exits", "check_record", "combined_loss", "early_exit_of", "find_final_norm", "install", "loss_scales",
           "resolve", "shifted_cross_entropy", "uninstall"]
