"""One call from event-file trees to OUT: read, group, aggregate, write every output.

What ``dist-ft aggregate`` runs, and what a sweep's aggregation job runs after its array.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dist_ft.logs.aggregate import STATS, aggregate
from dist_ft.logs.outputs import write_csv, write_event_dirs, write_plots, write_summary
from dist_ft.logs.runs import MARKER, load_members


def aggregate_runs(runs: Sequence[str | Path], out: str | Path,
                   group_by: Sequence[str] = ("run",), tags: Sequence[str] | None = None,
                   stats: Sequence[str] = STATS, align: str = "intersection",
                   plot: Sequence[str] | None = None, verify_crc: bool = True,
                   ) -> dict[str, Any]:
    """Aggregate the scalars below ``runs`` into ``out``; returns ``summary.json``'s content.

    Args:
        plot: tag globs to plot; None for the defaults, ``[]`` for no plots.

    Raises:
        FileNotFoundError: a run folder is missing or holds no event file.
        ValueError: an unknown statistic or alignment, a group key a run lacks, or no tag
            matched.
    """
    started = time.perf_counter()
    members, root = load_members(list(runs), verify_crc=verify_crc)
    read_s = time.perf_counter() - started
    results = aggregate(members, list(group_by), list(tags) if tags else None, list(stats),
                        align, root)
    aggregated_s = time.perf_counter() - started
    if not results:
        raise ValueError("no scalar matched: check --tags "
                         f"({', '.join(tags or ['*'])}) against the runs' tags")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("dist-ft aggregate output: not a run\n")
    rows = write_csv(results, out / "scalars.csv")
    write_event_dirs(results, out / "tb")
    plots = [] if plot is not None and not list(plot) else write_plots(
        results, out / "plots", list(plot) if plot else None)
    return write_summary(results, out / "summary.json", {
        "runs": [str(r) for r in runs], "out": str(out), "group_by": list(group_by),
        "align": align, "stats": list(stats), "members": len(members),
        "groups_found": len({r.group for r in results}),
        "tags_found": len({r.tag for r in results}),
        "rows": rows, "plots": [str(p) for p in plots],
        "points_read": sum(m.run.points_read for m in members),
        "problems": [p for m in members for p in m.run.problems],
        "seconds": {"read": round(read_s, 3), "read_and_aggregate": round(aggregated_s, 3),
                    "total": round(time.perf_counter() - started, 3)},
    })
