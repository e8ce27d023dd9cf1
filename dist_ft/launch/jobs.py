"""``dist-ft jobs``: the state of a submission's tasks, read from what they left behind.

For each task: the scheduler's state (Slurm, through submitit), the run's own
``status.json`` (running / stopped / finished / failed, step of total), and its final
metrics (``final/metrics.json``).
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
    """One row per task: ids, states, progress and final metrics."""
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


def render_table(manifest: dict[str, Any], rows: list[dict[str, Any]]) -> Any:
    """A rich table of ``rows``."""
    from rich.table import Table

    table = Table(title=f"{manifest['kind']} · job {manifest['job_id']} · {manifest['cluster']}")
    for column in ("task", "job", "slurm", "run", "step", "score", "val loss", "overrides"):
        table.add_column(column, justify="right" if column in ("step", "score", "val loss")
                         else "left")
    for row in rows:
        metrics = row["final_metrics"] or {}
        step = "" if row["step"] is None else f"{row['step']}/{row['total_steps']}"
        score = metrics.get("score")
        loss = metrics.get("val_loss")
        table.add_row(
            row["name"], row["job_id"], row["scheduler_state"] or "-", row["run_state"], step,
            "" if score is None else f"{score:.4f}", "" if loss is None else f"{loss:.4f}",
            " ".join(row["overrides"]) or "-")
    return table
