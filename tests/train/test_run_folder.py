"""The run folder's lifecycle through ``dist-ft train``: fresh start vs resume vs overwrite,
the lock, what a resume checks, checkpoint names, damaged checkpoints and Ctrl-C.

One finished run (``base_run``) is shared; each test works on its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_ft.rundir import RunDir
from dist_ft.train.checkpoint import CheckpointDamaged, verify_checkpoint
from tests.conftest import CONFIGS, REPO, plain_env

# Each test starts dist-ft train processes: run apart from the quick loop.
pytestmark = pytest.mark.multiprocess

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
FAST = ["data.image_size=32", "data.load_size=32", "data.batch_size=8", "trainer.backend=ddp",
        "plan.stages[1].start_step=2", "plan.stages[2].start_step=4", "data.val_fraction=0.3",
        "trainer.checkpoint_every_steps=2", "trainer.keep_last=2", "logging.every_steps=1"]


def train_argv(data: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "dist_ft", "train", str(SMOKE), *FAST, f"data.root={data}",
            f"output_dir={out}", *args]


def train(data: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(train_argv(data, out, "trainer.max_steps=6", *args), cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=plain_env())


def message(result: subprocess.CompletedProcess[str]) -> str:
    """The CLI's own error text (without progress bars and log lines)."""
    text = result.stderr.replace("\r", "\n")
    start = text.rfind("dist-ft train: ")
    return text[start:] if start >= 0 else text[-3000:]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base_run(tiny_cxr14_session: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("base") / "run"
    result = train(tiny_cxr14_session, out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture
def run_copy(base_run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(base_run, out)
    return out


def test_a_finished_run_records_its_id_everywhere(base_run: Path) -> None:
    run = RunDir(base_run)
    status = run.read_status()
    assert status is not None and status["state"] == "finished"
    run_id = status["run_id"]
    checkpoints = run.complete_checkpoints()
    # Every 2 steps and at each epoch end (step 3), pruned to keep_last=2.
    assert [c.name for c in checkpoints] == ["step_00000003", "step_00000004"]
    assert all(RunDir.checkpoint_run_id(c) == run_id for c in checkpoints)
    assert f"run {run_id}" in run.rank_log(0).read_text()
    assert not run.lock.exists()  # released at the end
    recipe = run.recipe.read_text()
    assert f"output_dir: {base_run}" in recipe  # absolute paths in the resolved recipe


def test_a_fresh_start_into_a_run_refuses_and_changes_nothing(
    run_copy: Path, tiny_cxr14_session: Path
) -> None:
    before = snapshot(run_copy)
    result = train(tiny_cxr14_session, run_copy)
    assert result.returncode == 2
    text = message(result)
    assert f"output_dir {run_copy} already holds run " in text and "finished" in text
    assert "--resume auto" in text and "another output_dir" in text and "--overwrite" in text
    assert snapshot(run_copy) == before


def test_a_users_own_files_are_never_overwritten(tmp_path: Path,
                                                 tiny_cxr14_session: Path) -> None:
    out = tmp_path / "mine"
    (out / "final").mkdir(parents=True)
    (out / "recipe.yaml").write_text("my notes\n")
    (out / "final" / "model.safetensors").write_bytes(b"my weights")
    before = snapshot(out)
    result = train(tiny_cxr14_session, out)
    assert result.returncode == 2 and "files of an earlier run: recipe.yaml, final/" in \
        message(result)
    assert snapshot(out) == before


def test_overwrite_moves_the_old_run_aside_and_starts_anew(
    run_copy: Path, tiny_cxr14_session: Path
) -> None:
    old_id = RunDir(run_copy).run_id()
    result = train(tiny_cxr14_session, run_copy, "trainer.max_steps=4", "--overwrite")
    assert result.returncode == 0, result.stderr[-3000:]
    aside = list(run_copy.parent.glob("run.replaced-*"))
    assert len(aside) == 1 and RunDir(aside[0]).run_id() == old_id
    assert [c.name for c in RunDir(aside[0]).complete_checkpoints()] == \
        ["step_00000003", "step_00000004"]
    new_id = RunDir(run_copy).run_id()
    assert new_id != old_id
    assert [(c.name, RunDir.checkpoint_run_id(c))
            for c in RunDir(run_copy).complete_checkpoints()] == \
        [("step_00000002", new_id), ("step_00000003", new_id)]
    events = list((run_copy / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1  # TensorBoard holds the new run alone
    assert "--overwrite: moved the earlier run" in (run_copy / "logs" / "rank0.log").read_text()


def test_a_second_trainer_into_a_running_folder_exits_naming_the_holder(
    tmp_path: Path, tiny_cxr14_session: Path
) -> None:
    out = tmp_path / "busy"
    first = subprocess.Popen(train_argv(tiny_cxr14_session, out, "trainer.max_steps=400",
                                        "trainer.checkpoint_every_steps=1000"),
                             cwd=REPO, env=plain_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / ".lock").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / ".lock").exists(), "the first trainer never took the lock"
        started = time.perf_counter()
        second = train(tiny_cxr14_session, out, "--resume", "auto")
        assert second.returncode == 1
        text = message(second)
        assert f"{out} is in use by pid {first.pid} on host " in text, text
        assert time.perf_counter() - started < 60
        holder = json.loads((out / ".lock").read_text())
        assert holder["pid"] == first.pid  # the second one took nothing
    finally:
        first.send_signal(signal.SIGTERM)
        _, err = first.communicate(timeout=120)
    assert first.returncode == 3, err[-3000:]  # stopped cleanly, by the first's own rules
    assert RunDir(out).read_status()["state"] == "stopped"


def test_a_stale_lock_of_a_dead_process_is_taken_over(run_copy: Path,
                                                      tiny_cxr14_session: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (run_copy / ".lock").write_text(json.dumps({"host": os.uname().nodename, "pid": gone.pid,
                                                "run_id": "x", "job_id": None}))
    result = train(tiny_cxr14_session, run_copy, "trainer.max_steps=8", "--resume", "auto",
                   "--accept-change", "trainer.max_steps")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_copy / "logs" / "rank0.log").read_text()
    assert f"took over the lock of pid {gone.pid}" in log and "is gone" in log


def test_a_resume_names_each_difference_from_its_checkpoint(
    run_copy: Path, tiny_cxr14_session: Path
) -> None:
    before = {k: v for k, v in snapshot(run_copy).items() if not k.startswith("logs/")}
    result = train(tiny_cxr14_session, run_copy, "optim.name=sgd", "data.batch_size=4",
                   "trainer.max_steps=8", "--resume", "auto")
    assert result.returncode == 2
    text = message(result)
    assert f"cannot resume from {run_copy}/checkpoints/step_00000004" in text
    for name in ("  - optim.name: checkpoint 'adamw', now 'sgd' (cannot change on resume",
                 "  - data.batch_size: checkpoint 8, now 4",
                 "  - data.global_batch: checkpoint 8, now 4",
                 "  - trainer.max_steps: checkpoint 6, now 8",
                 "to keep the global batch on this number of processes, set "
                 "data.global_batch_size=8",
                 "add --accept-change data.batch_size --accept-change data.global_batch "
                 "--accept-change trainer.max_steps"):
        assert name in text, text
    # Nothing the run wrote changes (status.json still says finished); the log only grows.
    assert {k: v for k, v in snapshot(run_copy).items() if not k.startswith("logs/")} == before


def test_a_resume_on_other_data_names_the_root_and_the_split(
    run_copy: Path, tiny_cxr14: Path
) -> None:
    # The same layout with one image fewer in the list: another split.
    listing = tiny_cxr14 / "train_val_list.txt"
    listing.write_text("\n".join(listing.read_text().split()[:-1]) + "\n")
    result = train(tiny_cxr14, run_copy, "--resume", "auto")
    assert result.returncode == 2
    text = message(result)
    assert "data.root: checkpoint '" in text and f"now '{tiny_cxr14}'" in text
    assert "data.split: checkpoint 'sha256:" in text


def test_an_accepted_change_resumes_and_is_recorded(run_copy: Path,
                                                    tiny_cxr14_session: Path) -> None:
    # Checkpoints of another run copied in, and folders that only look like checkpoints.
    foreign = run_copy / "checkpoints" / "step_00009999"
    shutil.copytree(run_copy / "checkpoints" / "step_00000004", foreign)
    state = json.loads((foreign / "trainer_state.json").read_text())
    (foreign / "trainer_state.json").write_text(json.dumps({**state, "run_id": "someone-else"}))
    for name in ("step_00000004.bak", "step_00000001_best"):
        shutil.copytree(run_copy / "checkpoints" / "step_00000003", run_copy / "checkpoints" / name)
    result = train(tiny_cxr14_session, run_copy, "trainer.max_steps=10", "--resume", "auto",
                   "--accept-change", "trainer.max_steps")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_copy / "logs" / "rank0.log").read_text()
    assert "skipping step_00009999: written by run someone-else" in log
    assert f"resumed from {run_copy}/checkpoints/step_00000004 at step 4" in log
    assert "resume: accepted change trainer.max_steps: checkpoint 6, now 10" in log
    status = RunDir(run_copy).read_status()
    assert status["state"] == "finished" and status["step"] == 10
    assert status["accepted_changes"] == [{"key": "trainer.max_steps", "was": 6, "now": 10,
                                           "at_step": 4}]
    names = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    # keep_last pruned this run's own checkpoints only; the rest is left alone.
    ours = [n for n in names if RunDir.checkpoint_run_id(run_copy / "checkpoints" / n)
            == status["run_id"] and RunDir.checkpoint_step(n) is not None]
    assert len(ours) == 2 and all(RunDir.checkpoint_step(n) > 6 for n in ours)
    assert sorted(set(names) - set(ours)) == ["step_00000001_best", "step_00000004.bak",
                                              "step_00009999"]


@pytest.mark.parametrize("damage", ["empty file", "truncated json", "truncated safetensors",
                                    "missing rank file"])
def test_a_damaged_checkpoint_file_is_named(base_run: Path, tmp_path: Path,
                                            damage: str) -> None:
    checkpoint = tmp_path / "step_00000004"
    shutil.copytree(base_run / "checkpoints" / "step_00000004", checkpoint)
    verify_checkpoint(checkpoint)
    if damage == "empty file":
        victim = checkpoint / "optimizer.bin"
        victim.write_bytes(b"")
    elif damage == "truncated json":
        victim = checkpoint / "trainer_state.json"
        victim.write_text(victim.read_text()[:40])
    elif damage == "truncated safetensors":
        victim = checkpoint / "model.safetensors"
        victim.write_bytes(victim.read_bytes()[:-1000])
    else:
        victim = checkpoint / "rank0.pt"
        victim.unlink()
    with pytest.raises(CheckpointDamaged, match=f"{victim}: damaged checkpoint file"):
        verify_checkpoint(checkpoint)


def test_resume_auto_falls_back_past_a_damaged_checkpoint(
    run_copy: Path, tiny_cxr14_session: Path
) -> None:
    latest = run_copy / "checkpoints" / "step_00000004"
    victim = latest / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-1000])
    explicit = train(tiny_cxr14_session, run_copy, "--resume", str(latest))
    assert explicit.returncode == 1
    assert f"{victim}: damaged checkpoint file (truncated" in message(explicit)
    assert "refused to load" not in explicit.stderr  # damage is not worded as a security issue
    result = train(tiny_cxr14_session, run_copy, "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_copy / "logs" / "rank0.log").read_text()
    assert f"skipping step_00000004: {victim}: damaged checkpoint file" in log
    assert f"resumed from {run_copy}/checkpoints/step_00000003 at step 3" in log
    # The damaged later checkpoint is set aside: never resumed from, never pruned as ours.
    assert "set step_00000004 (a later point of this run" in log
    assert len(list((run_copy / "checkpoints").glob("step_00000004.superseded-*"))) == 1
    run_id = RunDir(run_copy).run_id()
    assert [(c.name, RunDir.checkpoint_run_id(c))
            for c in RunDir(run_copy).complete_checkpoints()] == \
        [("step_00000003", run_id), ("step_00000004", run_id)]


def test_resume_auto_never_restarts_a_finished_run_without_checkpoints(
    tmp_path: Path, tiny_cxr14_session: Path
) -> None:
    out = tmp_path / "short"
    first = train(tiny_cxr14_session, out, "trainer.max_steps=1")  # no checkpoint is due
    assert first.returncode == 0, first.stderr[-3000:]
    assert RunDir(out).complete_checkpoints() == []
    before = snapshot(out)
    again = train(tiny_cxr14_session, out, "trainer.max_steps=1", "--resume", "auto")
    assert again.returncode == 2
    assert "finished without a checkpoint to continue from" in message(again)
    assert snapshot(out) == before


def _wait_for_step(out: Path, step: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        status = RunDir(out).read_status() or {}
        if status.get("state") == "running" and (status.get("step") or 0) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"the run never reached step {step}: {proc.poll()}")


def test_ctrl_c_stops_with_a_checkpoint_and_twice_aborts_marked_failed(
    tmp_path: Path, tiny_cxr14_session: Path
) -> None:
    out = tmp_path / "interrupted"
    argv = train_argv(tiny_cxr14_session, out, "trainer.max_steps=400",
                      "trainer.checkpoint_every_steps=1000")
    once = subprocess.Popen(argv, cwd=REPO, env=plain_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, 2, once)
    once.send_signal(signal.SIGINT)
    _, stderr = once.communicate(timeout=120)
    assert once.returncode == 3, stderr[-3000:]
    status = RunDir(out).read_status()
    assert status["state"] == "stopped" and status["signals"] == ["SIGINT"]
    assert "not requeued (SIGINT: the user interrupted it)" in status["note"]
    verify_checkpoint(status["checkpoint"])

    twice = subprocess.Popen([*argv, "--resume", "auto"], cwd=REPO, env=plain_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_step(out, status["step"] + 2, twice)
    # Signals of one kind sent at once merge into one: press Ctrl-C every 0.1 s until the run
    # says it is no longer running (a user's third press after that would end it by SIGINT).
    while twice.poll() is None and (RunDir(out).read_status() or {}).get("state") == "running":
        twice.send_signal(signal.SIGINT)
        time.sleep(0.1)
    _, stderr = twice.communicate(timeout=120)
    assert twice.returncode == 1, stderr[-3000:]
    assert "dist-ft train: error: interrupted (Ctrl-C twice)" in stderr
    status = RunDir(out).read_status()
    assert status["state"] == "failed" and "interrupted (Ctrl-C twice)" in status["error"]
    for checkpoint in RunDir(out).complete_checkpoints():
        verify_checkpoint(checkpoint)  # nothing half-written looks complete
    assert not (out / ".lock").exists()
