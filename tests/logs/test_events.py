"""The event-file reader: both writers' formats, requeued segments, damage, our own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_ft.logs.events import read_event_file, read_run, write_scalars
from tests.logs.conftest import TAGS, Written


def test_each_directory_reads_as_tensorboard_shows_it(log_tree: Written) -> None:
    for (run, rank, tag), expected in log_tree.truth.items():
        got = read_run(log_tree.root / run / "tb" / f"rank{rank}").series[tag]
        steps = sorted(expected)
        assert got.steps.tolist() == steps, (run, rank, tag)
        assert got.values.tolist() == [expected[s] for s in steps]


def test_tensorboard_agrees_with_the_reader(log_tree: Written) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for rank in (0, 1):
        folder = log_tree.root / "seed1" / "tb" / f"rank{rank}"
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        acc.Reload()
        ours = read_run(folder).series
        for tag in TAGS:
            theirs = acc.Scalars(tag)
            assert [e.step for e in theirs] == ours[tag].steps.tolist()
            assert [e.value for e in theirs] == ours[tag].values.tolist()


def test_a_truncated_record_is_tolerated_and_reported(log_tree: Written) -> None:
    scalars = read_event_file(log_tree.truncated)
    assert len(scalars.problems) == 1 and "truncated last record" in scalars.problems[0]
    assert scalars.steps.max() == 109 and len(scalars.steps) == 19  # 20 written, 1 cut
    run = read_run(log_tree.truncated.parent)
    assert run.problems == scalars.problems


def test_a_corrupt_record_is_reported_and_ends_the_file(log_tree: Written, tmp_path: Path) -> None:
    source = sorted((log_tree.root / "seed1" / "tb" / "rank0").glob("events.*"))[0]
    data = bytearray(source.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged = tmp_path / source.name
    damaged.write_bytes(bytes(data))
    scalars = read_event_file(damaged)
    assert any("checksum mismatch" in p for p in scalars.problems)
    assert 0 < len(scalars.steps) < len(read_event_file(source).steps)
    assert len(read_event_file(damaged, verify_crc=False).steps) > 0


def test_written_files_read_back_exactly_in_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = np.arange(0, 3000, 3)
    values = np.float32(np.random.default_rng(1).normal(size=len(steps))).astype(np.float64)
    write_scalars(tmp_path, {"a/b": (steps, values), "c": (steps[:10], values[:10] * 2)})
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["a/b", "c"]
    assert [e.step for e in acc.Scalars("a/b")] == steps.tolist()
    assert [e.value for e in acc.Scalars("a/b")] == values.tolist()
    assert read_run(tmp_path).series["c"].values.tolist() == (values[:10] * 2).tolist()


def test_tensorboards_own_v2_scalars_are_read(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard.summary")
    from tensorboard.summary import Writer

    writer = Writer(str(tmp_path))
    for step in range(5):
        writer.add_scalar("v2/x", step * 0.5, step=step)
    writer.close()
    series = read_run(tmp_path).series["v2/x"]
    assert series.steps.tolist() == list(range(5))
    assert series.values.tolist() == [s * 0.5 for s in range(5)]
