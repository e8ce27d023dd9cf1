"""The run-folder lock: exclusive, names its holder, taken over only from a gone holder."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_ft.runlock import STALE_AFTER_S, RunLock, RunLockedError


def _plant(path: Path, **holder: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                "run_id": "other-run", "job_id": None, **holder}))


def test_a_second_lock_on_a_held_folder_names_the_holder(tmp_path: Path) -> None:
    # The holder is another live process on this host.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path / ".lock", pid=sleeper.pid, run_id="20261129-120000-abcdef")
        with pytest.raises(RunLockedError) as info:
            RunLock(tmp_path / ".lock", run_id="mine").acquire()
        message = str(info.value)
        assert f"is in use by pid {sleeper.pid} on host {socket.gethostname()}" in message
        assert "run 20261129-120000-abcdef" in message and "another output_dir" in message
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == sleeper.pid  # untouched
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_lock_is_exclusive_and_released_by_its_holder(tmp_path: Path) -> None:
    lock = RunLock(tmp_path / ".lock", run_id="a")
    lock.acquire()
    other = subprocess.run(
        [sys.executable, "-c", "import sys; from dist_ft.runlock import RunLock\n"
         "try:\n    RunLock(sys.argv[1], run_id='b').acquire()\n"
         "except Exception as exc:\n    print(type(exc).__name__, exc)",
         str(tmp_path / ".lock")], capture_output=True, text=True, timeout=60)
    assert other.stdout.startswith(f"RunLockedError {tmp_path} is in use by pid {os.getpid()}")
    record = json.loads((tmp_path / ".lock").read_text())
    assert record["pid"] == os.getpid() and record["run_id"] == "a"
    lock.run_id = "b"
    lock.rewrite()
    assert json.loads((tmp_path / ".lock").read_text())["run_id"] == "b"
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _plant(tmp_path / ".lock", pid=gone.pid)
    lock = RunLock(tmp_path / ".lock", run_id="mine")
    lock.acquire()
    assert lock.takeover is not None and f"its process (pid {gone.pid}) is gone" in lock.takeover
    assert json.loads((tmp_path / ".lock").read_text())["run_id"] == "mine"
    lock.release()


def test_another_hosts_lock_is_taken_over_only_when_its_heartbeat_is_stale(
    tmp_path: Path,
) -> None:
    path = tmp_path / ".lock"
    _plant(path, host="node-that-is-not-here", pid=1)
    with pytest.raises(RunLockedError, match="pid 1 on host node-that-is-not-here"):
        RunLock(path, run_id="mine").acquire()
    old = time.time() - STALE_AFTER_S - 60
    os.utime(path, (old, old))
    lock = RunLock(path, run_id="mine")
    lock.acquire()
    assert "heartbeat is" in (lock.takeover or "")
    lock.release()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path: Path) -> None:
    # The earlier incarnation of job 4242 ran on another node and could not release it.
    _plant(tmp_path / ".lock", host="node7", pid=99, job_id="4242")
    with pytest.raises(RunLockedError):
        RunLock(tmp_path / ".lock", run_id="r", job_id="5555").acquire()
    lock = RunLock(tmp_path / ".lock", run_id="r", job_id="4242")
    lock.acquire()
    assert "earlier run of this Slurm job 4242" in (lock.takeover or "")
    lock.release()


def test_a_live_process_of_the_same_slurm_job_keeps_its_lock(tmp_path: Path) -> None:
    # Two terminals of one salloc share the job id: the second must not steal the folder.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _plant(tmp_path / ".lock", pid=sleeper.pid, job_id="4242")
        with pytest.raises(RunLockedError, match=f"pid {sleeper.pid}"):
            RunLock(tmp_path / ".lock", run_id="r", job_id="4242").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_two_takeovers_of_one_stale_lock_leave_one_holder(tmp_path: Path) -> None:
    # B judged the dead holder's lock stale, but A took it over first: B must not move
    # A's fresh lock aside.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = tmp_path / ".lock"
    _plant(path, pid=gone.pid)
    stale = json.loads(path.read_text())
    b = RunLock(path, run_id="b")
    a = RunLock(path, run_id="a")
    a.acquire()
    fresh = json.loads(path.read_text())
    b.read_holder = lambda: stale  # what B read before A's takeover
    b.stale_reason = lambda holder: "its process is gone"
    with pytest.raises(RunLockedError):
        b.acquire()  # each rename finds A's lock, not the stale one: puts it back, gives up
    assert json.loads(path.read_text()) == fresh
    a.release()
