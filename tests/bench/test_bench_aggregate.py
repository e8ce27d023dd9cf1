"""``dist-ft bench aggregate`` at a tiny size: the data it makes and the figures it reports."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_aggregate_reads_every_event_it_made(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = run_cli("bench", "aggregate", "--data", str(tmp_path / "data"), "--runs", "2",
                     "--tags", "3", "--steps", "40", "--repeats", "1", "--json",
                     "--out", str(out))
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc == json.loads(out.read_text())
    assert doc["events"] == 2 * 3 * 40 and doc["dist_ft_events_per_s"] > 0
    assert len(list((tmp_path / "data").rglob("events.out.tfevents.*"))) == 2
    if "tbparse_s" in doc:  # the bench extra installed: the side-by-side ratio is there
        assert doc["ratio"] > 0
    else:
        assert "pip install -e '.[bench]'" in doc["tbparse"]
    table = run_cli("bench", "aggregate", "--data", str(tmp_path / "data"), "--runs", "2",
                    "--tags", "3", "--steps", "40", "--repeats", "1")
    assert "| dist-ft: read + aggregate (6 stats) |" in table.out
