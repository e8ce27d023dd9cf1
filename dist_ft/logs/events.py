"""Read TensorBoard event files without TensorFlow: scalars as numpy arrays, every point kept.

An event file is a sequence of TFRecords (``uint64 length``, ``uint32 masked crc32c(length)``,
``data``, ``uint32 masked crc32c(data)``), each ``data`` an ``Event`` protobuf (tensorboard's
own compiled protos, parsed by protobuf's C backend). Scalars come as ``simple_value``
(torch's SummaryWriter, tensorboardX) or as a scalar tensor with the ``scalars`` plugin
(``tensorboard.summary`` / ``tf.summary`` v2).

A directory's files are read in the order they were started; what TensorBoard hides, this
hides too:
- a ``SessionLog.START`` at step S (``SummaryWriter(purge_step=S)`` after a requeue) drops
  every earlier point at step >= S;
- a tag whose steps go back (a restarted writer without purge) drops its own earlier points
  from that step on; the same step logged twice keeps the later value.
A truncated last record (a writer killed mid-write) ends that file's data and is reported;
a record whose checksum fails (or that is no ``Event``) is reported and ends the file too (its
framing is lost). A file with no readable record at all (empty, random bytes, another format)
is reported as corrupt, naming the file and why; :attr:`FileScalars.readable` is then false.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
EVENT_GLOB = "events.out.tfevents.*"


_MASK = 0xFFFFFFFF
_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (C implementation from google-crc32c)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _DELTA) & _MASK


@dataclass
class FileScalars:
    """The scalars of one event file, in file order."""

    path: Path
    tags: list[str]
    tag_index: np.ndarray  # int32 [n]: index into ``tags``
    steps: np.ndarray  # int64 [n]
    values: np.ndarray  # float64 [n]
    wall_time: float  # of the first event (when the writer started)
    purge_step: int | None  # a SessionLog.START's step, if the file has one
    problems: list[str] = field(default_factory=list)
    records: int = 0

    @property
    def readable(self) -> bool:
        """Whether at least one record could be read (an empty or corrupt file has none)."""
        return self.records > 0


def _tensor_scalar(value: Any) -> float | None:
    """A ``tensorboard.summary``/``tf.summary`` v2 scalar (a 0-d tensor, scalars plugin)."""
    if value.WhichOneof("value") == "tensor" and \
            value.metadata.plugin_data.plugin_name == "scalars":
        t = value.tensor
        if t.float_val:
            return float(t.float_val[0])
        if t.double_val:
            return float(t.double_val[0])
        if t.tensor_content:
            dtype = {1: np.float32, 2: np.float64, 19: np.float16}.get(t.dtype)
            if dtype is not None:
                return float(np.frombuffer(t.tensor_content, dtype=dtype)[0])
    return None


def read_event_file(path: str | Path, verify_crc: bool = True) -> FileScalars:
    """Every scalar point of one event file (see the module doc for damaged files)."""
    import google_crc32c
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

    path = Path(path)
    data = path.read_bytes()
    tags: dict[str, int] = {}
    tag_ids: list[int] = []
    steps: list[int] = []
    values: list[float] = []
    problems: list[str] = []
    damage: str | None = None  # why reading stopped early
    wall_time = float("inf")
    purge: int | None = None
    offset, size, records = 0, len(data), 0
    # Hot loop: one iteration per record, so every lookup is bound to a local first.
    unpack_header, unpack_crc = _HEADER.unpack_from, _FOOTER.unpack_from
    crc32c, parse, start = google_crc32c.value, Event.FromString, SessionLog.START
    add_tag, add_step, add_value = tag_ids.append, steps.append, values.append
    while offset < size:
        if offset + 12 > size:
            damage = (f"truncated record header at byte {offset} "
                      f"({size - offset} trailing bytes ignored)")
            break
        length, length_crc = unpack_header(data, offset)
        body_start = offset + 12
        end = body_start + length + 4
        # The length's own checksum first: a garbage length is corruption, not truncation.
        if verify_crc:
            a = crc32c(data[offset:offset + 8])
            if (((a >> 15) | (a << 17)) + _DELTA) & _MASK != length_crc:
                damage = (f"checksum mismatch in the record header at byte {offset} (length "
                          f"field); the rest of the file is ignored")
                break
        if end > size:
            damage = (f"truncated last record at byte {offset} (needs {length} bytes, "
                      f"{size - body_start} left; a writer killed mid-write?)")
            break
        body = data[body_start:body_start + length]
        if verify_crc:
            b = crc32c(body)
            if (((b >> 15) | (b << 17)) + _DELTA) & _MASK != unpack_crc(data, end - 4)[0]:
                damage = (f"checksum mismatch in the record at byte {offset}; the rest of the "
                          "file is ignored")
                break
        try:
            event = parse(body)
        except DecodeError as exc:  # only reachable without checksums (--no-verify)
            damage = (f"the record at byte {offset} is not a TensorBoard Event ({exc}); the "
                      "rest of the file is ignored")
            break
        offset = end
        records += 1
        summary_values = event.summary.value
        if not summary_values:
            if records == 1 or wall_time == float("inf"):
                wall_time = min(wall_time, event.wall_time or float("inf"))
            if event.HasField("session_log") and event.session_log.status == start \
                    and purge is None and not steps:
                purge = event.step
            continue
        if wall_time == float("inf"):
            wall_time = event.wall_time
        step = event.step
        for value in summary_values:
            if value.WhichOneof("value") == "simple_value":
                scalar = value.simple_value
            else:
                scalar = _tensor_scalar(value)
                if scalar is None:
                    continue
            tag_id = tags.get(value.tag)
            if tag_id is None:
                tag_id = tags[value.tag] = len(tags)
            add_tag(tag_id)
            add_step(step)
            add_value(scalar)
    if records == 0:
        why = (damage or "empty file (0 bytes): a writer that never flushed, or not a log"
               ).removesuffix("; the rest of the file is ignored")
        problems.append(f"{path}: corrupt event file, nothing readable: {why}")
    elif damage is not None:
        problems.append(f"{path}: {damage}")
    return FileScalars(
        path=path, tags=list(tags), tag_index=np.asarray(tag_ids, dtype=np.int32),
        steps=np.asarray(steps, dtype=np.int64), values=np.asarray(values, dtype=np.float64),
        wall_time=wall_time, purge_step=purge, problems=problems, records=records)


@dataclass
class Series:
    """One tag of one run directory: sorted unique steps and their values."""

    steps: np.ndarray
    values: np.ndarray


@dataclass
class RunScalars:
    """Every scalar tag of one directory of event files (one writer's segments)."""

    directory: Path
    series: dict[str, Series]
    files: list[Path]
    problems: list[str]
    points_read: int
    unreadable: list[Path] = field(default_factory=list)  # files with no readable record


def _keep_last(tag_index: np.ndarray, steps: np.ndarray, values: np.ndarray,
               ntags: int) -> dict[int, Series]:
    """Per tag: unique steps (sorted), the last value written for each."""
    out: dict[int, Series] = {}
    if len(steps) == 0:
        return out
    order = np.lexsort((np.arange(len(steps)), steps, tag_index))  # stable by write order
    t, s, v = tag_index[order], steps[order], values[order]
    last = np.ones(len(s), dtype=bool)
    last[:-1] = (t[1:] != t[:-1]) | (s[1:] != s[:-1])
    t, s, v = t[last], s[last], v[last]
    bounds = np.searchsorted(t, np.arange(ntags + 1))
    for tag in range(ntags):
        lo, hi = bounds[tag], bounds[tag + 1]
        if hi > lo:
            out[tag] = Series(s[lo:hi], v[lo:hi])
    return out


def read_run(directory: str | Path, verify_crc: bool = True) -> RunScalars:
    """Merge the segments (event files) of one directory as TensorBoard shows them."""
    directory = Path(directory)
    files = [read_event_file(p, verify_crc) for p in sorted(directory.glob(EVENT_GLOB))]
    files.sort(key=lambda f: (f.wall_time, f.path.name))
    merged: dict[str, Series] = {}
    problems: list[str] = []
    points = 0
    for f in files:
        problems += f.problems
        points += len(f.steps)
        if f.purge_step is not None:  # the new segment hides everything from its purge step
            for tag, series in merged.items():
                keep = series.steps < f.purge_step
                merged[tag] = Series(series.steps[keep], series.values[keep])
        for tag_id, series in _keep_last(f.tag_index, f.steps, f.values, len(f.tags)).items():
            tag = f.tags[tag_id]
            old = merged.get(tag)
            if old is None:
                merged[tag] = series
                continue
            # A writer that went back in steps replaces this tag from its first step on.
            keep = old.steps < series.steps[0]
            merged[tag] = Series(np.concatenate([old.steps[keep], series.steps]),
                                 np.concatenate([old.values[keep], series.values]))
    merged = {t: s for t, s in merged.items() if len(s.steps)}
    return RunScalars(directory, merged, [f.path for f in files], problems, points,
                      [f.path for f in files if not f.readable])


def find_event_dirs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds event files, sorted."""
    root = Path(root)
    found = {p.parent for p in root.rglob(EVENT_GLOB) if p.is_file()}
    return sorted(found)


def _record(body: bytes) -> bytes:
    header = struct.pack("<Q", len(body))
    return header + _FOOTER.pack(_masked_crc(header)) + body + _FOOTER.pack(_masked_crc(body))


def write_scalars(directory: str | Path, scalars: dict[str, tuple[np.ndarray, np.ndarray]],
                  wall_time: float | None = None) -> Path:
    """Write one event file in ``directory``: for each tag, its (steps, values).

    Points of the same step share one ``Event`` (TensorBoard reads each value under its tag),
    so a million aggregated points take seconds, not the minutes a SummaryWriter call per
    point would.
    """
    import socket
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time() if wall_time is None else wall_time
    path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.dist-ft"
    by_step: dict[int, list[Summary.Value]] = {}
    for tag, (steps, values) in scalars.items():
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            by_step.setdefault(step, []).append(Summary.Value(tag=tag, simple_value=value))
    chunks = [_record(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())]
    for step in sorted(by_step):
        event = Event(wall_time=now, step=step, summary=Summary(value=by_step[step]))
        chunks.append(_record(event.SerializeToString()))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
    return path
