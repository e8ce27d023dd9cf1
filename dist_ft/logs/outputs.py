"""What ``dist-ft aggregate`` writes into OUT, in bulk (numpy, no per-point Python objects).

- ``scalars.csv``: one row per group x tag x step, a column per statistic:
  ``group,tag,step,members,nonfinite,<stat>...,label,since_stage`` (by default the statistics
  ``mean,std,min,max``; ``members``: values behind the point, NaN and inf included;
  ``nonfinite``: how many of them were NaN or +-inf; ``label``: the tag in words,
  ``default (no decay) + head (no decay)`` for ``lr/default.no_decay+head.no_decay@full``;
  ``since_stage``: the stage named in such a tag, from which that optimizer group's parameters
  have trained). Values are Python's shortest exact ``repr``: ``float(text)`` gives back the
  aggregated float64 bit for bit, ``nan``, ``inf``, ``-inf`` and ``-0.0`` included;
- ``tb/<group>/<stat>/`` (``--tensorboard`` only): event files, one TensorBoard run per group
  and statistic, so ``tensorboard --logdir OUT/tb`` overlays e.g. every group's mean;
- ``summary.json``: per group and tag, the last finite value (of the mean) with its step, for
  metrics (losses, AUROC, accuracy, F1) the best finite one, and the first non-finite step;
- ``plots/<tag>.png``: each chosen tag, one line per group (mean) with a +-std band; every
  learning rate in one ``plots/lr.png``, a line per optimizer group; dotted lines where the
  runs enter another freeze stage, labelled with its name. A line with more points than the
  plot has pixel columns is drawn as the range it paints in each (:func:`pixel_envelope`).

Large outputs are written by worker processes (forked, so they share the aggregates without
copying them): CSV row blocks, plots and event files at once.
"""

from __future__ import annotations

import fnmatch
import multiprocessing
import re
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.jsonio import dumps
from dist_ft.logs.aggregate import Aggregate, summarize, tag_label
from dist_ft.plotstyle import line_style

# Folder and file names: no ',' '=' or anything else a shell or a glob acts on (as sweep
# task folders, dist_ft.launch.sweep); '=' reads as '-' (lr=0.001 -> lr-0.001).
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def path_name(text: str) -> str:
    """A group or tag as one path component (``lr=0.001,seed=1`` -> ``lr-0.001_seed-1``;
    ``val/loss`` -> ``val_loss``)."""
    return _UNSAFE.sub("_", text.replace("=", "-")).strip("._-") or "_"


def _csv_field(text: str) -> str:
    return f'"{text.replace(chr(34), chr(34) * 2)}"' if any(c in text for c in ',"\n') else text


def unique_names(texts: list[str]) -> dict[str, str]:
    """:func:`path_name` of each text, ``-2``, ``-3``... appended where two would be the same
    file (``a b`` and ``a_b``): two groups never share a folder, two tags never a plot."""
    out: dict[str, str] = {}
    taken: set[str] = set()
    for text in texts:
        name, n = path_name(text), 1
        while name in taken:
            n += 1
            name = f"{path_name(text)}-{n}"
        taken.add(name)
        out[text] = name
    return out


def csv_header(stats: list[str]) -> str:
    """``scalars.csv``'s first line for these statistics (in this order)."""
    return ",".join(["group", "tag", "step", "members", "nonfinite", *stats, "label",
                     "since_stage"]) + "\n"


def _lines(fields: list[str | list[str]], n: int) -> str:
    """``n`` CSV lines from ``fields``: each a text every line shares, or a list of ``n``
    texts. Shared fields are merged into the separators, and the line texts are assembled by
    one ``str.join`` over an interleaved list (slice assignment fills it at C speed)."""
    literal = [""]  # the text before each varying field; the last: after the last one
    varying: list[list[str]] = []
    for i, field in enumerate(fields):
        literal[-1] += "," if i else ""
        if isinstance(field, str):
            literal[-1] += field
        else:
            varying.append(field)
            literal.append("")
    literal[-1] += "\n"
    if not varying:
        return literal[0] * n
    k = len(varying)
    pattern: list[str | None] = []
    for j in range(1, k + 1):  # a line's last literal and the next line's first as one item
        pattern += [None, literal[j] if j < k else literal[k] + literal[0]]
    items = pattern * n
    for j, column in enumerate(varying):
        items[2 * j::2 * k] = column
    items[-1] = literal[k]
    return literal[0] + "".join(items)  # type: ignore[arg-type]


_STEP_TEXT: dict[bytes, list[str]] = {}  # the groups' tags mostly share their steps


def _int_texts(values: np.ndarray, cache: dict[bytes, list[str]] | None = None
               ) -> str | list[str]:
    """Integers as texts: one text when all are equal, else one per value."""
    if len(values) and (values == values[0]).all():
        return str(int(values[0]))
    if cache is None:
        return list(map(str, values.tolist()))
    key = values.tobytes()
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = list(map(str, values.tolist()))
    return cache[key]


def csv_lines(agg: Aggregate, lo: int = 0, hi: int | None = None) -> str:
    """The ``scalars.csv`` lines of ``agg``'s steps ``lo:hi`` (see :func:`csv_header`).

    Floats are written as ``repr`` (shortest text that reads back bit for bit); a statistic
    equal bit for bit to an earlier one (mean, min and max of a lone member) is formatted once,
    a constant one (its std) not per line.
    """
    steps = agg.steps[lo:hi]
    named = tag_label(agg.tag)
    fields: list[str | list[str]] = [
        _csv_field(agg.group), _csv_field(agg.tag), _int_texts(steps, _STEP_TEXT),
        _int_texts(agg.members[lo:hi]), _int_texts(agg.nonfinite[lo:hi])]
    done: list[tuple[np.ndarray, str | list[str]]] = []
    for values in agg.stats.values():
        bits = values[lo:hi].view(np.int64)  # bitwise: NaN equals NaN, -0.0 is not 0.0
        text = next((t for other, t in done if np.array_equal(bits, other)), None)
        if text is None:
            text = (repr(float(values[lo])) if len(bits) and (bits == bits[0]).all()
                    else list(map(repr, values[lo:hi].tolist())))
            done.append((bits, text))
        fields.append(text)
    fields += [_csv_field(named.label), _csv_field(named.since_stage)]
    return _lines(fields, len(steps))


def csv_blocks(results: list[Aggregate], rows: int = 250_000) -> list[tuple[int, int, int]]:
    """``(result index, first step, end)`` blocks of at most ``rows`` lines, in file order:
    the units a worker formats."""
    return [(i, lo, min(lo + rows, len(agg.steps)))
            for i, agg in enumerate(results) for lo in range(0, len(agg.steps), rows)]


def write_csv(results: list[Aggregate], path: Path,
              parts: Callable[[list[tuple[int, int, int]]], Any] | None = None) -> int:
    """``scalars.csv``; returns the number of rows. ``parts``: maps the blocks to their
    encoded text in order (a worker pool's ``imap``), else they are formatted here."""
    blocks = csv_blocks(results)
    stats = list(results[0].stats) if results else []
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(csv_header(stats).encode())
        texts = parts(blocks) if parts else (_csv_part(b, results) for b in blocks)
        for text in texts:
            fh.write(text)
    tmp.replace(path)
    return sum(len(agg.steps) for agg in results)


def _csv_part(block: tuple[int, int, int], results: list[Aggregate] | None = None) -> bytes:
    index, lo, hi = block
    return csv_lines((results or _SHARED["results"])[index], lo, hi).encode()


# --- TensorBoard event files, serialized in bulk ------------------------------------------
# A record is uint64 length, uint32 masked crc32c(length), an Event, uint32 masked
# crc32c(Event). Each tag's Events differ only in the step's varint and the float's 4 bytes,
# so one template per (tag, varint length) is filled by numpy, and the Event's checksum is
# the template's XOR the (linear) CRC contribution of each changed byte, looked up by its
# distance from the end of the Event.
_MASK, _DELTA = 0xFFFFFFFF, 0xA282EAD8
_CRC_TABLES: dict[int, np.ndarray] = {}


def _crc(data: bytes) -> int:
    import google_crc32c

    return google_crc32c.value(data)


def _masked(crc: Any) -> Any:
    """TFRecord's checksum mask, for an int or a uint64 array."""
    return (((crc >> 15) | (crc << 17)) + _DELTA) & _MASK


def _crc_table(distance: int) -> np.ndarray:
    """uint64[256]: what a byte ``distance`` bytes before the end of a message adds (XOR) to
    its CRC32C, against a zero byte there."""
    if distance not in _CRC_TABLES:
        tail = bytes(distance - 1)
        zero = _crc(bytes(distance))
        _CRC_TABLES[distance] = np.array([_crc(bytes([v]) + tail) ^ zero for v in range(256)],
                                         dtype=np.uint64)
    return _CRC_TABLES[distance]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _frame(body: bytes) -> bytes:
    head = struct.pack("<Q", len(body))
    return (head + struct.pack("<I", _masked(_crc(head))) + body
            + struct.pack("<I", _masked(_crc(body))))


def _varint_sizes(steps: np.ndarray) -> np.ndarray:
    """Bytes of each int64 step as a protobuf varint (negative steps: 10)."""
    u = steps.view(np.uint64)
    return 1 + sum((u >= np.uint64(1 << (7 * k))).astype(np.int64) for k in range(1, 10))


def event_records(tag: str, steps: np.ndarray, values: np.ndarray, wall_time: float) -> bytes:
    """One ``Event`` record per point (``simple_value``: float32, as every TensorBoard
    scalar), in step order, built by numpy from one template per step size."""
    name = tag.encode()
    value = b"\x0a" + _varint(len(name)) + name + b"\x15"  # Summary.Value: tag, simple_value
    value_len = len(value) + 4
    summary = b"\x0a" + _varint(value_len) + value  # Summary.value
    tail = b"\x2a" + _varint(len(summary) + 4) + summary  # Event.summary (float appended)
    with np.errstate(over="ignore"):  # beyond float32: inf, as TensorBoard would store it
        floats = np.ascontiguousarray(values, dtype="<f4").view(np.uint8).reshape(-1, 4)
    sizes = _varint_sizes(steps)
    cuts = np.flatnonzero(np.diff(sizes)) + 1
    chunks = []
    for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), len(steps)], strict=True):
        size = int(sizes[lo])
        body = (b"\x09" + struct.pack("<d", wall_time) + b"\x10" + bytes(size) + tail
                + bytes(4))  # wall_time, step (zeros: filled below), summary
        head = struct.pack("<Q", len(body))
        template = np.frombuffer(head + struct.pack("<I", _masked(_crc(head))) + body
                                 + bytes(4), dtype=np.uint8)
        n, first = hi - lo, 12 + 10  # the step's varint starts 10 bytes into the Event
        records = np.empty((n, len(template)), dtype=np.uint8)
        records[:] = template
        crc = np.full(n, _crc(body), dtype=np.uint64)
        u = steps[lo:hi].view(np.uint64)
        for i in range(size):
            byte = ((u >> np.uint64(7 * i)) & np.uint64(0x7F)).astype(np.uint8)
            if i < size - 1:
                byte |= 0x80
            records[:, first + i] = byte
            crc ^= _crc_table(len(body) - 10 - i)[byte]
        records[:, -8:-4] = floats[lo:hi]
        for i in range(4):
            crc ^= _crc_table(4 - i)[floats[lo:hi, i]]
        records[:, -4:] = _masked(crc).astype("<u4").view(np.uint8).reshape(n, 4)
        chunks.append(records.tobytes())
    return b"".join(chunks)


def write_event_file(directory: Path, scalars: dict[str, tuple[np.ndarray, np.ndarray]],
                     wall_time: float | None = None) -> Path:
    """One event file in ``directory``: for each tag, its (sorted steps, values), one
    ``Event`` per point, as torch's SummaryWriter writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time() if wall_time is None else wall_time
    path = directory / f"events.out.tfevents.{int(now)}.{socket.gethostname()}.dist-ft"
    version = b"brain.Event:2"
    chunks = [_frame(b"\x09" + struct.pack("<d", now) + b"\x1a" + _varint(len(version))
                     + version)]  # Event.wall_time, Event.file_version
    chunks += [event_records(tag, steps, values, now)
               for tag, (steps, values) in scalars.items()]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(b"".join(chunks))
    tmp.replace(path)
    return path


def event_runs(results: list[Aggregate], folder: Path
               ) -> dict[Path, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``folder/<group>/<stat>`` -> its tags' (steps, values): one TensorBoard run each."""
    names = unique_names(sorted({agg.group for agg in results}))
    runs: dict[Path, dict[str, tuple[np.ndarray, np.ndarray]]] = {}
    for agg in results:
        for stat, values in agg.stats.items():
            runs.setdefault(folder / names[agg.group] / stat, {})[agg.tag] = (agg.steps, values)
    return dict(sorted(runs.items()))


def write_event_dirs(results: list[Aggregate], folder: Path) -> list[Path]:
    """One event file per group and statistic under ``folder/<group>/<stat>/``."""
    return [write_event_file(d, scalars) for d, scalars in event_runs(results, folder).items()]


def write_summary(results: list[Aggregate], path: Path, extra: dict[str, Any]) -> dict:
    """``summary.json``: final (and, for metrics, best) values per group and tag, plus
    ``extra``."""
    doc = {**extra, "groups": summarize(results)}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(doc))
    tmp.replace(path)
    return doc


def default_plot_tags(results: list[Aggregate]) -> list[str]:
    """Losses, mean AUROC/accuracy and the learning rates, when nothing is asked for."""
    tags = sorted({a.tag for a in results})
    wanted = ("train/loss", "val/loss", "val/auroc_mean", "val/accuracy")
    chosen = [t for t in wanted if t in tags] or tags[:4]
    return chosen + [t for t in tags if tag_label(t).family == "lr" and t not in chosen]




def _figure() -> Any:
    """A matplotlib Figure that only draws to files (Agg), without pyplot: faster to import in
    each output worker, and no figure is left registered anywhere."""
    from matplotlib.figure import Figure

    return Figure(figsize=(8, 4.5), dpi=110)


PIXEL_COLUMNS = 880  # the figure's width in pixels (8 in x 110 dpi): no plot is wider


def pixel_points(steps: np.ndarray, curves: list[np.ndarray],
                 columns: int = PIXEL_COLUMNS) -> np.ndarray:
    """Indices of the points a line plot of ``curves`` over ``steps`` needs: in each of
    ``columns`` equal step ranges, each curve's first, last, lowest and highest point (M4,
    Jugel et al. 2014: the same picture at that width), and every NaN or inf (the gaps).
    All points when there are few."""
    n = len(steps)
    if n <= 4 * columns:
        return np.arange(n)
    span = float(steps[-1]) - float(steps[0]) + 1  # float: no overflow for any int64 steps
    column = np.minimum((steps - steps[0]) / span * columns, columns - 1).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    ends = np.r_[starts[1:], n] - 1
    keep = [starts, ends]
    for curve in curves:
        finite = np.isfinite(curve)
        keep.append(np.flatnonzero(~finite))
        clean = np.where(finite, curve, np.nan)
        for pick, fill in ((np.fmin, np.inf), (np.fmax, -np.inf)):
            extreme = pick.reduceat(np.where(finite, clean, fill), starts)
            # the first index in each column where the curve reaches its extreme
            hit = np.flatnonzero(np.where(finite, clean, fill) == np.repeat(extreme,
                                                                          ends - starts + 1))
            keep.append(hit[np.r_[True, column[hit][1:] != column[hit][:-1]]])
    return np.unique(np.concatenate(keep))


def pixel_envelope(steps: np.ndarray, values: np.ndarray, columns: int = PIXEL_COLUMNS,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A line of more than 4 points per pixel column as what it paints: in each of
    ``columns`` equal step ranges, its lowest and highest value (a column holding NaN or inf
    is a gap, as the line has one there), at the range's middle step. None for a sparser
    line, drawn as it is.

    Drawn as the band between them plus its two edges (each in the line's style, so a smooth
    line still looks dashed or solid), this is the picture of the line at that width, at the
    cost of ``columns`` points instead of every step's segment.
    """
    n = len(steps)
    if n <= 4 * columns:
        return None
    span = float(steps[-1]) - float(steps[0]) + 1
    column = np.minimum((steps - steps[0]) / span * columns, columns - 1).astype(np.int64)
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]])
    ends = np.r_[starts[1:], n] - 1
    finite = np.isfinite(values)
    low = np.fmin.reduceat(np.where(finite, values, np.inf), starts)
    high = np.fmax.reduceat(np.where(finite, values, -np.inf), starts)
    gap = np.logical_and.reduceat(finite, starts) == 0
    low[gap], high[gap] = np.nan, np.nan
    return (steps[starts] + steps[ends]) / 2, low, high


def plot_figure(results: list[Aggregate], tags: list[str],
                boundaries: dict[str, list[tuple[int, str]]] | None = None) -> Any:
    """One figure of ``tags``: each group's mean (else its first statistic) per tag, a +-std
    band where a group has several members, and a dotted vertical line (gid
    ``stage-boundary``), labelled with the stage's name, where the plotted groups' runs enter
    another freeze stage (see :func:`~dist_ft.logs.aggregate.stage_boundaries`).

    A tag in the legend reads as :func:`~dist_ft.logs.aggregate.tag_label` says
    (``default (no decay) + head (no decay), since full``), followed by the group when
    several are plotted; one tag's figure names only the groups.
    """
    fig = _figure()
    ax = fig.subplots()
    shown = [a for a in results if a.tag in tags and a.stats]
    groups = sorted({a.group for a in shown})
    stat = "mean"
    for i, agg in enumerate(shown):
        stat = "mean" if "mean" in agg.stats else next(iter(agg.stats))
        named = tag_label(agg.tag)
        what = named.label + (f", since {named.since_stage}" if named.since_stage else "")
        who = f"{agg.group} (n={len(agg.sources)})"
        text = (who if len(tags) == 1 and what == agg.tag
                else what if len(groups) == 1 else f"{what} · {who}")
        values = agg.stats[stat]
        band = stat == "mean" and "std" in agg.stats and len(agg.sources) > 1
        lower, upper = (values - agg.stats["std"], values + agg.stats["std"]) if band \
            else (values, values)
        style = line_style(i)
        envelope = pixel_envelope(agg.steps, values)
        if envelope is None:
            ax.plot(agg.steps, values, label=text, linewidth=1.2, **style)
        else:  # denser than the pixels: the area the line would paint, drawn at their pace
            x, low, high = envelope
            ax.fill_between(x, low, high, color=style["color"], linewidth=0)
            ax.plot(x, high, label=text, linewidth=1.2, **style)
            ax.plot(x, low, linewidth=1.2, **style)
        if band:
            keep = pixel_points(agg.steps, [lower, upper])
            ax.fill_between(agg.steps[keep], lower[keep], upper[keep], alpha=0.2,
                            color=style["color"], linewidth=0)
    owners: dict[tuple[int, str], list[str]] = {}
    for group in groups:
        for mark in (boundaries or {}).get(group, []):
            owners.setdefault(mark, []).append(group)
    for (step, name), who_has in sorted(owners.items()):
        ax.axvline(step, color="0.35", linestyle=":", linewidth=1.0, gid="stage-boundary")
        note = name if len(who_has) == len(groups) else f"{name} ({', '.join(who_has)})"
        ax.text(step, 0.98, f" {note}", transform=ax.get_xaxis_transform(), rotation=90,
                ha="right", va="top", fontsize=7, color="0.3")
    family = tag_label(tags[0]).family if tags else ""
    ax.set_xlabel("step")
    if family == "lr" and len(tags) > 1:
        ax.set_ylabel("learning rate")
        ax.set_title(f"learning rate per optimizer group ({stat})")
    else:
        ax.set_ylabel(tags[0] if len(tags) == 1 else family)
        ax.set_title(f"{tags[0] if len(tags) == 1 else family}: {stat}"
                     + (" ± std" if stat == "mean" else "") + " over each group's members")
    ax.grid(alpha=0.3)
    fig.tight_layout()  # before the legend: one beside the axes widens the image instead
    if len(shown) > 6:  # a long legend goes beside the axes, not over the lines
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    elif shown:
        ax.legend(fontsize=7, loc="best")
    return fig


def plot_families(results: list[Aggregate], patterns: list[str] | None
                  ) -> dict[str, list[str]]:
    """The figures to draw: family (``lr`` for every learning rate, else the tag) -> its tags
    matching ``patterns`` (None: :func:`default_plot_tags`)."""
    tags = sorted({a.tag for a in results})
    chosen = ([t for t in tags if any(fnmatch.fnmatchcase(t, p) for p in patterns)]
              if patterns else default_plot_tags(results))
    figures: dict[str, list[str]] = {}
    for tag in chosen:
        figures.setdefault(tag_label(tag).family, []).append(tag)
    return figures


def write_plot(results: list[Aggregate], tags: list[str], path: Path,
               boundaries: dict[str, list[tuple[int, str]]] | None = None) -> Path:
    """``path``: the PNG of :func:`plot_figure` for ``tags``."""
    plot_figure(results, tags, boundaries).savefig(path, bbox_inches="tight")  # legend too
    return path


def write_plots(results: list[Aggregate], folder: Path, patterns: list[str] | None,
                boundaries: dict[str, list[tuple[int, str]]] | None = None) -> list[Path]:
    """One PNG per chosen tag (``plots/lr.png`` for every chosen learning rate), drawn by
    :func:`plot_figure`; ``boundaries``: each group's stage changes."""
    figures = plot_families(results, patterns)
    names = unique_names(list(figures))
    folder.mkdir(parents=True, exist_ok=True)
    return [write_plot(results, tags, folder / f"{names[family]}.png", boundaries)
            for family, tags in figures.items()]


PARALLEL_FROM = 100_000  # aggregated points: below, forking workers costs more than it saves
_SHARED: dict[str, Any] = {}  # what forked workers read (set before the pool forks them)


def _output_job(job: tuple[str, Any]) -> Path:
    kind, what = job
    if kind == "plot":
        tags, path = what
        return write_plot(_SHARED["results"], tags, path, _SHARED["boundaries"])
    return write_event_file(what, _SHARED["events"][what])


def can_fork() -> bool:
    """Whether output workers can be forked (Linux: they then share the aggregates; fork is
    unsafe on macOS and absent on Windows, where outputs are written in this process)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def write_outputs(results: list[Aggregate], out: Path, plot: list[str] | None = None,
                  boundaries: dict[str, list[tuple[int, str]]] | None = None,
                  tensorboard: bool = False, workers: int = 1,
                  ) -> tuple[int, list[Path], list[Path]]:
    """``scalars.csv``, ``plots/`` (``plot``: tag globs, None: the defaults, ``[]``: none) and,
    with ``tensorboard``, ``tb/`` in ``out``.

    With ``workers`` > 1 and at least :data:`PARALLEL_FROM` points (on Linux), CSV row
    blocks, plots and event files are made by that many forked processes at once; this one
    writes the CSV blocks in order as they come.

    Returns:
        The CSV's rows, the plots and the event files written.
    """
    figures = plot_families(results, plot) if plot is None or plot else {}
    names = unique_names(list(figures))
    jobs: list[tuple[str, Any]] = [("plot", (tags, out / "plots" / f"{names[family]}.png"))
                                   for family, tags in figures.items()]
    if jobs:
        (out / "plots").mkdir(parents=True, exist_ok=True)
    events = event_runs(results, out / "tb") if tensorboard else {}
    jobs += [("events", directory) for directory in events]
    points = sum(len(agg.steps) for agg in results)
    _SHARED.update(results=results, boundaries=boundaries, events=events)
    try:
        if workers > 1 and points >= PARALLEL_FROM and can_fork():
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                side = pool.map_async(_output_job, jobs, chunksize=1)  # queued first: longest
                rows = write_csv(results, out / "scalars.csv",
                                 lambda blocks: pool.imap(_csv_part, blocks))
                written = side.get()
        else:
            rows = write_csv(results, out / "scalars.csv")
            written = [_output_job(job) for job in jobs]
    finally:
        _SHARED.clear()
    return rows, written[:len(figures)], written[len(figures):]
