"""What a run tells the outside: per-rank log files, the console, the trackers, ``status.json``.

Only the main process prints, shows a progress bar, writes the run-level scalars (to the
trackers of ``logging.trackers``: :mod:`dist_ft.train.trackers`) and ``status.json``; every
rank logs to ``logs/rank{r}.log`` (and, with ``logging.per_rank``, to ``tb/rank{r}/``).
Paths come from :class:`dist_ft.rundir.RunDir`.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import time
from collections.abc import Mapping
from typing import Any

from dist_ft import console
from dist_ft.rundir import RunDir
from dist_ft.train.metrics import score_text
from dist_ft.train.monitor import TAGS
from dist_ft.train.progress import Progress
from dist_ft.train.trackers import RunTrackers

log = logging.getLogger("dist_ft.train")


def node_count(env: Mapping[str, str], world: int) -> int:
    """The nodes this run's processes span: Slurm's step (or job) node count under ``srun``,
    torchrun's node count (``GROUP_WORLD_SIZE``, what ``accelerate launch --num_machines``
    starts), else 1 (one machine: submitit's local executor, a plain launch)."""
    if env.get("SUBMITIT_EXECUTOR") != "local":
        for key in ("SLURM_STEP_NUM_NODES", "GROUP_WORLD_SIZE", "SLURM_JOB_NUM_NODES",
                    "SLURM_NNODES"):
            if (env.get(key) or "").isdigit() and int(env[key]) > 0:
                return min(int(env[key]), max(1, world))
    return 1


def slurm_job_id(env: Mapping[str, str]) -> str | None:
    """This Slurm job's id as ``dist-ft jobs`` lists it (``ARRAYJOB_TASK`` in an array), or
    None outside Slurm."""
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def setup_logging(run: RunDir, rank: int, main: bool) -> None:
    """Send ``dist_ft`` logs to ``logs/rank{r}.log`` (every rank: INFO, DEBUG with ``-v``) and
    stderr (main only, at the console's level: warnings only with ``-q``).

    The level comes from :func:`dist_ft.console.verbosity` (``DIST_FT_VERBOSITY``, which
    ``dist-ft -v/-q`` sets and launched workers inherit). While the progress bar is open, the
    stderr handler writes through ``tqdm.write`` (:func:`dist_ft.console.progress`).
    """
    run.logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("dist_ft")
    shown = console.dist_ft_level()
    root.setLevel(min(logging.INFO, shown))  # the log file keeps INFO even with -q
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    file_handler = logging.FileHandler(run.rank_log(rank))
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(file_handler)
    if main:
        screen = logging.StreamHandler(sys.stderr)
        screen.setLevel(shown)
        screen.setFormatter(console.ConsoleFormatter())
        screen.addFilter(lambda record: not getattr(record, "file_only", False))
        root.addHandler(screen)
    root.propagate = False
    # Python warnings (torch's deprecation notes...) also go to the rank's log file; on the
    # console only the main process shows them: N ranks would print each one N times.
    warned = logging.getLogger("py.warnings")
    for handler in [h for h in warned.handlers if getattr(h, "dist_ft_rank_log", False)]:
        warned.removeHandler(handler)
        handler.close()
    rank_file = logging.FileHandler(run.rank_log(rank))
    rank_file.dist_ft_rank_log = True  # type: ignore[attr-defined]
    rank_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    rank_file.addFilter(console.WarningsOnce())
    warned.addHandler(rank_file)
    if not main:
        console.console_errors_only()


class Reporter:
    """TensorBoard writers, the progress bar and ``status.json`` of one rank.

    Args:
        run: the run folder.
        run_id: the run's identity (in ``status.json`` and TensorBoard's text).
        rank, world: this process and the number of processes.
        main: whether this is the main process.
        per_rank: also write this rank's own scalars under ``tb/rank{r}/``.
    """

    def __init__(self, run: RunDir, run_id: str, rank: int, world: int, main: bool,
                 per_rank: bool) -> None:
        self.run, self.run_id = run, run_id
        self.rank, self.world, self.main, self.per_rank = rank, world, main, per_rank
        self.writer: Any = None
        self.rank_writer: Any = None
        self.bar: Any = None
        self.total_steps: int | None = None
        self.status_extra: dict[str, Any] = {}  # kept in every later status.json
        self.segment_extra: dict[str, Any] = {}  # added to this segment's start record
        self.segment: int | None = None  # this segment's number once recorded (main)

    def open(self, progress: Progress, total_steps: int, texts: dict[str, str],
             purge_step: int | None, trackers: RunTrackers | None = None) -> None:
        """Open the writers (hiding steps after ``purge_step``) and the progress bar.

        ``trackers`` (the main process's, started): where the run-level scalars and texts go
        (``tb/``, MLflow, W&B, per ``logging.trackers``).
        """
        from torch.utils.tensorboard import SummaryWriter

        self.total_steps = total_steps
        if self.main:
            assert trackers is not None, "the main process writes the run-level scalars"
            self._start_segment(progress, purge_step)
            self.writer = trackers
            for tag, text in texts.items():
                self.writer.add_text(tag, text, progress.step)
        if self.per_rank:
            self.rank_writer = SummaryWriter(str(self.run.rank_tb(self.rank)),
                                             purge_step=purge_step)
        # A bar on a terminal (log lines pass through tqdm.write, never glued to it); in a
        # log file or pipe, a line per 10 % or per minute (dist_ft.console.progress).
        self.bar = console.progress(total=total_steps, initial=progress.step, desc="train",
                                    unit="step", enabled=self.main, dynamic_ncols=True)

    def _start_segment(self, progress: Progress, purge_step: int | None) -> None:
        """Append this start's record to ``segments.jsonl`` (main process; advisory)."""
        try:
            earlier = [s.get("segment") for s in self.run.read_segments(self.run_id)]
            self.segment = 1 + max((n for n in earlier if isinstance(n, int)), default=0)
            nodes = node_count(os.environ, self.world)
            self.run.append_segment({
                "event": "start", "run_id": self.run_id, "segment": self.segment,
                "start_step": progress.step, "resumed": bool(purge_step),
                "world_size": self.world, "nodes": nodes,
                "processes_per_node": max(1, self.world // nodes),
                "job_id": slurm_job_id(os.environ),
                "restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                "host": socket.gethostname(), "time": time.time(), **self.segment_extra})
        except (OSError, ValueError) as exc:
            log.warning("cannot record the segment in %s: %s", self.run.segments, exc)

    def _end_segment(self, state: str, progress: Progress) -> None:
        """Append this segment's end (state and step) to ``segments.jsonl`` (advisory)."""
        try:
            self.run.append_segment({"event": "end", "run_id": self.run_id,
                                     "segment": self.segment, "state": state,
                                     "step": progress.step, "time": time.time()})
        except OSError as exc:
            log.warning("cannot record the segment's end in %s: %s", self.run.segments, exc)

    def status(self, state: str, progress: Progress, **extra: Any) -> None:
        """``status.json`` (main process): state, step, total, run id, time; atomic.

        Advisory: a failure to write it is logged and never masks the run's own error.
        """
        if not self.main:
            return
        status = {"state": state, "run_id": self.run_id, "step": progress.step,
                  "total_steps": self.total_steps, "epoch": progress.epoch,
                  "stage": progress.stage, "time": time.time(),
                  "job_id": os.environ.get("SLURM_JOB_ID"), **self.status_extra, **extra}
        try:
            self.run.write_status(status)
        except OSError as exc:
            log.warning("cannot write %s: %s", self.run.status, exc)
        if state != "running" and self.segment is not None:
            self._end_segment(state, progress)

    def step(self, progress: Progress, rank_loss: float, mean_loss: float, rate: float,
             lrs: dict[str, float], grad_norm: float | None) -> None:
        """One logging window: loss, speed, stage, every group's lr, the gradient norm."""
        step = progress.step
        if self.rank_writer is not None:  # this rank's own view, before the reduction
            self.rank_writer.add_scalar("rank/loss", rank_loss, step)
            self.rank_writer.add_scalar("rank/samples_per_s", rate / self.world, step)
        if not self.main:
            return
        self.status("running", progress)
        if math.isfinite(mean_loss):  # else a skipped step (trainer.nonfinite_loss=skip)
            self.writer.add_scalar("train/loss", mean_loss, step)
        self.writer.add_scalar("train/samples_per_s", rate, step)
        self.writer.add_scalar("train/stage", progress.stage, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)
        if grad_norm is not None and math.isfinite(grad_norm):
            self.writer.add_scalar("train/grad_norm", grad_norm, step)
        self.writer.commit()  # this window's scalars to MLflow / W&B in one call
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{max(lrs.values()):.2e}",
                             img_s=f"{rate:.0f}", stage=progress.stage)

    def skipped(self, progress: Progress, step: int) -> None:
        """The running count of steps dropped for a non-finite loss, at the dropped ``step``."""
        if self.writer is not None:
            self.writer.add_scalar("train/skipped_steps", progress.skipped_steps, step)

    def evaluation(self, progress: Progress, metrics: dict[str, Any], gap: float | None) -> None:
        """Validation loss, scores and per-class AUROC of one evaluation."""
        if not self.main:
            return
        step = progress.step
        if gap is not None:
            self.writer.add_scalar("val/gap", gap, step)
        # Tags are the names trainer.monitor takes (dist_ft.train.monitor.TAGS).
        for tag, key in TAGS.items():
            if key in metrics:
                self.writer.add_scalar(tag, metrics[key], step)
        for cls, value in metrics.get("auroc", {}).items():
            if math.isfinite(value):
                self.writer.add_scalar(f"val_auroc/{cls}", value, step)
        self.writer.flush()
        log.info("epoch %d step %d: val loss %.4f, %s", progress.epoch, step,
                 metrics["val_loss"], score_text(metrics))

    def flush(self) -> None:
        """Flush TensorBoard (before a stop)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Close the bar and the writers."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        for writer in (self.writer, self.rank_writer):
            if writer is not None:
                writer.close()
        self.writer = self.rank_writer = None
