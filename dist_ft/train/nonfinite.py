"""The non-finite loss policy: every rank decides alike whether a step's update happens.

Each micro-batch's "loss is finite" flag stays on the device until the step's last forward
(one sync per step); then the step's one small all-reduce (:mod:`dist_ft.train.step_flags`)
tells every rank which ranks saw NaN/inf.
``trainer.nonfinite_loss=stop`` then stops every rank before the update; ``skip`` drops the
update on every rank, until ``trainer.nonfinite_max_in_row`` steps in a row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from dist_ft.config.schema import TrainerConfig
from dist_ft.train.progress import Progress

log = logging.getLogger("dist_ft.train")


class NonFiniteLoss(RuntimeError):
    """The policy says stop; the message names the step, the ranks and the last checkpoint."""


class NonFinitePolicy:
    """Watches the losses of one optimizer step and applies ``trainer.nonfinite_loss``.

    Args:
        cfg: the recipe's trainer section.
    """

    def __init__(self, cfg: TrainerConfig) -> None:
        self.cfg = cfg
        self.window_finite: torch.Tensor | None = None  # all losses of this step finite

    def observe(self, loss: torch.Tensor) -> torch.Tensor:
        """Record one micro-batch's loss; returns whether it is finite (a 0-d device tensor)."""
        finite = torch.isfinite(loss.detach())
        self.window_finite = finite if self.window_finite is None \
            else self.window_finite & finite
        return finite

    def take_window(self) -> bool:
        """Whether any loss of this step was not finite (this rank); starts the next step."""
        finite = self.window_finite is None or bool(self.window_finite)  # one sync per step
        self.window_finite = None
        return not finite

    def skip_step(self, progress: Progress, ranks: list[int],
                  last_checkpoint: Callable[[], object]) -> bool:
        """At a step boundary: True to drop this step's update.

        Args:
            progress: the run's counters (skips are counted there).
            ranks: the ranks whose loss was not finite in this step (every rank's view).
            last_checkpoint: called (for the message) only when a loss was not finite.

        Raises:
            NonFiniteLoss: the policy says stop (``stop``, or too many skips in a row).
        """
        p, cfg = progress, self.cfg
        if not ranks:
            p.nonfinite_in_row = 0
            return False
        step = p.step + 1
        latest = last_checkpoint()
        kept = f"last complete checkpoint: {latest}" if latest else "no checkpoint yet"
        if cfg.nonfinite_loss == "stop":
            raise NonFiniteLoss(
                f"non-finite loss at step {step} on rank(s) {ranks}: stopped before the update "
                f"({kept}); lower optim.lr, check the data, or set trainer.nonfinite_loss=skip")
        p.skipped_steps += 1
        p.nonfinite_in_row += 1
        if p.nonfinite_in_row >= cfg.nonfinite_max_in_row:
            raise NonFiniteLoss(
                f"non-finite loss in {p.nonfinite_in_row} steps in a row (steps "
                f"{step - p.nonfinite_in_row + 1}-{step}, trainer.nonfinite_max_in_row="
                f"{cfg.nonfinite_max_in_row}): stopped ({kept})")
        log.warning("step %d: non-finite loss on rank(s) %s; update skipped on every rank "
                    "(%d skipped in all)", step, ranks, p.skipped_steps)
        return True
