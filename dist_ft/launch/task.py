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
from dist_ft.console import configure_logging


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
        configure_logging()  # the level `dist-ft submit` was given (DIST_FT_VERBOSITY)
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
    """A picklable callable: aggregate a sweep's run folders once its array has finished."""

    runs: tuple[str, ...]
    out: str
    group_by: tuple[str, ...]

    def __call__(self) -> dict[str, Any]:
        """Run the aggregation; returns where it wrote and what it found."""
        from dist_ft.logs.events import find_event_dirs
        from dist_ft.logs.report import aggregate_runs

        forbid_world_writable()
        # A task that failed before logging has no event files: aggregate the others.
        logged = [r for r in self.runs if os.path.isdir(r) and find_event_dirs(r)]
        # With TensorBoard files: `dist-ft jobs` points the user at OUT/tb to compare the tasks.
        doc = aggregate_runs(logged or list(self.runs), self.out, self.group_by, align="union",
                             tensorboard=True)
        problems = [*doc["problems"], *(f"{r}: no event files (the task logged nothing)"
                                        for r in self.runs if r not in logged)]
        return {**{k: doc[k] for k in ("out", "group_by", "members", "rows")},
                "problems": problems}
