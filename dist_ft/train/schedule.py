"""Learning-rate schedules as one multiplier on every group's planned lr.

Each group keeps the lr the plan gave it; the schedule multiplies all of them by the same
factor, so discriminative and layer-decay ratios hold throughout. Applied by writing
``group["lr"]`` before each optimizer step, which works for torch optimizers and DeepSpeed's
wrapped ones alike, and survives optimizer rebuilds at stage boundaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dist_ft.config.schema import ScheduleConfig


@dataclass
class LrSchedule:
    """Warmup, then constant / cosine / step decay / reduce-on-plateau.

    Attributes:
        cfg: the ``schedule`` section.
        total_steps: optimizer steps in the whole run (cosine's horizon).
        steps_per_epoch: optimizer steps per epoch (step decay's unit).
        plateau_scale: the factor reduce-on-plateau has reached (checkpointed).
        bad_epochs: evaluations without a gain since the last gain or reduction.
        cooldown_left: evaluations still ignored after the last reduction.
        history: the monitored values seen.
    """

    cfg: ScheduleConfig
    total_steps: int
    steps_per_epoch: int
    plateau_scale: float = 1.0
    bad_epochs: int = 0
    cooldown_left: int = 0
    history: list[float] = field(default_factory=list)

    def factor(self, step: int) -> float:
        """The multiplier at optimizer step ``step`` (0-based)."""
        cfg = self.cfg
        warm = 1.0 if step >= cfg.warmup_steps else (step + 1) / (cfg.warmup_steps + 1)
        if cfg.name == "cosine":
            span = max(1, self.total_steps - cfg.warmup_steps)
            t = min(1.0, max(0, step - cfg.warmup_steps) / span)
            decay = cfg.min_lr_scale + (1 - cfg.min_lr_scale) * 0.5 * (1 + math.cos(math.pi * t))
        elif cfg.name == "step":
            decay = cfg.gamma ** (step // max(1, self.steps_per_epoch * cfg.step_epochs))
        elif cfg.name == "plateau":
            decay = self.plateau_scale
        else:
            decay = 1.0
        return warm * decay

    def observe(self, value: float, gain: bool) -> bool:
        """Feed one evaluation of the monitored metric and whether it was a gain (the
        monitor's judgement, :mod:`dist_ft.train.monitor`); True when lr was reduced.

        As torch's ``ReduceLROnPlateau``: more than ``plateau_patience`` evaluations without a
        gain reduce lr by ``gamma`` (not below ``min_lr_scale``); ``plateau_cooldown``
        evaluations after a reduction are not counted.
        """
        self.history.append(value)
        if gain:
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_epochs = 0
        if self.cfg.name == "plateau" and self.bad_epochs > self.cfg.plateau_patience:
            before = self.plateau_scale
            self.plateau_scale = max(self.plateau_scale * self.cfg.gamma, self.cfg.min_lr_scale)
            self.bad_epochs, self.cooldown_left = 0, self.cfg.plateau_cooldown
            return self.plateau_scale < before  # at min_lr_scale nothing changes
        return False

    def state_dict(self) -> dict:
        """Checkpointable state."""
        return {"plateau_scale": self.plateau_scale, "bad_epochs": self.bad_epochs,
                "cooldown_left": self.cooldown_left, "history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        self.plateau_scale, self.bad_epochs = state["plateau_scale"], state["bad_epochs"]
        self.cooldown_left = state.get("cooldown_left", 0)
        self.history = list(state["history"])
