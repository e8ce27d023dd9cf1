"""``dist-ft bench optimizer``: every kernel steps the same tensors; both layouts reported."""

from __future__ import annotations

import json


def test_optimizer_suite_times_each_kernel_on_both_layouts(run_cli) -> None:
    result = run_cli("bench", "optimizer", "--models", "resnet18", "--repeats", "1", "--json")
    assert result.code == 0, result.err
    rows = json.loads(result.out)["rows"]
    assert [r["layout"] for r in rows] == ["per_tensor", "flat"]
    assert rows[0]["params"] == rows[1]["params"] == 11_183_694
    for r in rows:
        assert min(r["for_loop_s"], r["foreach_s"], r["fused_s"]) > 0
        assert r["fused_speedup"] == r["for_loop_s"] / r["fused_s"]
