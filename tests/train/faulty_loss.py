"""``dist-ft`` whose training loss turns NaN at chosen steps on one rank: fault injection.

    accelerate launch --config_file launch/cpu_2proc.yaml tests/train/faulty_loss.py \
        train RECIPE ...            # with NAN_RANK=1 NAN_STEPS=3,6,7 in the environment

Only the loss is replaced (evaluation's is left alone); everything else is dist-ft as shipped.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch

from dist_ft.cli.main import main
from dist_ft.train import trainer

_build_loss = trainer.build_loss


class NaNAtSteps(torch.nn.Module):
    """The recipe's loss, times NaN on this rank's training calls listed in ``NAN_STEPS``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0
        self.active = int(os.environ.get("RANK", "0")) == int(os.environ["NAN_RANK"])
        self.steps = {int(s) for s in os.environ["NAN_STEPS"].split(",")}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss = self.inner(logits, target)
        if torch.is_grad_enabled():  # a training micro-batch (1 per step here)
            self.calls += 1
            if self.active and self.calls in self.steps:
                loss = loss * float("nan")
        return loss


def faulty_build_loss(*args: Any, **kwargs: Any) -> torch.nn.Module:
    return NaNAtSteps(_build_loss(*args, **kwargs))


if __name__ == "__main__":
    trainer.build_loss = faulty_build_loss
    sys.exit(main(sys.argv[1:]))
