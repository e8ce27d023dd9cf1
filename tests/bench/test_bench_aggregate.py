"""``dist-ft bench aggregate`` at a tiny size: the data it makes once, the three commands it
times in fresh processes, and the figures it reports (never the timings themselves)."""

from __future__ import annotations

import copy
import json
from importlib.util import find_spec
from pathlib import Path

import psutil
import pytest

from dist_ft.bench.aggregate import MANIFEST, MISSING_TBPARSE, format_table, prepare_data

SHAPE = ("--runs", "2", "--tags", "2", "--steps", "50", "--repeats", "1")


@pytest.mark.multiprocess
def test_bench_aggregate_times_three_readers_on_the_same_points(run_cli, tmp_path: Path) -> None:
    out, work = tmp_path / "bench.json", tmp_path / "work"
    result = run_cli("bench", "aggregate", "--data", str(tmp_path / "data"), *SHAPE,
                     "--work", str(work), "--json", "--out", str(out))
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc == json.loads(out.read_text())
    assert doc["points"] == 2 * 2 * 50 and doc["points_agree"] is True
    readers = doc["readers"]
    measured = ["dist_ft", "event_accumulator"]
    if find_spec("tbparse"):  # CI installs it (the dev extra): there the column is required
        measured.append("tbparse")
    else:
        assert readers["tbparse"] == {"skipped": MISSING_TBPARSE}
    for name in measured:
        reader = readers[name]
        assert reader["points"] == [200], name  # each read every point SummaryWriter wrote
        assert reader["seconds"]["median"] > 0 and reader["ratio"] > 0
        assert reader["tree_rss_mib"] >= reader["peak_rss_mib"] > 0, name
    # The command's own peak, not this process's: the data was written here (torch imported),
    # and a process started straight from here would inherit that high-water mark.
    here = psutil.Process().memory_info().rss / 2**20
    assert readers["event_accumulator"]["peak_rss_mib"] < here / 2
    assert readers["dist_ft"]["ratio"] == 1.0
    assert list(work.iterdir()) == []  # each output removed once measured
    manifest = json.loads((tmp_path / "data" / MANIFEST).read_text())
    assert manifest["folders"] == ["run0", "run1"] and len(manifest["files"]) == 2

    table = format_table(doc)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4  # the header and one row per command
    assert "`dist-ft aggregate DATA --out OUT` (default outputs)" in rows[1]
    assert "Every run of every command read the same 200 points." in table
    without = copy.deepcopy(doc)
    without["readers"]["tbparse"] = {"skipped": MISSING_TBPARSE}
    assert f"skipped: {MISSING_TBPARSE}" in format_table(without)
    without["points_agree"] = False
    assert "**The point counts differ**" in format_table(without)


@pytest.mark.multiprocess
def test_bench_aggregate_passes_aggregate_args_and_names_a_failing_command(
        run_cli, tmp_path: Path) -> None:
    result = run_cli("bench", "aggregate", "--data", str(tmp_path / "data"), *SHAPE,
                     "--aggregate-args=--stats mean --no-such-flag")
    assert result.code == 1
    assert "--stats mean --no-such-flag exited 2" in result.err
    assert "unrecognized arguments: --no-such-flag" in result.err
    assert "Traceback" not in result.err
    bad = run_cli("bench", "aggregate", "--data", str(tmp_path / "data"), *SHAPE,
                  "--aggregate-args", "'unclosed")
    assert bad.code == 1 and "--aggregate-args" in bad.err and "Traceback" not in bad.err


def test_prepare_data_reuses_the_same_shape_and_remakes_another(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = prepare_data(data, 1, 2, 5)
    event = data / first["files"][0]
    assert first["points"] == 10 and event.is_file()
    assert prepare_data(data, 1, 2, 5) == first  # reused: same files, same manifest
    assert event.is_file()
    other = prepare_data(data, 2, 1, 3)
    assert other["points"] == 6 and other["folders"] == ["run0", "run1"]
    assert not event.exists()  # the other shape's file replaced, not mixed in
    assert sorted(p.name for p in data.iterdir()) == [MANIFEST, "run0", "run1"]


def test_prepare_data_refuses_a_folder_that_is_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("a user's file")
    with pytest.raises(ValueError, match=f"holds files but no {MANIFEST}"):
        prepare_data(tmp_path, 1, 1, 5)
    assert (tmp_path / "mine.txt").read_text() == "a user's file"
    (tmp_path / "mine.txt").unlink()
    (tmp_path / MANIFEST).write_text("not json")
    with pytest.raises(ValueError, match="not a bench manifest"):
        prepare_data(tmp_path, 1, 1, 5)
