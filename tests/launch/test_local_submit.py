"""``dist-ft submit --cluster local``: the same job through submitit's local executor."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, plain_env
from tests.launch.conftest import dist_ft, small_run

pytestmark = pytest.mark.multiprocess


def test_two_nodes_worth_of_processes_train_on_this_machine(launch_data: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**plain_env(), "PYTHONUNBUFFERED": "1"}
    env.pop("SLURM_JOB_ID", None)
    result = dist_ft(["submit", str(CONFIGS / "chestxray14_smoke.yaml"), "--cluster", "local",
                      "--nodes", "2", "--gpus-per-node", "0", "--json",
                      *small_run(launch_data, out, 8)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads(result.stdout)
    assert manifest["cluster"] == "local"
    (outcome,) = manifest["outcomes"]
    assert outcome["ok"] and outcome["result"]["step"] == 8
    assert "rank 1/2" in (out / "logs" / "rank1.log").read_text()
    assert json.loads((out / "status.json").read_text())["state"] == "finished"
    assert oct((out / "submitit").stat().st_mode & 0o777) == "0o755"
    assert not os.environ.get("RANK")  # the submitting process itself joined no group
