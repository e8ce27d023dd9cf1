"""One call from event-file trees to OUT: read, group, aggregate, write every output.

What ``dist-ft aggregate`` runs, and what a sweep's aggregation job runs after its array.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_ft.logs.aggregate import DEFAULT_STATS, Member, aggregate, stage_boundaries
from dist_ft.logs.outputs import write_outputs, write_summary
from dist_ft.logs.runs import MARKER, load_members


def default_workers() -> int:
    """The CPUs this process may use (a SLURM job's share, not the whole node's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def check_output_place(runs: Sequence[str | Path], out: str | Path) -> None:
    """Refuse an output folder that is one of the inputs, lies inside one, or holds one.

    Outputs never go into inputs: an output inside an input would be read back as part of it
    (its ``tb/`` looks like a run), and an output above an input would hide it. (Aggregating
    still marks OUT, :data:`~dist_ft.logs.runs.MARKER`, so an output placed inside a run
    folder by older versions is never read back.) A sweep's aggregation therefore reads the
    sweep's run folders, and writes ``ROOT/aggregate`` beside them.

    Raises:
        ValueError: naming OUT and the input, and what to do instead.
    """
    target = Path(out).expanduser().resolve()
    for run in runs:
        source = Path(run).expanduser().resolve()
        if source == target:
            raise ValueError(
                f"--out {out} is the input {run} ({source}): the outputs would mix with its "
                f"files; choose another folder, e.g. --out {source}-aggregate")
        if target in source.parents:
            raise ValueError(
                f"--out {out} ({target}) holds the input {run} ({source}): marking it as an "
                "output would hide that input from later aggregations; choose a folder that "
                "is not above an input")
        if source in target.parents:
            raise ValueError(
                f"--out {out} ({target}) is inside the input {run} ({source}): outputs never go "
                f"into inputs; choose a folder outside it, e.g. --out {source}-aggregate "
                f"(or aggregate the run folders inside it: dist-ft aggregate {run}/RUN ... "
                f"--out {out})")


def _nothing_readable(members: list[Member]) -> str | None:
    """Why no scalar was read at all when that is for empty or corrupt event files (None when
    some point was read, or no file was damaged: then the tags are what failed to match)."""
    if any(m.run.points_read for m in members) or not any(m.run.unreadable for m in members):
        return None
    listed = "\n  ".join(p for m in members for p in m.run.problems)
    return (f"no scalar could be read from any event file; damaged files:\n  {listed}\n"
            "remove or replace them (a writer killed before its first flush leaves an empty "
            "file; a file copied in from elsewhere may not be an event file)")


def aggregate_runs(runs: Sequence[str | Path], out: str | Path,
                   group_by: Sequence[str] = ("run",), tags: Sequence[str] | None = None,
                   stats: Sequence[str] = DEFAULT_STATS, align: str = "intersection",
                   plot: Sequence[str] | None = None, verify_crc: bool = True,
                   tensorboard: bool = False, workers: int | None = None,
                   ) -> dict[str, Any]:
    """Aggregate the scalars below ``runs`` into ``out``; returns ``summary.json``'s content.

    Args:
        plot: tag globs to plot; None for the defaults, ``[]`` for no plots.
        tensorboard: also write ``OUT/tb/<group>/<stat>/`` event files.
        workers: processes reading the event folders and writing large outputs (None: every
            CPU this process may use, :func:`default_workers`; 1: none).

    Raises:
        FileNotFoundError: a run folder is missing or holds no event file.
        ValueError: OUT is (or holds) an input, every event file is empty or corrupt (each
            named, with why), an unknown statistic or alignment, a group key a run lacks, or
            no tag matched. Nothing is written then.
    """
    started = time.perf_counter()
    out = Path(out)
    check_output_place(runs, out)
    workers = default_workers() if workers is None else max(1, workers)
    members, root = load_members(list(runs), workers=workers, verify_crc=verify_crc)
    read_s = time.perf_counter() - started
    unreadable = _nothing_readable(members)
    if unreadable:
        raise ValueError(unreadable)
    results = aggregate(members, list(group_by), list(tags) if tags else None, list(stats),
                        align, root)
    aggregated_s = time.perf_counter() - started
    if not results:
        raise ValueError("no scalar matched: check --tags "
                         f"({', '.join(tags or ['*'])}) against the runs' tags")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("dist-ft aggregate output: not a run\n")
    plots = None if plot is None else list(plot)
    boundaries = stage_boundaries(members, list(group_by), root) if plots != [] else None
    rows, plotted, event_files = write_outputs(results, out, plots, boundaries, tensorboard,
                                               workers)
    outputs_s = time.perf_counter() - started - aggregated_s
    return write_summary(results, out / "summary.json", {
        "runs": [str(r) for r in runs], "out": str(out), "group_by": list(group_by),
        "align": align, "stats": list(stats), "members": len(members),
        "groups_found": len({r.group for r in results}),
        "tags_found": len({r.tag for r in results}),
        "rows": rows, "plots": [str(p) for p in plotted],
        "tensorboard": str(out / "tb") if event_files else None,
        "points_read": sum(m.run.points_read for m in members),
        "problems": [p for m in members for p in m.run.problems],
        "workers": workers,
        "seconds": {"read": round(read_s, 3), "read_and_aggregate": round(aggregated_s, 3),
                    "outputs": round(outputs_s, 3),
                    "total": round(time.perf_counter() - started, 3)},
    })
