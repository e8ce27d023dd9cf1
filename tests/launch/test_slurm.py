"""``dist-ft submit`` / ``jobs`` against the project's real single-machine Slurm cluster.

Nothing is mocked: sbatch, srun, scontrol and submitit run for real; two slurmd "nodes"
(127.0.0.2, 127.0.0.3) share this machine, so 2 nodes x 1 process train over gloo.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import CONFIGS, REPO
from tests.launch.conftest import dist_ft, read_status, small_run, wait_until

pytestmark = pytest.mark.slurm

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


def tb_steps(tb: Path, tag: str) -> list[int]:
    """Steps of a scalar as TensorBoard shows them (purges of requeued segments applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


def test_two_nodes_train_to_completion_and_metrics_come_back(
        slurm_cluster: dict[str, str], launch_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = dist_ft(["submit", str(SMOKE), "--nodes", "2", "--gpus-per-node", "0", "--wait",
                      "--json", *small_run(launch_data, out, 12)], slurm_cluster)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(result.stdout)
    (outcome,) = manifest["outcomes"]
    assert outcome["ok"], outcome
    metrics = outcome["result"]
    assert metrics["step"] == 12 and metrics["val_samples"] > 0
    assert 0.0 <= metrics["auroc_mean"] <= 1.0
    assert json.loads((out / "final" / "metrics.json").read_text())["step"] == 12
    assert (out / "final" / "model.safetensors").is_file()
    # One task per node, each with its own rank, on both nodes of the allocation.
    job = manifest["job_id"]
    logs = [(out / "submitit" / f"{job}_{t}_log.out").read_text() for t in (0, 1)]
    assert "node=0(2), global_rank=0(2)" in logs[0] and "node=1(2), global_rank=1(2)" in logs[1]
    assert "rank 1/2" in (out / "logs" / "rank1.log").read_text()
    assert ", DeepSpeed ZeRO-2, " in (out / "logs" / "rank0.log").read_text()
    listed = json.loads(dist_ft(["jobs", str(out), "--json"], slurm_cluster).stdout)
    assert listed["tasks"][0]["scheduler_state"] == "COMPLETED"
    assert listed["tasks"][0]["run_state"] == "finished"


def test_a_sweep_is_one_array_and_jobs_lists_every_result(
        slurm_cluster: dict[str, str], launch_data: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    # A hostile run name: it only ever becomes a sanitised directory name.
    sweep.write_text(
        "grid:\n  optim.lr: [1.0e-3, 2.0e-3, 3.0e-3]\n"
        f"runs:\n  - {{name: \"a b'; touch {tmp_path}/PWNED; $(touch {tmp_path}/PWNED2)\"}}\n"
        "parallelism: 2\n")
    root = tmp_path / "sweep"
    result = dist_ft(["submit", str(SMOKE), "--sweep", str(sweep), "--wait",
                      *small_run(launch_data, root, 4, "trainer.backend=ddp")], slurm_cluster)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    listed = dist_ft(["jobs", str(root), "--json"], slurm_cluster)
    assert listed.returncode == 0, listed.stderr
    tasks = json.loads(listed.stdout)["tasks"]
    assert [t["overrides"] for t in tasks] == [[f"optim.lr={lr}"] for lr in
                                               ("0.001", "0.002", "0.003")]
    assert len({t["job_id"].split("_")[0] for t in tasks}) == 1  # one array job
    assert [t["job_id"].split("_")[1] for t in tasks] == ["0", "1", "2"]
    for task in tasks:
        assert task["scheduler_state"] == "COMPLETED"
        assert task["run_state"] == "finished" and task["step"] == 4
        assert 0.0 <= task["final_metrics"]["score"] <= 1.0
        assert Path(task["output_dir"]).parent == root
        assert "$" not in task["name"] and " " not in task["name"]
    table = dist_ft(["jobs", str(root)], slurm_cluster).stdout
    assert table.count("finished") == 3 and "optim.lr=0.002" in table
    assert not list(tmp_path.rglob("PWNED*"))
    # The array's aggregation job ran after it, grouped by the swept key.
    aggregation = json.loads(listed.stdout)["aggregate"]
    assert aggregation["written"] and aggregation["scheduler_state"] == "COMPLETED"
    assert aggregation["group_by"] == ["optim.lr"]
    assert f"aggregated logs: {root}/aggregate/summary.json" in table
    summary = json.loads((root / "aggregate" / "summary.json").read_text())
    assert sorted(summary["groups"]) == [f"optim.lr={lr}" for lr in ("0.001", "0.002", "0.003")]
    assert summary["groups"]["optim.lr=0.002"]["train/loss"]["final"]["step"] == 4


def test_preempted_and_requeued_jobs_resume_and_log_each_step_once(
        slurm_cluster: dict[str, str], launch_data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Two interruptions: submitit's preemption (SIGTERM + SIGUSR2: checkpoint, self-requeue)
    and an administrator's ``scontrol requeue`` (SIGTERM: checkpoint, Slurm requeues)."""
    from submitit.slurm.slurm import SlurmJob

    out = tmp_path / "run"
    steps = 30
    # One node, one process: rank agreement on a signal is tested in test_preemption_mp.py;
    # here it is Slurm's side (signals, requeue, restart count) that matters.
    cmd = [sys.executable, "-m", "dist_ft", "submit", str(SMOKE), "--nodes", "1",
           "--gpus-per-node", "0", "--wait", "--json", "trainer.backend=ddp",
           *small_run(launch_data, out, steps)]
    submitter = subprocess.Popen(cmd, cwd=REPO, env=slurm_cluster, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: (out / "submission.json").is_file(), 60, "the submission")
        job_id = json.loads((out / "submission.json").read_text())["job_id"]
        wait_until(lambda: read_status(out).get("step", 0) >= 6, 180, "step 6")
        for key in ("SLURM_CONF", "PATH"):  # submitit's scancel talks to the dev cluster
            monkeypatch.setenv(key, slurm_cluster[key])
        SlurmJob(folder=out / "submitit", job_id=job_id)._interrupt()  # preemption
        wait_until(lambda: read_status(out).get("state") == "stopped", 60, "the first stop")
        first = read_status(out)
        assert first["signals"] == ["SIGUSR2", "SIGTERM"]
        assert first["note"] == "requeue 1 of 3"
        wait_until(lambda: read_status(out).get("state") == "running"
                   and read_status(out)["step"] >= first["step"] + 6, 240, "the resumed run")
        subprocess.run(["scontrol", "requeue", job_id], env=slurm_cluster, check=True)
        wait_until(lambda: read_status(out).get("state") == "stopped"
                   and read_status(out)["step"] > first["step"], 60, "the second stop")
        second = read_status(out)
        assert second["signals"] == ["SIGTERM"]
        stdout, stderr = submitter.communicate(timeout=400)
    finally:
        submitter.kill()
    assert submitter.returncode == 0, stderr[-3000:]
    assert json.loads(stdout)["outcomes"][0]["result"]["step"] == steps
    log = (out / "logs" / "rank0.log").read_text()
    for stop in (first, second):
        assert f"resumed from {out}/checkpoints/step_{stop['step']:08d}" in log
    assert log.count("resumed from") == 2
    scontrol = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=slurm_cluster,
                              capture_output=True, text=True).stdout
    assert "Restarts=2" in scontrol and "JobState=COMPLETED" in scontrol
    # TensorBoard: every step exactly once across the three segments.
    assert tb_steps(out / "tb", "train/loss") == list(range(1, steps + 1))
    val = tb_steps(out / "tb", "val/loss")
    assert val == sorted(set(val)) and val[-1] == steps


def test_a_two_node_run_preempted_resumes_on_one_node_and_jobs_lists_both_segments(
        slurm_cluster: dict[str, str], launch_data: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-node job preempted (no requeue left) is resubmitted with ``--nodes 1 --resume
    auto``: the same run folder and run id finish the run on world size 1, with the global
    batch held (``data.global_batch_size``), and ``dist-ft jobs`` shows both segments."""
    from submitit.slurm.slurm import SlurmJob

    out = tmp_path / "run"
    steps = 40
    run = ["--gpus-per-node", "0", "trainer.backend=ddp", "data.global_batch_size=8",
           "trainer.checkpoint_every_steps=2", *small_run(launch_data, out, steps)]
    first = dist_ft(["submit", str(SMOKE), "--nodes", "2", "--max-requeues", "0", *run],
                    slurm_cluster)
    assert first.returncode == 0, first.stderr[-3000:]
    first_job = json.loads((out / "submission.json").read_text())["job_id"]
    wait_until(lambda: read_status(out).get("step", 0) >= 4, 180, "step 4 on 2 nodes")
    for key in ("SLURM_CONF", "PATH"):  # submitit's scancel talks to the dev cluster
        monkeypatch.setenv(key, slurm_cluster[key])
    SlurmJob(folder=out / "submitit", job_id=first_job)._interrupt()  # preemption
    wait_until(lambda: read_status(out).get("state") == "stopped", 60, "the stop")
    stopped = read_status(out)
    assert stopped["note"].startswith("requeue limit reached"), stopped
    assert 4 <= stopped["step"] < steps

    def first_job_over() -> bool:
        shown = subprocess.run(["scontrol", "-o", "show", "job", first_job], env=slurm_cluster,
                               capture_output=True, text=True).stdout
        return "JobState=RUNNING" not in shown and "JobState=COMPLETING" not in shown

    wait_until(first_job_over, 60, f"job {first_job} to end")
    second = dist_ft(["submit", str(SMOKE), "--nodes", "1", "--resume", "auto", "--wait",
                      "--json", *run], slurm_cluster)
    assert second.returncode == 0, second.stderr[-3000:]
    # The resubmission says what it continues, where it ran before, and what holds the batch.
    assert f"holds run {stopped['run_id']}" in second.stderr
    assert "ran last on 2 node(s), world size 2" in second.stderr
    assert "data.global_batch_size=8 keeps the global batch" in second.stderr
    manifest = json.loads(second.stdout)
    assert manifest["outcomes"][0]["result"]["step"] == steps
    assert [p["job_id"] for p in manifest["previous"]] == [first_job]
    log = (out / "logs" / "rank0.log").read_text()
    assert f"resumed from {out}/checkpoints/step_{stopped['step']:08d}" in log
    listed = dist_ft(["jobs", str(out), "--json"], slurm_cluster)
    assert listed.returncode == 0, listed.stderr
    (task,) = json.loads(listed.stdout)["tasks"]
    assert task["run_state"] == "finished" and task["step"] == steps
    segments = task["segments"]
    assert [(s["world_size"], s["nodes"]) for s in segments] == [(2, 2), (1, 1)]
    assert [s["start_step"] for s in segments] == [0, stopped["step"]]
    assert [(s["end_state"], s["end_step"]) for s in segments] == [
        ("stopped", stopped["step"]), ("finished", steps)]
    assert [s["job_id"] for s in segments] == [first_job, manifest["job_id"]]
    assert {s["run_id"] for s in segments} == {stopped["run_id"]}
    table = dist_ft(["jobs", str(out)], slurm_cluster).stdout
    assert "2→1" in table and "segments" in table


def test_the_plain_sbatch_template_trains_with_hostile_arguments_inert(
        slurm_cluster: dict[str, str], launch_data: Path, tmp_path: Path) -> None:
    # Were any of it run by a shell, it would create PWNED files in the job's folder.
    hostile = tmp_path / "data a b'; touch PWNED; $(touch PWNED2) `touch PWNED3`"
    hostile.symlink_to(launch_data)
    out = tmp_path / "plain"
    overrides = [o for o in small_run(launch_data, out, 6, "trainer.backend=ddp")
                 if not o.startswith("data.root=")] + [f"data.root={hostile}"]
    env = {**slurm_cluster, "PYTHON": sys.executable}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--nodes", "2", "--ntasks-per-node", "1", "--gpus-per-node",
         "0", "--time", "10", f"--output={tmp_path}/slurm-%j.out",
         str(REPO / "slurm" / "train.sbatch"), str(SMOKE), *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]

    def finished() -> bool:
        state = subprocess.run(["scontrol", "-o", "show", "job", job_id], env=env,
                               capture_output=True, text=True).stdout
        return any(f"JobState={s}" in state for s in ("COMPLETED", "FAILED", "CANCELLED"))

    wait_until(finished, 300, f"sbatch job {job_id}", poll=1)
    log = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert read_status(out).get("state") == "finished", log[-3000:]
    assert "rank 1/2" in (out / "logs" / "rank1.log").read_text()
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["data"]["root"] == str(hostile)  # arrived as one argument, byte for byte
    assert not list(tmp_path.glob("PWNED*"))
