"""``dist-ft jobs``: the state of a submission's tasks, read from what they left behind.

For each task: the scheduler's state (Slurm, through submitit), the run's own
``status.json`` (running / stopped / finished / failed, step of total), its final
metrics (``final/metrics.json``) and its segments (``segments.jsonl``: each start or resume
with its world size and nodes, e.g. a run preempted on 2 nodes and resubmitted on 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dist_ft.launch.submit import MANIFEST
from dist_ft.rundir import RunDir, read_json


def read_manifest(root: str | Path) -> dict[str, Any]:
    """``ROOT/submission.json``.

    Raises:
        FileNotFoundError: ROOT holds no submission (names the file looked for).
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; `dist-ft submit` writes it in the "
                                "run's output_dir (a sweep's folder)")
    return json.loads(path.read_text())


def _scheduler_states(manifest: dict[str, Any]) -> dict[str, str]:
    """Slurm's state of each task's job (``UNKNOWN`` where Slurm no longer knows it)."""
    if manifest["cluster"] != "slurm":
        return {}
    from submitit.slurm.slurm import SlurmJob

    states = {}
    for task in manifest["tasks"]:
        try:
            job = SlurmJob(folder=manifest["folder"], job_id=task["job_id"])
            states[task["job_id"]] = str(job.get_info(mode="force").get("State", "UNKNOWN"))
        except Exception:  # sacct missing or failing must not hide the runs' own state
            states[task["job_id"]] = "UNKNOWN"
    return states


def task_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: ids, states, progress, final metrics and segments (each start or
    resume of the run: start step, world size, nodes, Slurm job id, start time, end state)."""
    states = _scheduler_states(manifest)
    rows = []
    for task in manifest["tasks"]:
        run = RunDir(task["output_dir"])
        out = run.root
        status = run.read_status() or {}
        metrics = read_json(run.final_metrics)
        rows.append({
            "index": task["index"], "name": task["name"], "job_id": task["job_id"],
            "overrides": task["overrides"], "output_dir": str(out),
            "scheduler_state": states.get(task["job_id"]),
            "run_state": status.get("state", "not started"),
            "step": status.get("step"), "total_steps": status.get("total_steps"),
            "error": status.get("error"),
            "final_metrics": metrics,
            "segments": run.read_segments(status.get("run_id")),
        })
    return rows


def aggregation_status(manifest: dict[str, Any]) -> dict[str, Any] | None:
    """Where a sweep's aggregation goes, its job's state, and whether it has been written."""
    info = manifest.get("aggregate")
    if not info:
        return None
    state = None
    if info.get("job_id") and manifest["cluster"] == "slurm":
        state = _scheduler_states({**manifest, "tasks": [{"job_id": info["job_id"]}]}).get(
            info["job_id"])
    return {**info, "scheduler_state": state,
            "written": (Path(info["out"]) / "summary.json").is_file()}


def world_sizes(segments: list[dict[str, Any]]) -> str:
    """The world size of each segment, e.g. ``2→1`` for a run resumed on fewer processes
    (``-`` before the run has started)."""
    return "→".join(str(s.get("world_size", "?")) for s in segments) or "-"


def render_segments(rows: list[dict[str, Any]]) -> Any:
    """A rich table of every task's segments (shown when a run has more than one)."""
    import datetime

    from rich.table import Table

    table = Table(title="segments (each start or resume of a run)")
    for column in ("task", "#", "from step", "to step", "world", "nodes", "job", "started",
                   "end"):
        table.add_column(column, justify="right" if column in ("#", "from step", "to step",
                                                               "world", "nodes") else "left")
    for row in rows:
        for seg in row["segments"]:
            started = seg.get("started")
            table.add_row(
                row["name"], str(seg.get("segment", "?")), str(seg.get("start_step", "?")),
                "" if seg.get("end_step") is None else str(seg["end_step"]),
                str(seg.get("world_size", "?")), str(seg.get("nodes", "?")),
                seg.get("job_id") or "-",
                datetime.datetime.fromtimestamp(started).strftime("%Y-%m-%d %H:%M:%S")
                if isinstance(started, int | float) else "?",
                seg.get("end_state") or "-")
    return table


def render_table(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    """A rich table of ``rows``."""
    from rich.table import Table

    table = Table(title=f"{manifest['kind']} · job {manifest['job_id']} · {manifest['cluster']}")
    for column in ("task", "job", "slurm", "run", "step", "world", "score", "val loss",
                   "overrides"):
        table.add_column(column, justify="right" if column in ("step", "score", "val loss")
                         else "left")
    for row in rows:
        metrics = row["final_metrics"] or {}
        step = "" if row["step"] is None else f"{row['step']}/{row['total_steps']}"
        score = metrics.get("score")
        loss = metrics.get("val_loss")
        table.add_row(
            row["name"], row["job_id"], row["scheduler_state"] or "-", row["run_state"], step,
            world_sizes(row["segments"]),
            "" if score is None else f"{score:.4f}", "" if loss is None else f"{loss:.4f}",
            " ".join(row["overrides"]) or "-")
    return table
