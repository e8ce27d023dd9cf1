"""``dist-ft`` entry point: dispatches to one module per subcommand.

Exit codes: :mod:`dist_ft.exitcodes`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from dist_ft import __version__, exitcodes
from dist_ft.cli import aggregate as aggregate_cmd
from dist_ft.cli import bench as bench_cmd
from dist_ft.cli import data as data_cmd
from dist_ft.cli import eval as eval_cmd
from dist_ft.cli import export as export_cmd
from dist_ft.cli import jobs as jobs_cmd
from dist_ft.cli import plan as plan_cmd
from dist_ft.cli import predict as predict_cmd
from dist_ft.cli import submit as submit_cmd
from dist_ft.cli import train as train_cmd
from dist_ft.cluster import forbid_world_writable
from dist_ft.config.errors import ConfigError

SUBCOMMANDS = (plan_cmd, train_cmd, eval_cmd, export_cmd, data_cmd, submit_cmd, jobs_cmd,
               aggregate_cmd, bench_cmd, predict_cmd)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dist-ft",
        description="Fine-tune torchvision models with Accelerate + DeepSpeed, on one machine "
        "or many SLURM nodes.",
    )
    parser.add_argument("--version", action="version", version=f"dist-ft {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``dist-ft`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`submit CONFIG --nodes 2 optim.lr=1e-3`);
    # argparse stops collecting a positional list at the first option.
    if extra and hasattr(args, "overrides") and not any(a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    forbid_world_writable()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.run(args)
    except ConfigError as exc:
        print(f"dist-ft {args.command}: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    except BrokenPipeError:
        # The reader (head, jq -e ...) went away: stop quietly, as other CLI tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return exitcodes.FAILED
    except (ValueError, RuntimeError, OSError) as exc:
        # Data and weights errors (MetadataError, ImageError, CacheError, WeightsError) name
        # the culprit in their message; a traceback would bury it.
        if args.verbose:
            raise
        print(f"dist-ft {args.command}: error: {exc}", file=sys.stderr)
        return exitcodes.FAILED


if __name__ == "__main__":
    sys.exit(main())
