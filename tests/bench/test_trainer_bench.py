"""``dist-ft bench trainer``: the three loops train on 2 processes under each backend (FSDP2:
dist-ft and the step loop, compared with DDP's dist-ft); the JSON holds the ratios, start-up
and the engine rebuilds of a staged run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiprocess

TINY = ["data.image_size=32", "data.load_size=32", "data.batch_size=4"]


def test_trainer_suite_compares_dist_ft_with_the_tutorial_loop(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "trainer.json"
    result = run_cli("bench", "trainer", *TINY, "--data", str(tmp_path / "data"),
                     "--steps", "6", "--warmup", "2", "--every", "2", "--repeats", "1",
                     "--backends", "ddp", "fsdp", "--json", "--out", str(out))
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc == json.loads(out.read_text())
    ddp = doc["backends"]["ddp"]
    assert doc["ratio"] == doc["ratios"]["ddp"] == pytest.approx(
        ddp["dist_ft_samples_per_s"] / ddp["tutorial_samples_per_s"])
    assert ddp["ratio_min"] <= ddp["ratio_median"] <= ddp["ratio_max"]
    assert ddp["step_ratio"] * ddp["data_ratio"] == pytest.approx(ddp["ratio"])
    assert (doc["processes"], doc["batch_per_process"], doc["image_size"]) == (2, 4, 32)
    assert "optim.name=adam" in doc["overrides"]  # every loop does the tutorial's arithmetic
    for kind in ("dist_ft", "tutorial", "step_loop"):
        (run,) = ddp["runs"][kind]
        # Steps 3-6 in windows of 2 steps, 4 images x 2 processes each.
        assert run["measured_steps"] == 4 and run["samples_per_s"] > 0
        assert 0 < run["startup_s"] < run["wall_s"]
    assert {"processes", "model", "data", "engine"} <= set(ddp["setup_s"])
    # The staged run: stage 0 built at set-up, then two rebuilds at steps 2 and 4.
    entries = ddp["stage_entries"]
    assert [(e["stage"], e["step"], e["rebuilt"]) for e in entries] == [
        (0, 0, False), (1, 2, True), (2, 4, True)]
    assert all(e["seconds"] > 0 for e in entries)
    # FSDP2: no tutorial loop (Accelerate's FSDP plugin does not run on CPU); its dist-ft rate
    # is set against DDP's from the same run, and its staged run changes stage twice.
    fsdp = doc["backends"]["fsdp"]
    assert set(fsdp["runs"]) == {"dist_ft", "step_loop"} and "fsdp" not in doc["ratios"]
    assert fsdp["ratio"] is None and fsdp["step_ratio"] > 0
    for run in (*fsdp["runs"]["dist_ft"], *fsdp["runs"]["step_loop"]):
        assert run["measured_steps"] == 4 and run["samples_per_s"] > 0
    assert fsdp["vs_backends"] == {"ddp": pytest.approx(
        fsdp["dist_ft_samples_per_s"] / ddp["dist_ft_samples_per_s"])}
    assert ddp["vs_backends"]["fsdp"] == pytest.approx(1 / fsdp["vs_backends"]["ddp"])
    assert [(e["stage"], e["step"], e["rebuilt"]) for e in fsdp["stage_entries"]] == [
        (0, 0, False), (1, 2, True), (2, 4, True)]
    assert (tmp_path / "data" / ".bench-synth.json").is_file()
    table = run_cli("bench", "trainer", "--help")
    assert "--backends" in table.out
