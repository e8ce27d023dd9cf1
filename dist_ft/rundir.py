"""The run folder: the one owner of its layout, its status file and its identity.

A run folder (``output_dir``) holds::

    recipe.yaml        the resolved recipe (absolute paths)
    plan.json          the resolved freeze plan
    status.json        running | stopped | finished | failed, step, run id (atomic)
    .lock              held by a running trainer (see dist_ft.runlock)
    tb/                TensorBoard event files (tb/rank{r}/ with logging.per_rank)
    trackers/          MLflow's mlflow.db, W&B's offline runs, runs.json (logging.trackers)
    logs/              rank{r}.log, bad_images.rank{r}.jsonl
    checkpoints/       step_00000120/ ... (exactly ``step_<digits>``; anything else is ignored)
    stage_weights/     with trainer.save_stage_weights
    final/             model.safetensors (the last weights) + metrics.json
    best/              model.safetensors (the selected weights) + metrics.json
    evaluations.jsonl  one line per dist-ft eval of these weights (time, split, sha256)
    segments.jsonl     one line per start or resume of the run (world size, nodes, job id)
                       and one per end (state, step): append-only

Nothing else in dist-ft spells these names. Pure Python: no torch import.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

CHECKPOINT_NAME = re.compile(r"step_(\d+)")
PARTIAL_SUFFIX = ".partial"
COMPLETE = "COMPLETE"  # written last into a finished checkpoint
TRAINER_STATE = "trainer_state.json"
WEIGHTS = "model.safetensors"
METRICS = "metrics.json"


def new_run_id() -> str:
    """A fresh run id: UTC start time plus random hex, e.g. ``20261129-154900-3f9a1c``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def write_json_atomic(path: str | Path, data: Any, text: str | None = None) -> None:
    """Write ``data`` as JSON (or ``text`` as is) to ``path`` through a temp file + rename.

    A reader never sees a half-written file; a crash leaves the previous version. NaN and
    infinities become null (:func:`dist_ft.jsonio.dumps`).
    """
    from dist_ft.jsonio import dumps

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    body = text if text is not None else dumps(data)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: str | Path) -> Any:
    """The JSON document in ``path``, or None if it is missing or not valid JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class RunDir:
    """Paths and files of one run folder.

    Args:
        root: the run folder (``output_dir``); ``~`` is expanded and the path made absolute.
    """

    # What a run writes at its top level: any of them present means the folder holds a run.
    RUN_ENTRIES = ("recipe.yaml", "plan.json", "status.json", "tb", "trackers", "logs",
                   "checkpoints", "stage_weights", "final", "best", "segments.jsonl")

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().absolute()

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------ layout
    @property
    def recipe(self) -> Path:
        """``recipe.yaml``: the resolved recipe."""
        return self.root / "recipe.yaml"

    @property
    def plan(self) -> Path:
        """``plan.json``: the resolved plan."""
        return self.root / "plan.json"

    @property
    def status(self) -> Path:
        """``status.json``."""
        return self.root / "status.json"

    @property
    def lock(self) -> Path:
        """``.lock``: present while a trainer runs here."""
        return self.root / ".lock"

    @property
    def trackers(self) -> Path:
        """``trackers/``: MLflow's and W&B's offline stores (``logging.trackers``)."""
        return self.root / "trackers"

    @property
    def tb(self) -> Path:
        """``tb/``: TensorBoard event files."""
        return self.root / "tb"

    def rank_tb(self, rank: int) -> Path:
        """``tb/rank{r}/``: one rank's own scalars."""
        return self.tb / f"rank{rank}"

    @property
    def logs(self) -> Path:
        """``logs/``."""
        return self.root / "logs"

    def rank_log(self, rank: int) -> Path:
        """``logs/rank{r}.log``."""
        return self.logs / f"rank{rank}.log"

    def bad_images(self, rank: int) -> Path:
        """``logs/bad_images.rank{r}.jsonl``: images skipped under data.on_bad_image=skip."""
        return self.logs / f"bad_images.rank{rank}.jsonl"

    @property
    def checkpoints(self) -> Path:
        """``checkpoints/``."""
        return self.root / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        """``checkpoints/step_{step:08d}``."""
        return self.checkpoints / f"step_{step:08d}"

    def partial(self, step: int) -> Path:
        """Where the checkpoint of ``step`` is written before it is complete."""
        return self.checkpoints / f"step_{step:08d}{PARTIAL_SUFFIX}"

    @property
    def stage_weights(self) -> Path:
        """``stage_weights/``."""
        return self.root / "stage_weights"

    @property
    def final(self) -> Path:
        """``final/``: the last weights of a finished run (not selected: see ``best``)."""
        return self.root / "final"

    @property
    def best(self) -> Path:
        """``best/``: the weights of the best value of ``trainer.monitor`` (model selection),
        outside the ``keep_last`` checkpoint rotation."""
        return self.root / "best"

    @property
    def evaluations(self) -> Path:
        """``evaluations.jsonl``: one line per ``dist-ft eval`` of this run's weights."""
        return self.root / "evaluations.jsonl"

    @property
    def segments(self) -> Path:
        """``segments.jsonl``: one line per start or resume of the run, one per its end."""
        return self.root / "segments.jsonl"

    @property
    def final_weights(self) -> Path:
        """``final/model.safetensors``."""
        return self.final / WEIGHTS

    @property
    def final_metrics(self) -> Path:
        """``final/metrics.json``."""
        return self.final / METRICS

    @property
    def best_weights(self) -> Path:
        """``best/model.safetensors``: the weights of the best monitored evaluation."""
        return self.best / WEIGHTS

    @property
    def best_metrics(self) -> Path:
        """``best/metrics.json``: that evaluation's metrics, epoch, step and monitor."""
        return self.best / METRICS

    # ------------------------------------------------------------------ contents
    def existing_entries(self) -> list[Path]:
        """The run files and folders present (what a fresh start would mix with)."""
        return [self.root / name for name in self.RUN_ENTRIES if (self.root / name).exists()]

    def holds_run(self) -> bool:
        """Whether anything a run writes is already here."""
        return bool(self.existing_entries())

    def read_status(self) -> dict[str, Any] | None:
        """``status.json`` as a dict, or None (missing or unreadable)."""
        status = read_json(self.status)
        return status if isinstance(status, dict) else None

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace ``status.json`` atomically (NaN and infinities become null)."""
        write_json_atomic(self.status, status)

    def run_id(self) -> str | None:
        """The id of the run recorded here (``status.json``), or None."""
        status = self.read_status() or {}
        value = status.get("run_id")
        return value if isinstance(value, str) else None

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def checkpoint_step(path: str | Path) -> int | None:
        """The step of a folder named exactly ``step_<digits>``; None for any other name."""
        match = CHECKPOINT_NAME.fullmatch(Path(path).name)
        return int(match.group(1)) if match else None

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints (``step_<digits>`` with a ``COMPLETE`` marker), oldest first.

        Folders of any other name (``step_4.bak``, ``step_4_best``, ``*.partial``) are
        neither counted nor pruned.
        """
        if not self.checkpoints.is_dir():
            return []
        found = [(step, p) for p in self.checkpoints.iterdir()
                 if (step := self.checkpoint_step(p)) is not None and p.is_dir()
                 and (p / COMPLETE).is_file()]
        return [p for _, p in sorted(found)]

    def latest_checkpoint(self) -> Path | None:
        """The newest finished checkpoint, or None."""
        found = self.complete_checkpoints()
        return found[-1] if found else None

    @staticmethod
    def checkpoint_run_id(path: str | Path) -> str | None:
        """The run id a checkpoint was written by (None for unreadable or older ones)."""
        state = read_json(Path(path) / TRAINER_STATE)
        return state.get("run_id") if isinstance(state, dict) else None

    # ------------------------------------------------------------------ segments
    def append_segment(self, record: dict[str, Any]) -> None:
        """Append one record to ``segments.jsonl`` in a single append-mode write (fsynced).

        A line that an earlier crash left without its newline is closed first, so the torn
        line spoils only itself, never the record written after it.
        """
        from dist_ft.jsonio import dumps

        line = dumps(record, indent=None) + "\n"
        with open(self.segments, "a+b") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    line = "\n" + line
            fh.write(line.encode("utf-8"))  # append mode: always at the end
            fh.flush()
            os.fsync(fh.fileno())

    def segment_records(self) -> list[dict[str, Any]]:
        """Every readable record of ``segments.jsonl``, in order (torn or damaged lines
        skipped; an empty list when the file is missing)."""
        from dist_ft.jsonio import read_jsonl

        return [r for r in read_jsonl(self.segments) if r.get("event") in ("start", "end")]

    def read_segments(self, run_id: str | None = None) -> list[dict[str, Any]]:
        """The segments (starts and resumes) of one run, oldest first.

        Each is its start record (``segment``, ``start_step``, ``world_size``, ``nodes``,
        ``processes_per_node``, ``job_id``, ``restart``, ``host``, ``started``) with
        ``end_state``, ``end_step`` and ``ended`` from its end record, or None where the
        segment has not ended or ended without one (killed).

        Args:
            run_id: whose segments; default the run recorded in ``status.json`` (all records
                when there is none).
        """
        run_id = run_id or self.run_id()
        records = [r for r in self.segment_records()
                   if run_id is None or r.get("run_id") == run_id]
        ends = {(r.get("run_id"), r.get("segment")): r for r in records if r["event"] == "end"}
        segments = []
        for start in (r for r in records if r["event"] == "start"):
            end = ends.get((start.get("run_id"), start.get("segment")), {})
            segment = {k: v for k, v in start.items() if k not in ("event", "time")}
            segment.update(started=start.get("time"), end_state=end.get("state"),
                           end_step=end.get("step"), ended=end.get("time"))
            segments.append(segment)
        return segments
