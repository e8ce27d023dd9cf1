"""``dist-ft bench trainer``: both loops train on 2 processes; the JSON holds the ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

TINY = ["data.image_size=32", "data.load_size=32", "data.batch_size=4"]


def test_trainer_suite_compares_both_loops(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "trainer.json"
    result = run_cli("bench", "trainer", *TINY, "--data", str(tmp_path / "data"),
                     "--steps", "6", "--warmup", "2", "--every", "2", "--repeats", "1",
                     "--json", "--out", str(out))
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc == json.loads(out.read_text())
    assert doc["ratio"] == pytest.approx(
        doc["dist_ft_samples_per_s"] / doc["baseline_samples_per_s"])
    assert doc["ratio_min"] <= doc["ratio_median"] <= doc["ratio_max"]
    assert (doc["processes"], doc["backend"], doc["zero_stage"]) == (2, "deepspeed", 2)
    for kind in ("dist_ft", "baseline"):
        (run,) = doc["runs"][kind]
        # Steps 3-6 in windows of 2 steps, 4 images x 2 processes each.
        assert run["measured_steps"] == 4 and run["samples_per_s"] > 0
    assert (tmp_path / "data" / ".bench-synth.json").is_file()
