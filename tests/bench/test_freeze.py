"""``dist-ft bench freeze``: each plan trains what it says, and freezing saves what it should."""

from __future__ import annotations

import json
from pathlib import Path


def test_freezing_saves_gradients_state_and_activations(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "freeze.json"
    result = run_cli("bench", "freeze", "--models", "resnet18", "--image-size", "32",
                     "--batch-size", "2", "--steps", "1", "--plans", "head", "full",
                     "--out", str(out))
    assert result.code == 0, result.err
    assert "| resnet18 | head |" in result.out
    rows = {r["plan"]: r for r in json.loads(out.read_text())["rows"]}
    head, full = rows["head"], rows["full"]
    assert full["trainable_params"] == full["total_params"] == 11_183_694
    assert head["trainable_params"] == 512 * 14 + 14  # the new fc layer only
    for r in rows.values():
        # AdamW keeps two fp32 moments (+ a 4-byte step count per tensor) and one fp32
        # gradient per trainable parameter.
        assert 0 <= r["optimizer_bytes"] - 8 * r["trainable_params"] <= 4 * 200
        assert r["grad_bytes"] == 4 * r["trainable_params"]
        assert r["step_s"] > 0 and r["peak_rss_bytes"] > 0
    # Nothing below the head needs its activations kept for backward.
    assert head["saved_for_backward_bytes"] < full["saved_for_backward_bytes"] / 10
    assert full["step_vs_full"] == 1.0
