"""Training-loop callbacks that step an injected model's gates through its schedule (transformers' Trainer, Lightning)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .analysis.schedule import ScheduleSpec
from .errors import ConfigError
from .schedules import Schedule
from .surgery.recipe import RECIPE_ATTR


class _Follower:
    """What each trainer's callback does: make the Schedule when training starts (of ``model``, else of the model
    the trainer hands over), and seek it to the trainer's global step (optimizer steps)."""

    def __init__(self, model: nn.Module | None, spec: ScheduleSpec | None) -> None:
        self.given, self.spec, self.schedule = model, spec, None

    def start(self, trained: nn.Module, step: int) -> None:
        self.schedule = Schedule(trained if self.given is None else self.given, self.spec)
        self.schedule.seek(step)


def schedule_callback(model: nn.Module | None = None, spec: ScheduleSpec | None = None) -> Any:
    """A ``transformers.TrainerCallback`` that sets every gate's p_l for the Trainer's optimizer step.

    ``Trainer(model=injected, ..., callbacks=[schedule_callback()])``: the schedule is the one ``spec`` gives,
    else the one the model's recipe records (``inject --schedule``), else fixed. ``model`` defaults to the
    Trainer's own. The position is the Trainer's ``global_step`` (optimizer steps, so gradient accumulation
    and ``resume_from_checkpoint`` land on the right p_l without state of their own), and each log entry gains
    ``sd_expected_depth`` (the sum of p_l). transformers is imported here, not by ``import sdsurgeon``.
    """
    try:
        from transformers import TrainerCallback
    except ImportError:
        raise ConfigError("schedule_callback is for transformers' Trainer, and transformers is not installed") from None

    class ScheduleCallback(_Follower, TrainerCallback):
        """Steps the gates' p_l with the Trainer's global step (sdsurgeon.callbacks.schedule_callback)."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.start(model, state.global_step)

        def on_step_begin(self, args, state, control, **kwargs):
            self.schedule.seek(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or self.schedule is None:
                return
            depth = round(self.schedule.expected_depth(), 4)
            logs["sd_expected_depth"] = depth  # for the reporters called after this callback
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1]["sd_expected_depth"] = depth  # the Trainer copied logs there first

    return ScheduleCallback(model, spec)


def lightning_callback(model: nn.Module | None = None, spec: ScheduleSpec | None = None) -> Any:
    """A Lightning ``Callback`` that sets every gate's p_l for the Trainer's optimizer step.

    ``lightning.Trainer(callbacks=[lightning_callback()])``: as ``schedule_callback``, from the Trainer's
    ``global_step``; ``model`` defaults to the injected model the LightningModule holds (itself, or the one
    submodule that carries an sdsurgeon recipe). Each training batch logs ``sd_expected_depth``.
    ``lightning`` (or the older ``pytorch_lightning``) is imported here, not by ``import sdsurgeon``.
    """
    try:
        from lightning.pytorch import Callback
    except ImportError:
        try:
            from pytorch_lightning import Callback
        except ImportError:
            raise ConfigError("lightning_callback is for Lightning's Trainer, and lightning is not installed") from None

    class ScheduleCallback(_Follower, Callback):
        """Steps the gates' p_l with Lightning's global step (sdsurgeon.callbacks.lightning_callback)."""

        def on_train_start(self, trainer, pl_module):
            self.start(injected_in(pl_module) if self.given is None else self.given, trainer.global_step)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.schedule.seek(trainer.global_step)
            pl_module.log("sd_expected_depth", self.schedule.expected_depth(), on_step=True, on_epoch=False)

    return ScheduleCallback(model, spec)


def injected_in(module: nn.Module) -> nn.Module:
    """The one module under ``module`` (itself included) that an sdsurgeon inject returned (it has a recipe)."""
    found = [m for m in module.modules() if hasattr(m, RECIPE_ATTR)]
    if len(found) != 1:
        raise ConfigError(f"{type(module).__name__} holds {len(found)} injected models; pass the one to schedule "
                          "as lightning_callback(model=...)")
    return found[0]


__all__ = ["lightning_callback", "schedule_callback"]
