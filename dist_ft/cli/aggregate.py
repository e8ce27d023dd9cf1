"""``dist-ft aggregate``: TensorBoard scalars over ranks, requeued segments, seeds and sweeps."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# dist_ft.logs.aggregate's DEFAULT_STATS and STATS (not imported: it loads numpy, and the
# parser is built for every dist-ft command)
DEFAULT_STATS = "mean,std,min,max"
STATS = "mean,min,max,std,median,count"

EXAMPLES = """\
examples:
  dist-ft aggregate runs/chestxray14_smoke --out runs/agg            # all ranks of one run
  dist-ft aggregate runs/sweep --out runs/sweep-agg --group-by optim.lr \\
      --tags 'val/*' 'train/loss' --align union                     # over seeds, per lr
  dist-ft aggregate runs/a runs/b --out runs/ab --group-by all --stats mean,median \\
      --tensorboard                              # and event files: tensorboard --logdir runs/ab/tb

Writes OUT/scalars.csv, a row per group, tag and step, a column per statistic:
  group,tag,step,members,nonfinite,mean,std,min,max,label,since_stage
(members: values behind the point; nonfinite: how many were NaN or inf, which make the
statistics NaN or inf there; values read back exactly; label: the tag in words, since_stage:
the freeze stage an lr/ tag's optimizer group has trained from), OUT/summary.json (per group
and tag the last finite value, the best finite one for metrics: losses, AUROC, accuracy, F1,
and the first non-finite step), OUT/plots/*.png (mean +- std per group; every learning rate in
lr.png; dotted lines at freeze-stage changes) and, with --tensorboard, OUT/tb/<group>/<stat>/.
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
    p.add_argument("--stats", default=DEFAULT_STATS,
                   help=f"comma-separated, a CSV column each, from {STATS} (count "
                   "equals the members column)")
    p.add_argument("--align", choices=("intersection", "union"), default="intersection",
                   help="steps every member has (default), or every step any member has")
    p.add_argument("--plot", nargs="*", metavar="GLOB",
                   help="tags to plot (default: losses, mean AUROC or accuracy, learning "
                   "rates; else the first 4 tags); no plots: --plot alone")
    p.add_argument("--tensorboard", action="store_true",
                   help="also write OUT/tb/<group>/<stat>/ event files (tensorboard --logdir "
                   "OUT/tb)")
    p.add_argument("--workers", type=int, metavar="N",
                   help="processes reading event folders and writing large outputs (default: "
                   "every CPU this process may use; 1: none)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip record checksums (faster)")
    p.add_argument("--json", action="store_true",
                   help="print summary.json to stdout (the other lines go to stderr)")
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
    if args.workers is not None and args.workers < 1:
        print(f"dist-ft aggregate: error: --workers {args.workers}: use 1 or more",
              file=sys.stderr)
        return exitcodes.USAGE
    stats = [s.strip() for s in args.stats.split(",") if s.strip()]
    doc = aggregate_runs(args.runs, args.out, args.group_by, args.tags, stats, args.align,
                         args.plot, verify_crc=not args.no_verify,
                         tensorboard=args.tensorboard, workers=args.workers)
    log = sys.stderr if args.json else sys.stdout
    seconds = doc["seconds"]
    print(f"{doc['points_read']:,} points from {doc['members']} event folder(s) in "
          f"{seconds['read']:.2f} s; {doc['groups_found']} group(s) x "
          f"{doc['tags_found']} tag(s) -> {doc['rows']:,} rows in {args.out}/scalars.csv, "
          f"{len(doc['plots'])} plot(s)"
          + (f", TensorBoard: tensorboard --logdir {doc['tensorboard']}"
             if doc["tensorboard"] else "")
          + f"; outputs {seconds['outputs']:.2f} s, total {seconds['total']:.2f} s", file=log)
    for problem in doc["problems"]:
        print(f"warning: {problem}", file=sys.stderr)
    if args.json:
        print(dumps(doc))
    return 0
