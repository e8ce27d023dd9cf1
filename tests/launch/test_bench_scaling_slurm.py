"""``dist-ft bench scaling --nodes``: the scaling suite on 2 nodes through dist-ft submit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch.conftest import dist_ft

pytestmark = pytest.mark.slurm


def test_scaling_suite_submits_a_two_node_job(slurm_cluster: dict[str, str],
                                                tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    result = dist_ft(["bench", "scaling", "data.image_size=32", "data.load_size=32",
                      "data.batch_size=4", "--data", str(tmp_path / "data"), "--nodes", "2",
                      "--gpus-per-node", "0", "--steps", "6", "--warmup", "2", "--every", "2",
                      "--repeats", "1", "--work", str(tmp_path), "--out", str(out)],
                     slurm_cluster)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| processes | samples/s (min-max) | speed-up | efficiency |" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["mode"] == "submit" and doc["nodes"] == [2]
    (row,) = doc["rows"]
    assert row["world_size"] == 2 and row["speedup"] == 1.0 and row["samples_per_s"] > 0
    assert doc["runs"]["2"][0]["measured_steps"] == 4  # steps 3-6, one process per node
