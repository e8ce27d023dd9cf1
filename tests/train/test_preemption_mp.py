"""A signal to one rank stops every rank at the same step, after one complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_ft.rundir import RunDir
from tests.conftest import CONFIGS, REPO

pytestmark = pytest.mark.multiprocess


def rank_pids(out: Path) -> dict[int, int]:
    """pid of each training rank of the run writing to ``out`` (from /proc)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0")
                       if b"=" in e)
        except OSError:
            continue
        if b"dist_ft" in cmd and f"output_dir={out}".encode() in cmd and b"RANK" in env \
                and b"launch" not in cmd:
            found[int(env[b"RANK"])] = int(proc.name)
    return found


def test_sigusr2_to_rank_1_checkpoints_on_both_ranks_and_exits_3(tmp_path: Path) -> None:
    from dist_ft.data.synth import write_synthetic
    from tests.launch.conftest import small_run

    data = tmp_path / "data"
    write_synthetic(data, images=120, size=32, seed=0)
    out = tmp_path / "run"
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--config_file", str(REPO / "launch/cpu_2proc.yaml"),
           "-m", "dist_ft", "train", str(CONFIGS / "chestxray14_smoke.yaml"),
           *small_run(data, out, 500, "trainer.backend=ddp")]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            status = (out / "status.json")
            if status.is_file() and json.loads(status.read_text()).get("step", 0) >= 3:
                break
            time.sleep(0.2)
        pids = rank_pids(out)
        assert sorted(pids) == [0, 1]
        os.kill(pids[1], signal.SIGUSR2)  # rank 1 only
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0  # torchrun reports the ranks' exit code 3 as a failure
    assert "dist-ft train: stopped on SIGUSR2 at step" in stdout, stderr[-3000:]
    steps = set()
    for rank in (0, 1):
        log = (out / "logs" / f"rank{rank}.log").read_text()
        line = next(x for x in log.splitlines() if "SIGUSR2 received; checkpointing" in x)
        steps.add(int(line.rsplit("step ", 1)[1]))
    (step,) = steps  # the same step on both ranks
    status = json.loads((out / "status.json").read_text())
    assert (status["state"], status["step"], status["note"]) == ("stopped", step,
                                                                  "not a Slurm job")
    assert RunDir(out).latest_checkpoint().name == f"step_{step:08d}"
    assert 3 <= step < 500
