"""``dist-ft aggregate``: TensorBoard scalars over ranks, requeued segments, seeds and sweeps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  dist-ft aggregate runs/chestxray14_smoke --out runs/agg            # all ranks of one run
  dist-ft aggregate runs/sweep --out runs/sweep-agg --group-by optim.lr \\
      --tags 'val/*' 'train/loss' --align union                     # over seeds, per lr
  dist-ft aggregate runs/a runs/b --out runs/ab --group-by all --stats mean,std,count

Writes OUT/scalars.csv (group,tag,step,stat,value,members,label,since_stage: label is the tag
in words, since_stage the freeze stage an lr/ tag's optimizer group has trained from),
OUT/tb/<group>/<stat>/ (open with tensorboard --logdir OUT/tb), OUT/summary.json (per group and
tag the final value, and the best for metrics: losses, AUROC, accuracy, F1) and OUT/plots/*.png
(mean +- std per group; every learning rate in lr.png; dotted lines at freeze-stage changes).
OUT may not be, hold or lie inside an input folder.
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``aggregate``."""
    p = sub.add_parser(
        "aggregate", help="aggregate TensorBoard scalars across ranks, segments, seeds, sweeps",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read every event file below the RUN_DIRs (no TensorFlow, every point "
        "kept, requeued segments merged as TensorBoard shows them), group them, and compute "
        "per-step statistics.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders, sweeps, any tree")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--group-by", nargs="+", default=["run"], metavar="KEY",
                   help="run (default: all ranks of a run), all, dir (each event folder), or "
                   "recipe keys such as optim.lr trainer.seed")
    p.add_argument("--tags", nargs="+", metavar="GLOB", help="only these tags (globs)")
    p.add_argument("--stats", default="mean,min,max,std,median,count",
                   help="comma-separated: mean,min,max,std,median,count")
    p.add_argument("--align", choices=("intersection", "union"), default="intersection",
                   help="steps every member has (default), or every step any member has")
    p.add_argument("--plot", nargs="*", metavar="GLOB",
                   help="tags to plot (default: losses and mean AUROC); none: --plot alone")
    p.add_argument("--no-verify", action="store_true", help="skip record checksums")
    p.add_argument("--json", action="store_true", help="print summary.json to stdout")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Aggregate and write the outputs."""
    from dist_ft import exitcodes
    from dist_ft.jsonio import dumps
    from dist_ft.logs.report import aggregate_runs, check_output_place

    try:  # a bad --out is a usage error: refused before anything is read or written
        check_output_place(args.runs, args.out)
    except ValueError as exc:
        print(f"dist-ft aggregate: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    stats = [s.strip() for s in args.stats.split(",") if s.strip()]
    doc = aggregate_runs(args.runs, args.out, args.group_by, args.tags, stats, args.align,
                         args.plot, verify_crc=not args.no_verify)
    log = sys.stderr if args.json else sys.stdout
    print(f"{doc['points_read']:,} points from {doc['members']} event folder(s) in "
          f"{doc['seconds']['read']:.2f} s; {doc['groups_found']} group(s) x "
          f"{doc['tags_found']} tag(s) -> {doc['rows']:,} rows in {args.out}/scalars.csv; "
          f"TensorBoard: tensorboard --logdir {args.out}/tb; {len(doc['plots'])} plot(s)",
          file=log)
    for problem in doc["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        print(dumps(doc))
    return 0
