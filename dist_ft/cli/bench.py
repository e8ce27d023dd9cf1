"""``dist-ft bench SUITE``: measured figures, printed as markdown, ``--json`` for tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXAMPLES = """\
examples:
  dist-ft data synth /tmp/cxr_1024 --images 2000 --size 1024 --workers 2
  dist-ft data prepare /tmp/cxr_1024 --out /tmp/cxr_1024_cache --size 256 --workers 2
  dist-ft bench data /tmp/cxr_1024 --cache /tmp/cxr_1024_cache --json
  dist-ft bench aggregate --data /tmp/tb_bench          # 1,000,000 scalars vs tbparse
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its suites."""
    p = sub.add_parser("bench", help="benchmarks (input pipeline, log aggregation)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    suites = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
    data = suites.add_parser("data", help="PNG vs cache input pipeline; prepare vs PIL loop",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("root", help="ChestX-ray14-layout folder with the PNGs")
    data.add_argument("--cache", required=True, help="a cache of ROOT (dist-ft data prepare)")
    data.add_argument("--images", type=int, default=256)
    data.add_argument("--batch-size", type=int, default=32)
    data.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    data.add_argument("--image-size", type=int, default=224)
    data.add_argument("--repeats", type=int, default=3)
    data.add_argument("--json", action="store_true")
    data.add_argument("--out", type=Path, help="also write the JSON here")
    data.set_defaults(run=run_data)
    agg = suites.add_parser("aggregate", help="read + aggregate TensorBoard scalars vs tbparse",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    agg.add_argument("--data", type=Path, required=True,
                     help="folder for the generated event files (made once, then reused)")
    agg.add_argument("--runs", type=int, default=4)
    agg.add_argument("--tags", type=int, default=10)
    agg.add_argument("--steps", type=int, default=25_000)
    agg.add_argument("--repeats", type=int, default=3)
    agg.add_argument("--json", action="store_true")
    agg.add_argument("--out", type=Path, help="also write the JSON here")
    agg.set_defaults(run=run_aggregate)


def _emit(result: dict, args: argparse.Namespace, table: str) -> int:
    """Write the result to ``--out`` if asked; print JSON (``--json``) or the table."""
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(table)
    return 0


def run_data(args: argparse.Namespace) -> int:
    """``bench data``."""
    from dist_ft.bench.data import bench_data, format_table

    result = bench_data(args.root, args.cache, images=args.images, batch_size=args.batch_size,
                        workers=args.workers, image_size=args.image_size, repeats=args.repeats)
    return _emit(result, args, format_table(result))


def run_aggregate(args: argparse.Namespace) -> int:
    """``bench aggregate``."""
    from dist_ft.bench.aggregate import bench_aggregate, format_table

    result = bench_aggregate(args.data, args.runs, args.tags, args.steps, args.repeats)
    return _emit(result, args, format_table(result))
