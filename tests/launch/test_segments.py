"""A run's segments (each start or resume: world size, nodes, job) and what `dist-ft submit
--resume` and `dist-ft jobs` make of them. No training: the Slurm test does that end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ft.launch.jobs import task_rows, world_sizes
from dist_ft.rundir import RunDir
from dist_ft.train.progress import Progress
from dist_ft.train.reporting import Reporter, node_count, slurm_job_id
from dist_ft.train.trackers import RunTrackers
from tests.conftest import CONFIGS

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


def start(run_id: str, segment: int, step: int, world: int, nodes: int) -> dict:
    return {"event": "start", "run_id": run_id, "segment": segment, "start_step": step,
            "world_size": world, "nodes": nodes, "job_id": f"{100 + segment}", "time": 1.0}


def test_a_torn_line_spoils_only_itself(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.append_segment(start("r1", 1, 0, 2, 2))
    with open(run.segments, "a", encoding="utf-8") as fh:  # a crash mid-write: no newline
        fh.write('{"event": "end", "run_id": "r1", "segm')
    run.append_segment(start("r1", 2, 6, 1, 1))
    run.append_segment({"event": "end", "run_id": "r1", "segment": 2, "state": "finished",
                        "step": 12, "time": 2.0})
    lines = run.segments.read_text().splitlines()
    assert len(lines) == 4 and lines[1].endswith('"segm')  # the torn line stays on its own
    segments = run.read_segments("r1")
    assert [(s["segment"], s["start_step"], s["world_size"], s["nodes"]) for s in segments] == [
        (1, 0, 2, 2), (2, 6, 1, 1)]
    assert [(s["end_state"], s["end_step"]) for s in segments] == [(None, None),
                                                                   ("finished", 12)]
    assert segments[0]["started"] == 1.0 and "event" not in segments[0]


def test_segments_are_the_status_runs_and_none_without_a_file(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.read_segments() == []
    run.append_segment(start("old", 1, 0, 4, 4))
    run.append_segment(start("new", 1, 0, 2, 2))
    run.write_status({"state": "running", "run_id": "new"})
    assert [s["run_id"] for s in run.read_segments()] == ["new"]
    assert "segments.jsonl" in RunDir.RUN_ENTRIES  # --overwrite moves it aside with the run


@pytest.mark.parametrize(("env", "world", "nodes"), [
    ({}, 1, 1),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_NODES": "2", "SLURM_JOB_NUM_NODES": "4"}, 2, 2),
    ({"SLURM_JOB_ID": "7", "SLURM_NNODES": "3"}, 6, 3),
    ({"GROUP_WORLD_SIZE": "2", "WORLD_SIZE": "8"}, 8, 2),  # torchrun / accelerate launch
    ({"SUBMITIT_EXECUTOR": "local", "SLURM_JOB_NUM_NODES": "2"}, 2, 1),
    ({"SLURM_JOB_NUM_NODES": "4"}, 2, 2),  # never more nodes than processes
])
def test_node_count(env: dict[str, str], world: int, nodes: int) -> None:
    assert node_count(env, world) == nodes


def test_slurm_job_id_names_array_tasks_as_jobs_lists_them() -> None:
    assert slurm_job_id({}) is None
    assert slurm_job_id({"SLURM_JOB_ID": "41"}) == "41"
    assert slurm_job_id({"SLURM_JOB_ID": "43", "SLURM_ARRAY_JOB_ID": "41",
                         "SLURM_ARRAY_TASK_ID": "2"}) == "41_2"


def reporter_segment(run: RunDir, world: int, step: int, end: str) -> None:
    """One segment as the trainer's main process reports it: open, then a final status."""
    reporter = Reporter(run, "r1", 0, world, main=True, per_rank=False)
    trackers = RunTrackers(None, run, ["tensorboard"])
    trackers.start("r1", {}, step + 1 if step else None)
    progress = Progress(step=step)
    try:
        reporter.open(progress, 12, {}, step + 1 if step else None, trackers)
        progress.step = step + 3
        reporter.status(end, progress)
    finally:
        reporter.close()


def test_the_reporter_records_each_segment_and_its_end(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunDir(tmp_path)
    for key in ("SLURM_STEP_NUM_NODES", "GROUP_WORLD_SIZE", "SLURM_ARRAY_JOB_ID",
                "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "51")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    reporter_segment(run, 2, 0, "stopped")
    monkeypatch.setenv("SLURM_JOB_ID", "52")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    reporter_segment(run, 1, 3, "finished")
    segments = run.read_segments("r1")
    assert [(s["segment"], s["start_step"], s["world_size"], s["nodes"], s["job_id"],
             s["resumed"], s["end_state"], s["end_step"]) for s in segments] == [
        (1, 0, 2, 2, "51", False, "stopped", 3), (2, 3, 1, 1, "52", True, "finished", 6)]


def test_jobs_rows_carry_the_segments(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    run.write_status({"state": "finished", "run_id": "r1", "step": 12, "total_steps": 12})
    run.append_segment(start("r1", 1, 0, 2, 2))
    run.append_segment(start("r1", 2, 6, 1, 1))
    manifest = {"cluster": "local", "tasks": [{"index": 0, "name": "run", "job_id": "9",
                                               "overrides": [], "output_dir": str(run.root)}]}
    (row,) = task_rows(manifest)
    assert [s["world_size"] for s in row["segments"]] == [2, 1]
    assert world_sizes(row["segments"]) == "2→1" and world_sizes([]) == "-"


def test_resume_auto_on_other_nodes_says_what_it_continues(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    run = RunDir(out)
    out.mkdir()
    run.write_status({"state": "stopped", "run_id": "r1", "step": 6, "total_steps": 12})
    run.append_segment(start("r1", 1, 0, 2, 2))
    base = ["submit", str(SMOKE), f"output_dir={out}", "--nodes", "1", "--gpus-per-node", "0",
            "--dry-run", "--json"]
    held = run_cli(*base, "--resume", "auto", "data.global_batch_size=8")
    assert held.code == 0, held.err
    (note,) = json.loads(held.out)["notes"]
    assert note.startswith(f"--resume: {out} holds run r1 (stopped at step 6/12); the job "
                           "continues it at step 0 (no complete checkpoint yet) on 1 node(s) "
                           "x 1 = world size 1; it ran last on 2 node(s), world size 2")
    assert "data.global_batch_size=8 keeps the global batch" in note
    # Per-process batches on another world size: the job's resume would refuse the global
    # batch it changes, so the submission does, naming the fix; nothing is queued.
    per_process = run_cli(*base, "--resume", "data.batch_size=4")  # --resume then an override
    assert per_process.code == 2, per_process.err
    assert "data.batch_size=4 per process made 8 images per step and would make 4: add " \
        "data.global_batch_size=8" in per_process.err
    assert not (out / "submission.json").exists()
    before = run_cli("submit", "--resume", str(SMOKE), f"output_dir={out}", "--nodes", "1",
                     "--gpus-per-node", "0", "--dry-run", "--json", "data.global_batch_size=8")
    assert before.code == 0, before.err  # --resume before the recipe, as with store_true
