"""The event-file reader: both writers' formats, requeued segments, damage, our own writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dist_ft.logs.events import read_event_file, read_run
from dist_ft.logs.outputs import write_event_file
from tests.logs.conftest import TAGS, Written


def test_each_directory_reads_as_tensorboard_shows_it(log_tree: Written) -> None:
    for (run, rank, tag), expected in log_tree.truth.items():
        got = read_run(log_tree.root / run / "tb" / f"rank{rank}").series[tag]
        steps = sorted(expected)
        assert got.steps.tolist() == steps, (run, rank, tag)
        assert got.values.tolist() == [expected[s] for s in steps]


def test_tensorboard_agrees_with_the_reader(log_tree: Written) -> None:
    """The default ``tensorboard`` reader (its Rust data server) shows the same points for
    every directory of requeued segments (torch and tensorboardX, one truncated)."""
    pytest.importorskip("grpc")
    pytest.importorskip("tensorboard_data_server")
    from tests.logs.rustboard import RustBoard

    server = RustBoard(log_tree.root, checksum=True)
    try:
        shown = server.scalars()
    finally:
        server.close()
    assert len(shown) == 6
    for run, tags in shown.items():
        ours = read_run(log_tree.root / run).series
        assert sorted(tags) == sorted(TAGS) == sorted(ours)
        for tag in TAGS:
            assert [s for s, _ in tags[tag]] == ours[tag].steps.tolist(), (run, tag)
            assert [v for _, v in tags[tag]] == ours[tag].values.tolist(), (run, tag)


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
    write_event_file(tmp_path, {"a/b": (steps, values), "c": (steps[:10], values[:10] * 2)})
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


def _by_protobuf(path: Path) -> list[tuple[str, int, float]]:
    """The simple values of an undamaged file, record by record with protobuf (reference)."""
    import struct

    from tensorboard.compat.proto.event_pb2 import Event

    data, offset, out = path.read_bytes(), 0, []
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        event = Event.FromString(data[offset + 12:offset + 12 + length])
        out += [(v.tag, event.step, v.simple_value) for v in event.summary.value]
        offset += length + 16
    return out


@pytest.mark.parametrize("verify", [True, False])
def test_records_full_of_zero_bytes_and_huge_ones_frame_exactly(tmp_path: Path,
                                                                verify: bool) -> None:
    """Headers are found for all records at once (a length's high zero bytes mark them):
    payloads full of zeros look like headers too, and a record over 16 MiB is framed one by
    one; both must read exactly as protobuf does record by record."""
    from tensorboard.compat.proto.event_pb2 import Event

    from tests.logs.rustboard import file_version, record, scalar

    rng = np.random.default_rng(3)
    records = [record(file_version())]
    for step in range(2000):
        wall = float(rng.choice([1.0, 2.0, 0.5]))  # doubles with 6 zero bytes each
        records.append(record(scalar(f"t{step % 3}\x00", step, 0.0 if step % 2 else step,
                                     wall=wall)))
        if step == 1000:
            records.append(record(Event(wall_time=1.0, file_version="x" * (17 << 20))
                                  .SerializeToString()))
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(b"".join(records))
    got = read_event_file(path, verify_crc=verify)
    assert got.problems == [] and got.records == len(records)
    ours = [(got.tags[t], s, v) for t, s, v in zip(got.tag_index.tolist(), got.steps.tolist(),
                                                    got.values.tolist(), strict=True)]
    assert ours == _by_protobuf(path)


@pytest.mark.parametrize("verify", [True, False])
def test_a_file_framed_in_small_windows_reads_the_same(log_tree: Written, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       verify: bool) -> None:
    """A big file is framed a window at a time (bounded memory); windows smaller than a
    record, and records across window ends, change nothing (damaged files included)."""
    from dist_ft.logs import events

    source = sorted((log_tree.root / "seed1" / "tb" / "rank1").glob("events.*"))[0]
    data = bytearray(source.read_bytes())
    data[len(data) // 3] ^= 0x10
    (tmp_path / "flipped").mkdir()
    (tmp_path / "flipped" / source.name).write_bytes(bytes(data))
    folders = [p.parent for p in log_tree.root.rglob("events.*")] + [tmp_path / "flipped"]

    def snapshot() -> list:
        runs = [read_run(folder, verify_crc=verify) for folder in sorted(set(folders))]
        return [(r.problems, r.points_read, {t: (s.steps.tolist(), s.values.tolist())
                                             for t, s in r.series.items()}) for r in runs]

    whole = snapshot()
    for window in (13, 100, 4096):
        monkeypatch.setattr(events, "_WINDOW", window)
        assert snapshot() == whole, window
