"""``dist-ft bench scaling --nodes``: the scaling suite on 1 and 2 nodes through dist-ft submit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.launch.conftest import dist_ft

pytestmark = pytest.mark.slurm


def test_scaling_suite_submits_one_job_per_size(slurm_cluster: dict[str, str],
                                                tmp_path: Path) -> None:
    out = tmp_path / "scaling.json"
    result = dist_ft(["bench", "scaling", "data.image_size=32", "data.load_size=32",
                      "data.batch_size=4", "--data", str(tmp_path / "data"), "--nodes", "1", "2",
                      "--gpus-per-node", "0", "--steps", "6", "--warmup", "2", "--every", "2",
                      "--repeats", "1", "--work", str(tmp_path), "--out", str(out)],
                     slurm_cluster)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "| processes | samples/s (min-max) | speed-up | efficiency |" in result.stdout
    doc = json.loads(out.read_text())
    assert doc["mode"] == "submit" and doc["nodes"] == [1, 2]
    assert [r["world_size"] for r in doc["rows"]] == [1, 2]
    assert doc["rows"][0]["speedup"] == 1.0 and all(r["samples_per_s"] > 0 for r in doc["rows"])
    for size in ("1", "2"):
        assert doc["runs"][size][0]["measured_steps"] == 4
