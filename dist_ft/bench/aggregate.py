"""``dist-ft bench aggregate``: read + aggregate a million scalars, side by side with tbparse.

The data: ``runs`` run folders x ``tags`` tags x ``steps`` steps, one scalar per event, the
records exactly as torch's SummaryWriter frames them (written by our own writer here, because
a SummaryWriter call per point would take minutes to make the data). Runs alternate
(dist-ft, tbparse, dist-ft, ...) and the median of each is reported with min and max.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def make_event_files(root: Path, runs: int = 4, tags: int = 10, steps: int = 25_000,
                     seed: int = 0) -> int:
    """Write the benchmark's event files under ``root/run{i}/``; returns the scalar count."""
    import socket

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary

    from dist_ft.logs.events import _record

    rng = np.random.default_rng(seed)
    for run in range(runs):
        folder = root / f"run{run}"
        folder.mkdir(parents=True, exist_ok=True)
        values = rng.normal(size=(steps, tags)).astype(np.float32).tolist()
        chunks = [_record(Event(wall_time=1e9 + run, file_version="brain.Event:2")
                          .SerializeToString())]
        names = [f"train/metric_{k}" for k in range(tags)]
        for step in range(steps):
            row = values[step]
            for k, name in enumerate(names):
                event = Event(wall_time=1e9 + run + step * 1e-3, step=step,
                              summary=Summary(value=[Summary.Value(tag=name,
                                                                   simple_value=row[k])]))
                chunks.append(_record(event.SerializeToString()))
        (folder / f"events.out.tfevents.{int(1e9) + run}.{socket.gethostname()}").write_bytes(
            b"".join(chunks))
    return runs * tags * steps


def _dist_ft(root: Path) -> tuple[float, int]:
    from dist_ft.logs.aggregate import STATS, aggregate
    from dist_ft.logs.runs import load_members

    start = time.perf_counter()
    members, common = load_members([root])
    aggregate(members, ["all"], None, list(STATS), "intersection", common)
    return time.perf_counter() - start, sum(m.run.points_read for m in members)


def _tbparse(root: Path) -> tuple[float, int]:
    from tbparse import SummaryReader

    start = time.perf_counter()
    frame = SummaryReader(str(root), extra_columns={"dir_name"}).scalars
    return time.perf_counter() - start, len(frame)


def bench_aggregate(data: Path, runs: int = 4, tags: int = 10, steps: int = 25_000,
                    repeats: int = 3) -> dict[str, Any]:
    """Make (or reuse) the event files, then time both readers alternately."""
    expected = runs * tags * steps
    marker = data / f"made_{runs}x{tags}x{steps}"
    if not marker.exists():
        started = time.perf_counter()
        make_event_files(data, runs, tags, steps)
        marker.write_text(f"{time.perf_counter() - started:.1f} s\n")
    size = sum(p.stat().st_size for p in data.rglob("events.out.tfevents.*"))
    try:
        import tbparse  # noqa: F401

        have_tbparse = True
    except ImportError:
        have_tbparse = False
    ours: list[float] = []
    theirs: list[float] = []
    for _ in range(repeats):
        seconds, points = _dist_ft(data)
        if points != expected:
            raise RuntimeError(f"dist-ft read {points} points, expected {expected}")
        ours.append(seconds)
        if have_tbparse:
            seconds, rows = _tbparse(data)
            if rows != expected:
                raise RuntimeError(f"tbparse read {rows} points, expected {expected}")
            theirs.append(seconds)
    result: dict[str, Any] = {
        "events": expected, "files_mib": round(size / 2**20, 1), "repeats": repeats,
        "dist_ft_s": {"median": statistics.median(ours), "min": min(ours), "max": max(ours)},
        "dist_ft_events_per_s": expected / statistics.median(ours),
    }
    if theirs:
        result.update(
            tbparse_s={"median": statistics.median(theirs), "min": min(theirs),
                       "max": max(theirs)},
            tbparse_events_per_s=expected / statistics.median(theirs),
            ratio=statistics.median(theirs) / statistics.median(ours),
            ratio_range=[min(t / o for t, o in zip(theirs, ours, strict=True)),
                         max(t / o for t, o in zip(theirs, ours, strict=True))],
        )
    else:
        result["tbparse"] = "not installed: pip install -e '.[bench]'"
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [f"{result['events']:,} scalar events, {result['files_mib']} MiB of event files, "
             f"median of {result['repeats']} alternating runs", "",
             "| reader | seconds (median, min-max) | events/s |", "|---|---:|---:|"]
    o = result["dist_ft_s"]
    lines.append(f"| dist-ft: read + aggregate (6 stats) | {o['median']:.2f} "
                 f"({o['min']:.2f}-{o['max']:.2f}) | {result['dist_ft_events_per_s']:,.0f} |")
    if "tbparse_s" in result:
        t = result["tbparse_s"]
        lines.append(f"| tbparse: read only | {t['median']:.2f} ({t['min']:.2f}-{t['max']:.2f})"
                     f" | {result['tbparse_events_per_s']:,.0f} |")
        lo, hi = result["ratio_range"]
        lines += ["", f"**dist-ft is {result['ratio']:.1f}x faster** (per pair: {lo:.1f}x-"
                      f"{hi:.1f}x)"]
    else:
        lines += ["", f"tbparse: {result['tbparse']}"]
    return "\n".join(lines)
