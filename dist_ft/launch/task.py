"""What every submitted task runs: one rank of one training run, resumable.

The submitted object carries the fully resolved recipe as plain data, so a requeued job
trains exactly what was submitted even if the YAML file has changed since. Under Slurm each
task finds its rank in Slurm's variables (``dist_ft.cluster``); under submitit's
local executor, in submitit's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from dist_ft import exitcodes
from dist_ft.cluster import forbid_world_writable


@dataclass(frozen=True)
class TrainTask:
    """A picklable callable: train ``recipe`` on this task's rank, resuming if it can.

    Attributes:
        recipe: the resolved recipe (``recipe_to_dict`` output).
        name: the run's name (its directory name under a sweep).
    """

    recipe: dict[str, Any]
    name: str

    def __call__(self) -> dict[str, Any]:
        """Train; returns the final metrics. A stop on a signal exits with code 3 and no
        result, so submitit keeps waiting for the requeued job."""
        from dist_ft.config.load import validate_recipe
        from dist_ft.train.preemption import Preempted
        from dist_ft.train.trainer import run_training

        forbid_world_writable()
        if os.environ.get("SUBMITIT_EXECUTOR") == "local":
            from submitit.helpers import TorchDistributedEnvironment

            TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        recipe = validate_recipe(self.recipe, source=f"submitted run {self.name}")
        try:
            return run_training(recipe, resume="auto")
        except Preempted:
            # SystemExit passes through submitit's ``except Exception``: no result file is
            # written, and the requeued job (same id) writes it when it finishes.
            raise SystemExit(exitcodes.STOPPED) from None


@dataclass(frozen=True)
class AggregateTask:
    """A picklable callable: aggregate a sweep's logs once its array has finished."""

    root: str
    out: str
    group_by: tuple[str, ...]

    def __call__(self) -> dict[str, Any]:
        """Run the aggregation; returns where it wrote and what it found."""
        from dist_ft.logs.report import aggregate_runs

        forbid_world_writable()
        doc = aggregate_runs([self.root], self.out, self.group_by, align="union")
        return {k: doc[k] for k in ("out", "group_by", "members", "rows", "problems")}
