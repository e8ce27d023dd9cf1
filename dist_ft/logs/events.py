"""Read TensorBoard event files without TensorFlow: scalars as numpy arrays, every point kept.

An event file is a sequence of TFRecords (``uint64 length``, ``uint32 masked crc32c(length)``,
``data``, ``uint32 masked crc32c(data)``), each ``data`` an ``Event`` protobuf. Scalars come as
``simple_value`` (torch's SummaryWriter, tensorboardX) or as a rank-0 tensor with the
``scalars`` plugin (``tensorboard.summary`` / ``tf.summary`` v2).

What a directory (one run) reads as is exactly what the default ``tensorboard`` server (its
Rust data server, tensorboard-data-server 0.7) shows with ``--samples-per-plugin scalars=all``:

- the files are read one after another in file-name (byte) order, whatever their timestamps;
- only summary values count: ``SessionLog.START`` (a ``purge_step``) and ``file_version``
  events are ignored;
- per tag, a point at step S drops every point of that tag already read at a step >= S (a
  restarted writer, with or without purge, replaces what it re-logs; the same step logged twice
  keeps the later value; a tag that is not logged again keeps its old points), within one file
  and across files alike; steps are signed 64-bit;
- a tag's first value fixes its kind: a ``simple_value``, or metadata of the ``scalars``
  plugin, makes a scalar tag; later values of it that are no scalar (a tensor of rank > 0, a
  histogram ...) hide their step but show nothing;
- values are float32 as written, bit for bit (``-0.0``, NaN and inf are data);
- an event whose wall time is NaN ends its file's data; one whose wall time is +-inf is dropped.

One deliberate departure: int32, int64 and float64 rank-0 tensors of a scalar tag (TensorBoard
shows none of them, though they take their step) are read as numbers (float64).

Damage never raises, and ends that file's data where it is, reported with the file and byte
offset: a bad length checksum (random bytes, another format, damage), a bad data checksum, a
record that is no ``Event``, a truncated last record (a writer killed mid-write: the records
before it are kept). ``verify_crc=True`` (the default) matches ``tensorboard --checksum``;
``verify_crc=False`` matches TensorBoard's default, which checks a record's data checksum only
when it is no ``Event`` (as TensorBoard's strict decoder sees it: a known field with another wire
type, or a string that is no UTF-8, makes no ``Event`` either). A file with no readable record
is reported as corrupt and :attr:`FileScalars.readable` is then false.

Speed: the common record (one ``simple_value`` per event, as torch and tensorboardX write it)
is decoded for all records of a file at once with numpy; any other record is parsed by
tensorboard's own protobuf classes.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
EVENT_GLOB = "events.out.tfevents.*"


_MASK = 0xFFFFFFFF
_DELTA = 0xA282EAD8
_REST = "; the rest of the file is ignored"
_SCALARS = "scalars"
_DATA_CLASS_SCALAR = 1
_GRAPH_TAG = "__run_graph__"  # where TensorBoard files a GraphDef event


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (C implementation from google-crc32c)."""
    import google_crc32c

    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _DELTA) & _MASK


@dataclass
class FileScalars:
    """The summary values of one event file, in file order (one entry per value).

    ``shown`` is false for a value that hides its step but shows nothing (no scalar);
    ``scalar_kind`` says whether the value, as its tag's first, would make a scalar tag.
    """

    path: Path
    tags: list[str]
    tag_index: np.ndarray  # int32 [n]: index into ``tags``
    steps: np.ndarray  # int64 [n]
    values: np.ndarray  # float64 [n] (NaN where not shown)
    shown: np.ndarray  # bool [n]
    scalar_kind: np.ndarray  # bool [n]
    problems: list[str] = field(default_factory=list)
    records: int = 0

    @property
    def readable(self) -> bool:
        """Whether at least one record could be read (an empty or corrupt file has none)."""
        return self.records > 0


_WINDOW = 16 << 20  # bytes framed at once: bounds the memory a huge file takes


def _walk(data: bytes, offset: int, stop: int, starts: list[int], lengths: list[int]
          ) -> tuple[int, str | None]:
    """Frame records one by one from ``offset`` until one ends at or after ``stop`` (appending
    their payload start and length). Returns the offset reached and why it stopped early, if
    it did (None at a clean end of file)."""
    import google_crc32c

    size = len(data)
    while offset < size:
        if offset + 12 > size:
            return offset, (f"truncated record header at byte {offset} ({size - offset} "
                            "trailing bytes ignored; a writer killed mid-write?)")
        length, length_crc = _HEADER.unpack_from(data, offset)
        a = google_crc32c.value(data[offset:offset + 8])
        if (((a >> 15) | (a << 17)) + _DELTA) & _MASK != length_crc:
            return offset, (f"checksum mismatch in the record header at byte {offset} (bad "
                            f"length checksum: not an event file, or damaged here){_REST}")
        if offset + 16 + length > size:
            return offset, (f"truncated last record at byte {offset} (needs {length} bytes, "
                            f"{size - offset - 12} left; a writer killed mid-write?)")
        starts.append(offset + 12)
        lengths.append(length)
        offset += 16 + length
        if offset >= stop:
            break
    return offset, None


def _words(data: bytes) -> np.ndarray:
    """The little-endian uint32 at every byte offset of ``data`` (a view, no copy)."""
    return np.ndarray((max(len(data) - 3, 0),), dtype="<u4", buffer=data, strides=(1,))


def _frame(data: bytes, u8: np.ndarray, offset: int
           ) -> tuple[np.ndarray, np.ndarray, int, str | None]:
    """The well-framed records from ``offset`` (a record start) on, up to about
    :data:`_WINDOW` bytes: payload starts and lengths, the offset reached, and why framing
    stopped for good (None while the file goes on, or at its clean end).

    Vectorized: every byte offset in the window whose 12 bytes read as a header with a valid
    length checksum (and a length < 16 MiB) and that links up with the next header is a
    candidate; the chain of records from ``offset`` follows the candidates, skipping the rare
    false ones (a valid-looking header inside a payload). Where the chain stops (the window's
    end, damage, a huge record), :func:`_walk` frames the next record.
    """
    size = len(data)
    end = min(size, offset + _WINDOW)
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    if end - offset >= 12:
        zero = u8[offset:end] == 0
        n = end - offset - 11  # candidate header offsets offset .. end-12
        cand = zero[3:3 + n] & zero[4:4 + n] & zero[5:5 + n] & zero[6:6 + n] & zero[7:7 + n]
        del zero
        idx = np.flatnonzero(cand) + offset
        del cand
        word = _words(data)
        length = (word[idx] & 0xFFFFFF).astype(np.int64)
        # A header's record must end at the window's end or at another candidate, and start
        # at the window's start or where another ends: this drops most false candidates (a
        # length's zeros seen from 1-2 bytes before). A record that does not link up
        # (damage next, the window's end) is left to _walk.
        nxt = idx + length + 16
        mark = np.zeros(end - offset + 1, dtype=bool)
        mark[idx - offset] = True
        mark[end - offset] = True
        linked = mark[np.minimum(nxt, end) - offset] & (nxt <= end)
        mark[:] = False
        mark[nxt[linked] - offset] = True
        mark[0] = True
        linked &= mark[idx - offset]
        del mark
        idx, length = idx[linked], length[linked]
        # The length checksum: one CRC per distinct length (a file has few).
        distinct = np.unique(length)
        table = np.array([_masked_crc(struct.pack("<Q", x)) for x in distinct.tolist()],
                         dtype=np.int64)
        ok = table[np.searchsorted(distinct, length)] == word[idx + 8]
        idx, length = idx[ok], length[ok]
        if len(idx):
            nxt = idx + length + 16
            link = np.empty(len(idx), dtype=bool)  # whether the next candidate is next
            link[:-1] = nxt[:-1] == idx[1:]
            link[-1] = False
            breaks = np.flatnonzero(~link)
            k = int(np.searchsorted(idx, offset))
            while k < len(idx) and idx[k] == offset:
                b = int(breaks[np.searchsorted(breaks, k)])  # records k..b are chained
                parts.append((idx[k:b + 1] + 12, length[k:b + 1]))
                offset = int(nxt[b])
                k = int(np.searchsorted(idx, offset))  # past false candidates inside b
    why = None
    if offset < size:  # one record the chain could not frame (or the damage there)
        starts: list[int] = []
        lengths: list[int] = []
        offset, why = _walk(data, offset, offset + 1, starts, lengths)
        parts.append((np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64)))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), offset, why
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
            offset, why)


_BYTE_EFFECT: list[np.ndarray] = []  # [k][b]: CRC register (from 0) of byte b then k zeros


def _byte_effect(k: int) -> np.ndarray:
    """What a byte followed by ``k`` zero bytes adds to a CRC32C register: [256] uint32."""
    if not _BYTE_EFFECT:
        table = np.zeros(256, dtype=np.uint32)
        for i in range(256):
            c = i
            for _ in range(8):
                c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
            table[i] = c
        _BYTE_EFFECT.append(table)
    first = _BYTE_EFFECT[0]
    while len(_BYTE_EFFECT) <= k:
        c = _BYTE_EFFECT[-1]
        _BYTE_EFFECT.append(first[c & 0xFF] ^ (c >> 8))
    return _BYTE_EFFECT[k]


def _crc32c_same_length(u8: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """CRC32C of the ``length`` bytes before each offset in ``ends``, for all at once.

    The CRC is affine in the data: a record's CRC is the first record's, plus (xor) what the
    bytes where it differs from the first add. Records of one writer differ in few byte
    positions (wall time, step, value), so only those are looked up, one table per position.
    """
    import google_crc32c

    rows = sliding_window_view(u8, length)[ends - length]
    first = rows[0]
    crc = np.full(len(ends), google_crc32c.value(first.tobytes()), dtype=np.uint32)
    for j in np.flatnonzero(np.bitwise_or.reduce(rows ^ first, axis=0)).tolist():
        crc ^= _byte_effect(length - 1 - j).take(rows[:, j] ^ first[j])
    return crc


def _bad_data_crc(data: bytes, u8: np.ndarray, starts: np.ndarray, lengths: np.ndarray
                  ) -> int | None:
    """Index of the first record whose data checksum fails, or None."""
    import google_crc32c

    ends = starts + lengths
    crc = np.zeros(len(starts), dtype=np.uint32)
    distinct, counts = np.unique(lengths, return_counts=True)
    for length, count in zip(distinct.tolist(), counts.tolist(), strict=True):
        group = np.flatnonzero(lengths == length) if len(distinct) > 1 else slice(None)
        if count >= 64 and length <= 1024:  # many records: vectorized
            crc[group] = _crc32c_same_length(u8, ends[group], length)
        else:
            crc[group] = [google_crc32c.value(data[e - length:e])
                          for e in ends[group].tolist()]
    crc = crc.astype(np.uint64)
    masked = (((crc >> np.uint64(15)) | (crc << np.uint64(17))) + np.uint64(_DELTA)) \
        & np.uint64(_MASK)
    bad = np.flatnonzero(masked != _words(data)[ends])
    return int(bad[0]) if len(bad) else None


_PAD = 512  # bytes after the data, so that fixed-width reads past a record stay in bounds


def _rows(padded: np.ndarray, at: np.ndarray, width: int) -> np.ndarray:
    """``width`` bytes from each offset in ``at`` (a copy, [n, width]); ``padded`` is the
    file's bytes followed by :data:`_PAD` bytes of 0xFF."""
    return sliding_window_view(padded, width)[at]


def _fast_decode(padded: np.ndarray, starts: np.ndarray, lengths: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                            np.ndarray]:
    """Decode the records laid out exactly as ``Event{wall_time, step, summary{value{tag,
    simple_value}}}`` (what torch and tensorboardX write per scalar), all at once.

    Returns which records matched, and for those: wall time, step, value (float32 as
    float64), tag start and tag length.
    """
    head = _rows(padded, starts, 24)
    ok = head[:, 0] == 0x09
    wall = np.ascontiguousarray(head[:, 1:9]).view("<f8")[:, 0]
    has_step = head[:, 9] == 0x10
    var = head[:, 10:20]
    ends_here = (var & 0x80) == 0
    width = np.argmax(ends_here, axis=1) + 1  # bytes of the step varint
    ok &= ends_here.any(axis=1) | ~has_step
    width[~has_step] = 0
    step = np.zeros(len(starts), dtype=np.uint64)
    for k in range(int(width.max()) if len(width) else 0):
        part = (var[:, k] & 0x7F).astype(np.uint64) << np.uint64(7 * k)
        step |= np.where(k < width, part, np.uint64(0))
    step = step.view(np.int64)
    r = np.where(has_step, 10 + width, 9)
    mid = _rows(padded, starts + r, 6)
    taglen = mid[:, 5].astype(np.int64)
    ok &= (mid[:, 0] == 0x2A) & (mid[:, 2] == 0x0A) & (mid[:, 4] == 0x0A) & (taglen < 0x80 - 9)
    ok &= (mid[:, 1].astype(np.int64) == taglen + 9) & (mid[:, 3].astype(np.int64) == taglen + 7)
    ok &= r + 11 + taglen == lengths
    tag_at = starts + r + 6
    tail = _rows(padded, tag_at + taglen, 5)
    ok &= tail[:, 0] == 0x15
    value = np.ascontiguousarray(tail[:, 1:5]).view("<f4")[:, 0].astype(np.float64)
    return ok, wall, step, value, tag_at, taglen


def _tag_ids(padded: np.ndarray, tag_at: np.ndarray, taglen: np.ndarray
             ) -> tuple[list[bytes], np.ndarray]:
    """The distinct tag byte strings and each record's index into them."""
    if len(tag_at) == 0:
        return [], np.zeros(0, np.int64)
    width = -(-(int(taglen.max()) + 1) // 8) * 8
    rows = _rows(padded, tag_at - 1, width)  # the length byte first: "a" and "a\0" differ
    rows[np.arange(width) > taglen[:, None]] = 0
    words = rows.view("<u8")
    key = words[:, 0].copy()
    for k in range(1, words.shape[1]):  # a 64-bit hash of the row, checked below
        key = key * np.uint64(0x9E3779B97F4A7C15) ^ words[:, k]
    # Usually few tags, all in the first records: look every key up among those (no sort of
    # all keys); otherwise, or on a hash collision, the full sort.
    distinct, head = np.unique(key[:4096], return_index=True)
    inverse = np.minimum(np.searchsorted(distinct, key), len(distinct) - 1)
    first = head
    if not (distinct[inverse] == key).all():
        _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    if not (words == words[first[inverse]]).all():  # a hash collision: compare whole rows
        packed = np.ascontiguousarray(rows).view(f"V{width}")[:, 0]
        _, first, inverse = np.unique(packed, return_index=True, return_inverse=True)
        inverse = inverse.reshape(-1)
    names = [bytes(rows[i, 1:1 + taglen[i]]) for i in first.tolist()]
    return names, inverse


def _tensor_number(tensor: Any) -> float | None:
    """A rank-0 tensor's number: float32 as TensorBoard reads it; int32, int64 and float64 too
    (dist-ft's one departure: TensorBoard shows those as nothing). None for anything else."""
    if tensor.HasField("tensor_shape") and len(tensor.tensor_shape.dim):
        return None
    listed, raw = {1: (tensor.float_val, "<f4"), 2: (tensor.double_val, "<f8"),
                   3: (tensor.int_val, "<i4"), 9: (tensor.int64_val, "<i8")
                   }.get(tensor.dtype, (None, None))
    if listed is None:
        return None
    if len(listed):
        return float(listed[0]) if len(listed) == 1 else None
    content = tensor.tensor_content
    if len(content) == np.dtype(raw).itemsize:
        return float(np.frombuffer(content, dtype=raw)[0])
    return None


def _scalar_kind(value: Any, kind: str) -> bool:
    """Whether ``value``, as its tag's first, makes the tag one of the scalars dashboard's
    (TensorBoard's ``initial_metadata``: an explicit data class wins, then simple_value, then
    the plugin name)."""
    if value.HasField("metadata"):
        md = value.metadata
        if md.data_class:
            return md.data_class == _DATA_CLASS_SCALAR and \
                md.plugin_data.plugin_name == _SCALARS
        if kind == "simple_value":
            return True
        return md.plugin_data.plugin_name == _SCALARS
    return kind == "simple_value"


_SCHEMAS: dict[str, dict[int, tuple[frozenset[int], Any, bool]]] = {}


def _schema(descriptor: Any) -> dict[int, tuple[frozenset[int], Any, bool]]:
    """Per field number of a message type: the wire types a strict (prost) decoder accepts,
    the nested message type, and whether it is a string."""
    from google.protobuf.descriptor import FieldDescriptor as F

    got = _SCHEMAS.get(descriptor.full_name)
    if got is None:
        got = {}
        for f in descriptor.fields:
            if f.type in (F.TYPE_MESSAGE, F.TYPE_STRING, F.TYPE_BYTES):
                wire = frozenset({2})
            else:
                native = 1 if f.type in (F.TYPE_DOUBLE, F.TYPE_FIXED64, F.TYPE_SFIXED64) else \
                    5 if f.type in (F.TYPE_FLOAT, F.TYPE_FIXED32, F.TYPE_SFIXED32) else 0
                wire = frozenset({native, 2} if f.is_repeated else {native})
            sub = f.message_type if f.type == F.TYPE_MESSAGE else None
            got[f.number] = (wire, sub, f.type == F.TYPE_STRING)
        _SCHEMAS[descriptor.full_name] = got
    return got


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """A varint at ``i`` and the offset after it; (-1, -1) if malformed."""
    value = shift = 0
    for k in range(10):
        if i + k >= len(buf):
            return -1, -1
        byte = buf[i + k]
        if k == 9 and byte > 1:
            return -1, -1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i + k + 1
    return -1, -1


def _strict(buf: bytes, descriptor: Any, group: int = 0) -> int:
    """Check ``buf`` as TensorBoard's Rust decoder (prost) would: a known field with another
    wire type, or a string that is no UTF-8, fails it where Python's protobuf lets it pass
    (as an unknown field). Returns the offset where the message (or group) ends, -1 if bad."""
    schema = _schema(descriptor) if descriptor is not None else {}
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        if key < 0 or key >> 3 == 0:
            return -1
        number, wire = key >> 3, key & 7
        start = i
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(buf, i)
            start, i = i, i + length if length >= 0 else -1
        elif wire == 3:
            end = _strict(buf[i:], None, number) if number not in schema else -1
            i = -1 if end < 0 else i + end
        elif wire == 4:
            return i if number == group and group else -1
        else:
            return -1
        if i < 0 or i > n:
            return -1
        spec = schema.get(number)
        if spec is not None:
            wires, sub, text = spec
            if wire not in wires:
                return -1
            if sub is not None and _strict(buf[start:i], sub) < 0:
                return -1
            if text:
                try:
                    buf[start:i].decode("utf-8")
                except UnicodeDecodeError:
                    return -1
    return -1 if group else i


def _slow_decode(body: bytes, parse: Any, out: list[tuple[str, int, float, bool, bool]]
                 ) -> float:
    """Parse one record with protobuf, appending (tag, step, value, shown, scalar_kind) for
    each of its values; returns the event's wall time. Raises DecodeError."""
    event = parse(body)
    step, what = event.step, event.WhichOneof("what")
    if what == "summary":
        for value in event.summary.value:
            kind = value.WhichOneof("value")
            if kind is None:
                continue
            if kind == "simple_value":
                number: float | None = value.simple_value
            elif kind == "tensor":
                number = _tensor_number(value.tensor)
            else:
                number = None
            out.append((value.tag, step, math.nan if number is None else number,
                        number is not None, _scalar_kind(value, kind)))
    elif what == "graph_def":
        out.append((_GRAPH_TAG, step, math.nan, False, False))
    elif what == "tagged_run_metadata":
        out.append((event.tagged_run_metadata.tag, step, math.nan, False, False))
    return event.wall_time


Points = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _decode(data: bytes, u8: np.ndarray, window: tuple[int, int], starts: np.ndarray,
            lengths: np.ndarray, verify_crc: bool, tags: dict[str, int]
            ) -> tuple[Points, int, str | None, int]:
    """The summary values of framed records (all within ``window``, byte offsets): tag index
    (into ``tags``, extended), step, value, shown, scalar kind. Also returns how many records
    count (the rest: damage, a NaN wall time), why the rest is dropped, and how many events
    were dropped for an infinite wall time."""
    from google.protobuf.message import DecodeError
    from tensorboard.compat.proto.event_pb2 import Event

    damage = None
    if verify_crc and len(starts):
        bad = _bad_data_crc(data, u8, starts, lengths)
        if bad is not None:
            damage = (f"checksum mismatch in the record at byte {int(starts[bad]) - 12} (bad "
                      f"data checksum){_REST}")
            starts, lengths = starts[:bad], lengths[:bad]
    w0, w1 = window
    padded = np.concatenate([u8[w0:w1], np.full(_PAD, 0xFF, dtype=np.uint8)])
    local = starts - w0
    ok, wall, step, value, tag_at, taglen = _fast_decode(padded, local, lengths)
    names, tag_of = _tag_ids(padded, tag_at[ok], taglen[ok])
    fast_tag = np.full(len(names), -1, dtype=np.int64)
    for i, name in enumerate(names):
        try:
            fast_tag[i] = tags.setdefault(name.decode("utf-8"), len(tags))
        except UnicodeDecodeError:  # protobuf refuses it: the slow path reports the record
            continue
    ok_at = np.flatnonzero(ok)
    if len(ok_at) and (fast_tag < 0).any():
        ok[ok_at[fast_tag[tag_of] < 0]] = False
        keep = fast_tag[tag_of] >= 0
        ok_at, tag_of = ok_at[keep], tag_of[keep]
    tag_of = fast_tag[tag_of]
    # Records outside the fast layout, one by one, in order (a file_version, v2 tensors ...).
    cut = len(starts)  # records from here on are dropped (damage, or a NaN wall time)
    slow: list[tuple[str, int, float, bool, bool]] = []
    slow_rec: list[int] = []
    for i in np.flatnonzero(~ok).tolist():
        s = int(starts[i])
        body = data[s:s + int(lengths[i])]
        before = len(slow)
        try:
            # Unchecked records may be damaged in ways Python's protobuf lets pass and
            # TensorBoard's decoder does not (a checked one comes from a writer as it is).
            if not verify_crc and _strict(body, Event.DESCRIPTOR) < 0:
                raise DecodeError("a field with the wrong wire type, or a string not UTF-8")
            wall[i] = _slow_decode(body, Event.FromString, slow)
        except DecodeError as exc:
            del slow[before:]
            checksum = _masked_crc(body) == _FOOTER.unpack_from(data, s + len(body))[0]
            why = "is not a TensorBoard Event" if checksum else \
                "fails its data checksum (and is no TensorBoard Event)"
            damage = f"the record at byte {s - 12} {why} ({exc}){_REST}"
            cut = i
            break
        slow_rec += [i] * (len(slow) - before)
    # Wall times: NaN ends the file's data, +-inf drops the event (as TensorBoard does).
    nan_at = np.flatnonzero(np.isnan(wall[:cut]))
    if len(nan_at):
        cut = int(nan_at[0])
        damage = (f"the event at byte {int(starts[cut]) - 12} has a NaN wall time (TensorBoard "
                  f"stops reading there){_REST}")
    use = np.zeros(len(starts), dtype=bool)
    use[:cut] = ~np.isinf(wall[:cut])
    fast_use = use[ok_at]
    f_rec, f_tag = ok_at[fast_use], tag_of[fast_use]
    f_step, f_val = step[f_rec], value[f_rec]
    if slow:
        s_rec = np.asarray(slow_rec, dtype=np.int64)
        s_use = use[s_rec]
        s_tag = np.array([tags.setdefault(v[0], len(tags)) for v in slow], dtype=np.int64)
        order = np.argsort(np.concatenate([f_rec, s_rec[s_use]]), kind="stable")  # file order
        points = (
            np.concatenate([f_tag, s_tag[s_use]])[order],
            np.concatenate([f_step, np.array([v[1] for v in slow], np.int64)[s_use]])[order],
            np.concatenate([f_val, np.array([v[2] for v in slow], np.float64)[s_use]])[order],
            np.concatenate([np.ones(len(f_rec), bool),
                            np.array([v[3] for v in slow], bool)[s_use]])[order],
            np.concatenate([np.ones(len(f_rec), bool),
                            np.array([v[4] for v in slow], bool)[s_use]])[order])
    else:
        points = (f_tag, f_step, f_val, np.ones(len(f_rec), bool), np.ones(len(f_rec), bool))
    return points, cut, damage, int(cut - use[:cut].sum())


def read_event_file(path: str | Path, verify_crc: bool = True) -> FileScalars:
    """Every summary value of one event file (see the module doc for damaged files)."""
    path = Path(path)
    data = path.read_bytes()
    u8 = np.frombuffer(data, dtype=np.uint8)
    tags: dict[str, int] = {}
    parts: list[Points] = []
    offset, records, infinite, damage = 0, 0, 0, None
    while offset < len(data) and damage is None:  # a window of records at a time
        start = offset
        starts, lengths, offset, damage = _frame(data, u8, offset)
        points, count, cut_short, dropped = _decode(data, u8, (start, offset), starts, lengths,
                                                    verify_crc, tags)
        parts.append(points)
        records += count
        infinite += dropped
        damage = cut_short or damage  # a record's damage comes before the framing's
    problems = []
    if records == 0:
        why = (damage or "empty file (0 bytes): a writer that never flushed, or not a log"
               ).removesuffix(_REST)
        problems.append(f"{path}: corrupt event file, nothing readable: {why}")
    elif damage is not None:
        problems.append(f"{path}: {damage}")
    if infinite:
        problems.append(f"{path}: {infinite} event(s) with an infinite wall time dropped (as "
                        "TensorBoard does)")
    joined = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0)
              for k in range(5)]
    return FileScalars(path=path, tags=list(tags), tag_index=joined[0].astype(np.int32),
                       steps=joined[1].astype(np.int64), values=joined[2].astype(np.float64),
                       shown=joined[3].astype(bool), scalar_kind=joined[4].astype(bool),
                       problems=problems, records=records)


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


def _preempt(tag_index: np.ndarray, steps: np.ndarray, order: np.ndarray) -> np.ndarray:
    """TensorBoard's per-tag preemption over points in reading order: a point at step S drops
    every earlier point of its tag at a step >= S. ``order`` groups the points by tag, in
    reading order within a tag (a stable sort); returns it without the dropped points and
    sorted by step within each tag."""
    t, s = tag_index[order], steps[order]
    if len(order) < 2 or ((t[1:] != t[:-1]) | (s[1:] > s[:-1])).all():
        return order  # every tag's steps only go up: nothing to drop
    # Kept iff no later point of the tag has a step <= its own: sort each tag by (step, later
    # first); a point is kept iff it comes after every point sorted before it in its tag.
    n = len(tag_index)
    order = order[np.lexsort((-order, s, t))]
    key = tag_index[order].astype(np.int64) * (n + 1) + order  # tags never mix in the max
    kept = np.ones(len(order), dtype=bool)
    kept[1:] = key[1:] > np.maximum.accumulate(key)[:-1]
    return order[kept]


def read_run(directory: str | Path, verify_crc: bool = True) -> RunScalars:
    """The scalars of one directory of event files, as TensorBoard shows them (module doc)."""
    directory = Path(directory)
    paths = sorted(directory.glob(EVENT_GLOB), key=lambda p: os.fsencode(p.name))
    files = [read_event_file(p, verify_crc) for p in paths]
    problems = [p for f in files for p in f.problems]
    names: dict[str, int] = {}
    for f in files:
        for tag in f.tags:
            names.setdefault(tag, len(names))
    parts = [f for f in files if len(f.steps)]
    if parts:
        tag_index = np.concatenate([
            np.array([names[t] for t in f.tags], dtype=np.int64)[f.tag_index] for f in parts])
        steps = np.concatenate([f.steps for f in parts])
        values = np.concatenate([f.values for f in parts])
        shown = np.concatenate([f.shown for f in parts])
        kind = np.concatenate([f.scalar_kind for f in parts])
    else:
        tag_index = steps = np.zeros(0, np.int64)
        values, shown, kind = np.zeros(0), np.zeros(0, bool), np.zeros(0, bool)
    # Group by tag in reading order (a 16-bit key sorts by radix: fast).
    key = tag_index.astype(np.int16) if len(names) < 2**15 else tag_index
    order = np.argsort(key, kind="stable")
    grouped = tag_index[order]
    heads = np.flatnonzero(np.concatenate([[True], grouped[1:] != grouped[:-1]])) \
        if len(order) else np.zeros(0, np.int64)
    # A tag's first value fixes its kind: only scalar tags show, and only their scalars.
    scalar = kind[order[heads]]
    first_seen = dict(zip(grouped[heads].tolist(), order[heads].tolist(), strict=True))
    if not scalar.all():
        order = order[np.repeat(scalar, np.diff(np.append(heads, len(order))))]
    points = int(shown[order].sum())
    order = _preempt(tag_index, steps, order)
    order = order[shown[order]]
    grouped = tag_index[order]
    bounds = np.flatnonzero(np.concatenate([[True], grouped[1:] != grouped[:-1], [True]])) \
        if len(order) else np.zeros(1, np.int64)
    tag_list = list(names)
    found = {}
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        pick = order[lo:hi]
        found[int(grouped[lo])] = Series(steps[pick], values[pick])
    series = {tag_list[i]: found[i] for i in sorted(found, key=first_seen.__getitem__)}
    return RunScalars(directory, series, paths, problems, points,
                      [f.path for f in files if not f.readable])


def find_event_dirs(root: str | Path) -> list[Path]:
    """Every directory under ``root`` (itself included) that holds event files, sorted."""
    root = Path(root)
    found = {p.parent for p in root.rglob(EVENT_GLOB) if p.is_file()}
    return sorted(found)


def _record(body: bytes) -> bytes:
    header = struct.pack("<Q", len(body))
    return header + _FOOTER.pack(_masked_crc(header)) + body + _FOOTER.pack(_masked_crc(body))

