"""The reader against the default ``tensorboard`` reader (its Rust data server), case by case.

One logdir holds one run per case (written by torch's SummaryWriter and tensorboardX where
they can make it, by hand with tensorboard's protos otherwise); the real data server reads it
once with ``--checksum`` (compared with dist-ft's default, which checks data checksums) and
once without (compared with ``--no-verify``). Steps and float32 bit patterns must be equal,
except for int32/int64/float64 scalar tensors: TensorBoard shows none of those, dist-ft reads
them as numbers (its one deliberate departure).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dist_ft.logs.events import read_run
from tests.logs.rustboard import (
    Points,
    RustBoard,
    file_version,
    multi,
    record,
    scalar,
    session_start,
    tensor,
    write_file,
)

pytest.importorskip("grpc")
pytest.importorskip("tensorboard_data_server")

NAME = "events.out.tfevents.1700000000.host.1.0"
INT32, INT64, DOUBLE, FLOAT = 3, 9, 2, 1  # tensorboard's DataType values


def _seq(tag: str, steps, base: float = 0.0, **kw) -> list[bytes]:
    return [record(scalar(tag, s, base + s, **kw)) for s in steps]


def _torch(folder: Path, segments: list[tuple[int | None, dict[str, list[tuple[int, float]]]]]
           ) -> None:
    from torch.utils.tensorboard import SummaryWriter

    for purge, tags in segments:
        writer = SummaryWriter(str(folder), purge_step=purge)
        for tag, points in tags.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()


def _tbx(folder: Path, segments: list[tuple[int | None, dict[str, list[tuple[int, float]]]]]
         ) -> None:
    from tensorboardX import SummaryWriter

    for purge, tags in segments:
        # tensorboardX names files by the second: a suffix keeps segments apart, in order
        writer = SummaryWriter(str(folder), purge_step=purge,
                               filename_suffix=f".{time.time_ns()}")
        for tag, points in tags.items():
            for step, value in points:
                writer.add_scalar(tag, value, step)
        writer.close()


def _line(tag: str, steps, base: float = 0.0) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(s, base + s) for s in steps]}


def _corrupt(folder: Path, **bad: bool) -> None:
    recs = [record(file_version())] + [record(scalar("a", s, s), **bad) if s == 5 else
                                       record(scalar("a", s, s)) for s in range(10)]
    write_file(folder / NAME, recs)


def _flip(folder: Path, index: int, edit: Callable[[bytearray], None]) -> None:
    recs = [record(file_version()), *_seq("a", range(10))]
    damaged = bytearray(recs[index])
    edit(damaged)
    recs[index] = bytes(damaged)
    write_file(folder / NAME, recs)


def _unparsable(rec: bytearray) -> None:
    rec[12:14] = b"\xff\xff"


def _flip_value(rec: bytearray) -> None:
    rec[-6] ^= 0x40  # inside the float: still an Event, the data checksum now wrong


def _two_tags_then(folder: Path, tail: list[bytes]) -> None:
    write_file(folder / NAME, [record(file_version()), *_seq("a", range(10)),
                               *_seq("b", range(10)), *tail])


CASES: dict[str, Callable[[Path], None]] = {
    "midfile_start": lambda d: _two_tags_then(
        d, [record(session_start(5)), *_seq("a", [10, 11], 100)]),
    "midfile_purge_relog": lambda d: _two_tags_then(
        d, [record(file_version(step=5)), record(session_start(5)), *_seq("a", range(5, 8), 100)]),
    "torch_purge_restart": lambda d: _torch(d, [
        (None, _line("a", range(10)) | _line("b", range(10))), (5, _line("a", range(5, 8), 100))]),
    "tbx_purge_restart": lambda d: _tbx(d, [
        (None, _line("a", range(10)) | _line("b", range(10))), (5, _line("a", range(5, 8), 100))]),
    "torch_restart_1file": lambda d: _torch(d, [
        (None, {"a": [(s, s) for s in range(10)] + [(s, 100 + s) for s in range(5, 8)],
                "b": [(s, s) for s in range(10)]})]),
    "tbx_restart_1file": lambda d: _tbx(d, [
        (None, {"a": [(s, s) for s in range(10)] + [(s, 100 + s) for s in range(5, 8)],
                "b": [(s, s) for s in range(10)]})]),
    "torch_restart_2files": lambda d: _torch(d, [
        (None, _line("a", range(10)) | _line("b", range(10))),
        (None, _line("a", range(5, 8), 100))]),
    "tbx_restart_2files": lambda d: _tbx(d, [
        (None, _line("a", range(10)) | _line("b", range(10))),
        (None, _line("a", range(5, 8), 100))]),
    # name order (hostA < hostB) is the opposite of the first-timestamp order
    "same_second": lambda d: (
        write_file(d / "events.out.tfevents.1700000000.hostA.9.0",
                   [record(file_version(wall=2000.0)), *_seq("a", range(5, 8), 100, wall=2000.0)]),
        write_file(d / "events.out.tfevents.1700000000.hostB.1.0",
                   [record(file_version(wall=1000.0)), *_seq("a", range(10), wall=1000.0)])),
    "duplicate_step": lambda d: write_file(d / NAME, [record(file_version())] + [
        record(scalar("a", s, v)) for s, v in [(0, 0.0), (1, 1.0), (1, 11.0), (2, 2.0)]]),
    "step_back": lambda d: write_file(
        d / NAME, [record(file_version()), *_seq("a", range(10)), record(scalar("a", 5, 99.0))]),
    "negative_steps": lambda d: write_file(
        d / NAME, [record(file_version()), *_seq("a", [-3, -1, 2, -2])]),
    "varint_widths": lambda d: write_file(d / NAME, [record(file_version()), *_seq(
        "a", [0, 1, 127, 128, 16383, 16384, 2**21, 2**35, 2**62])]),
    "tensor_dtypes": lambda d: write_file(
        d / NAME, [record(file_version())]
        + [record(tensor("i32", s, INT32, 7 + s)) for s in range(3)]
        + [record(tensor("i64", s, INT64, 2**40 + s)) for s in range(3)]
        + [record(tensor("f64", s, DOUBLE, 0.1 + s)) for s in range(3)]
        + [record(tensor("f32", s, FLOAT, 0.5 + s)) for s in range(3)]),
    "int_preempts": lambda d: write_file(
        d / NAME, [record(file_version())] + [record(tensor("a", s, FLOAT, float(s)))
                                              for s in range(10)]
        + [record(tensor("a", 5, INT32, 55))]),
    "tensor_kinds": lambda d: write_file(
        d / NAME, [record(file_version())]
        + [record(tensor("nometa", s, FLOAT, 1.0 + s, plugin=None)) for s in range(2)]
        + _seq("nometa", [2, 3])  # its first value fixed it: never a scalar tag
        + [record(tensor("other", s, FLOAT, 1.0, plugin="histograms")) for s in range(2)]
        + _seq("mixed", range(4))
        + [record(tensor("mixed", 2, FLOAT, [1.0, 2.0], shape=(2,)))]  # hides step 2 on
        + [record(tensor("mixed", 5, FLOAT, 5.5, plugin=None))]),
    "tensorboard_v2": lambda d: _v2(d),
    "multi_value_and_long_tags": lambda d: write_file(
        d / NAME, [record(file_version())]
        + [record(multi(s, {"x": s, "y/é": -s, "z" * 200: 0.5 * s})) for s in range(4)]
        + _seq("x", [2], 50)),
    "special_values": lambda d: write_file(d / NAME, [record(file_version())] + [
        record(scalar("a", s, v)) for s, v in
        enumerate([-0.0, math.nan, math.inf, -math.inf, 1.0, 1e-45])]),
    "torch_special_values": lambda d: _torch(d, [
        (None, {"a": list(enumerate([-0.0, math.nan, math.inf, -math.inf, 1.0]))})]),
    "tbx_special_values": lambda d: _tbx(d, [
        (None, {"a": list(enumerate([-0.0, math.nan, math.inf, -math.inf, 1.0]))})]),
    "nan_wall_time": lambda d: write_file(
        d / NAME, [record(file_version()), *_seq("a", range(3)),
                   record(scalar("a", 3, 3.0, wall=math.nan)), *_seq("a", range(4, 6))]),
    "inf_wall_time": lambda d: write_file(
        d / NAME, [record(file_version()), *_seq("a", range(3)),
                   record(scalar("a", 3, 3.0, wall=math.inf)),
                   record(scalar("a", 4, 4.0, wall=-math.inf)), *_seq("a", range(5, 7))]),
    "bad_data_crc": lambda d: _corrupt(d, bad_data_crc=True),
    "flipped_value": lambda d: _flip(d, 6, _flip_value),
    "unparsable_record": lambda d: _flip(d, 6, _unparsable),
    "bad_length_crc": lambda d: _corrupt(d, bad_length_crc=True),
    "truncated_tail": lambda d: write_file(d / NAME, [b"".join(
        [record(file_version()), *_seq("a", range(10))])[:-7]]),
    "garbage_file_first": lambda d: (
        write_file(d / "events.out.tfevents.1700000000.aaa.0.0",
                   [b"\x00" * 3 + random.Random(0).randbytes(200)]),
        write_file(d / "events.out.tfevents.1700000001.host.0.0",
                   [record(file_version()), *_seq("a", range(3))])),
}


def _base_file() -> bytes:
    """A realistic file: three tags, steps crossing varint widths, one restart."""
    rng = random.Random(7)
    steps = [*range(0, 300, 3), *range(16300, 16500, 7), *range(200, 260, 5)]
    return b"".join([record(file_version(wall=1.7e9)), *(
        record(scalar(tag, step, rng.uniform(-2, 2), wall=1.7e9 + step * 0.1))
        for step in steps for tag in ("loss", "acc/top1", "lr"))])


def _fuzzed(seed: int) -> Callable[[Path], None]:
    """The base file with a few bits flipped, or cut short, at seeded random places."""

    def make(folder: Path) -> None:
        rng = random.Random(seed)
        data = bytearray(_base_file())
        if seed % 4 == 3:
            data = data[:rng.randrange(len(data))]
        for _ in range(1 + seed % 3):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        write_file(folder / NAME, [bytes(data)])

    return make


CASES |= {f"fuzz_{seed:02d}": _fuzzed(seed) for seed in range(24)}


def _v2(folder: Path) -> None:
    from tensorboard.summary import Writer

    writer = Writer(str(folder))
    for step, value in enumerate([0.5, -0.0, math.nan, 2.5]):
        writer.add_scalar("v2/x", value, step=step)
    writer.add_scalar("v2/x", 9.0, step=1)  # back to step 1
    writer.close()


# dist-ft reads int32/int64/float64 scalar tensors, TensorBoard shows none of them
DEPARTURES = {
    "tensor_dtypes": {"i32": [(0, 7.0), (1, 8.0), (2, 9.0)],
                      "i64": [(s, float(2**40 + s)) for s in range(3)],
                      "f64": [(s, 0.1 + s) for s in range(3)]},
    "int_preempts": {"a": [(s, float(s)) for s in range(5)] + [(5, 55.0)]},
}
DAMAGED = {  # what dist-ft must report, per case (both modes unless marked)
    "bad_length_crc": "bad length checksum", "garbage_file_first": "bad length checksum",
    "unparsable_record": "is no TensorBoard Event", "truncated_tail": "truncated last record",
    "nan_wall_time": "NaN wall time", "inf_wall_time": "infinite wall time",
}


@dataclass
class Compared:
    """The logdir and what the data server shows, without and with ``--checksum``."""

    logdir: Path
    shown: dict[bool, dict[str, dict[str, Points]]]  # checksum -> run -> tag -> points


@pytest.fixture(scope="session")
def tensorboard_shows(tmp_path_factory: pytest.TempPathFactory) -> Compared:
    """Every case written once, read once by each data server (stopped before the tests)."""
    logdir = tmp_path_factory.mktemp("tb_semantics")
    for name, make in CASES.items():
        (logdir / name).mkdir()
        make(logdir / name)
    shown = {}
    for checksum in (False, True):
        server = RustBoard(logdir, checksum=checksum)
        try:
            shown[checksum] = server.scalars()
        finally:
            server.close()
    return Compared(logdir, shown)


def _bits(points: Points) -> list[tuple[int, int]]:
    values = np.array([v for _, v in points], dtype=np.float64).astype(np.float32)
    return list(zip([s for s, _ in points], values.view(np.uint32).tolist(), strict=True))


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", list(CASES))
def test_reads_what_tensorboard_shows(tensorboard_shows: Compared, case: str,
                                      verify: bool) -> None:
    theirs = {tag: pts for tag, pts in tensorboard_shows.shown[verify].get(case, {}).items()
              if pts}  # a tag all of whose points show nothing is not on the dashboard
    run = read_run(tensorboard_shows.logdir / case, verify_crc=verify)
    ours = {tag: list(zip(s.steps.tolist(), s.values.tolist(), strict=True))
            for tag, s in run.series.items()}
    departures = DEPARTURES.get(case, {})
    for tag, expected in departures.items():
        assert tag not in theirs or theirs[tag] != expected  # TensorBoard does not show them
        assert ours.pop(tag) == expected
        theirs.pop(tag, None)
    assert sorted(ours) == sorted(theirs)
    for tag in theirs:
        assert _bits(ours[tag]) == _bits(theirs[tag]), tag
    assert all(s.values.dtype == np.float64 and s.steps.dtype == np.int64
               for s in run.series.values())


def test_the_cases_are_not_trivial(tensorboard_shows: Compared) -> None:
    """Each case shows something, and the ones that differ by mode do differ."""
    default, checked = tensorboard_shows.shown[False], tensorboard_shows.shown[True]
    assert set(default) >= set(CASES)
    assert default["bad_data_crc"] != checked["bad_data_crc"]
    assert default["flipped_value"] != checked["flipped_value"]
    assert [s for s, _ in default["negative_steps"]["a"]] == [-3, -2]
    assert [s for s, _ in checked["same_second"]["a"]] == list(range(10))


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", [*list(DAMAGED), "bad_data_crc"])
def test_damage_is_reported_with_file_and_offset(tensorboard_shows: Compared, case: str,
                                                 verify: bool) -> None:
    run = read_run(tensorboard_shows.logdir / case, verify_crc=verify)
    if case == "bad_data_crc":
        expected = "bad data checksum" if verify else None
    elif case == "unparsable_record" and verify:  # its data checksum fails first
        expected = "bad data checksum"
    else:
        expected = DAMAGED[case]
    if expected is None:
        assert run.problems == []
        return
    assert len(run.problems) == 1, run.problems
    problem = run.problems[0]
    assert expected in problem and str(tensorboard_shows.logdir / case) in problem
    assert "at byte " in problem or "event(s)" in problem
