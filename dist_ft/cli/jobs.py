"""``dist-ft jobs``: the tasks of a submission with their states, progress and results."""

from __future__ import annotations

import argparse

EXAMPLES = """\
examples:
  dist-ft jobs runs/chestxray14_smoke            # a sweep's folder (or one run's output_dir)
  dist-ft jobs runs/chestxray14_smoke --json | jq '.tasks[] | {name, run_state}'
  dist-ft jobs runs/chestxray14_smoke --json | jq '.tasks[].segments[] | {start_step, world_size}'
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``jobs``."""
    p = sub.add_parser(
        "jobs", help="list a submission's tasks: state, last step, final metrics",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Reads ROOT/submission.json, each run's status.json, final/metrics.json "
        "and segments.jsonl (each start or resume: world size, nodes, job), and Slurm's job "
        "states.")
    p.add_argument("root", help="the folder `dist-ft submit` wrote submission.json to")
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON)."""
    from dist_ft.jsonio import dumps
    from dist_ft.launch.jobs import (
        aggregation_status,
        read_manifest,
        render_segments,
        render_table,
        task_rows,
    )

    manifest = read_manifest(args.root)
    rows = task_rows(manifest)
    aggregation = aggregation_status(manifest)
    if args.json:
        print(dumps({"root": args.root, "kind": manifest["kind"], "job_id": manifest["job_id"],
                     "cluster": manifest["cluster"], "tasks": rows, "aggregate": aggregation}))
        return 0
    from rich.console import Console

    console = Console(width=160)
    console.print(render_table(manifest, rows))
    if any(len(row["segments"]) > 1 for row in rows):  # resumed: where each part ran
        console.print(render_segments(rows))
    if aggregation:
        where = aggregation["out"]
        if aggregation["written"]:
            console.print(f"aggregated logs: {where}/summary.json, {where}/scalars.csv, "
                          f"tensorboard --logdir {where}/tb", soft_wrap=True)
        else:
            job = aggregation.get("job_id")
            console.print(f"aggregation pending: {where}"
                          + (f" (job {job}: {aggregation['scheduler_state']})" if job else
                             f" (run: dist-ft aggregate {args.root} --out {where} --group-by "
                             f"{' '.join(aggregation['group_by'])})"), soft_wrap=True)
    return 0
