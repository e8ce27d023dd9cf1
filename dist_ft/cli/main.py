"""``dist-ft`` entry point: dispatches to one module per subcommand.

Exit codes: :mod:`dist_ft.exitcodes`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence

from dist_ft import __version__, console, exitcodes
from dist_ft.cli import aggregate as aggregate_cmd
from dist_ft.cli import bench as bench_cmd
from dist_ft.cli import data as data_cmd
from dist_ft.cli import eval as eval_cmd
from dist_ft.cli import export as export_cmd
from dist_ft.cli import jobs as jobs_cmd
from dist_ft.cli import plan as plan_cmd
from dist_ft.cli import predict as predict_cmd
from dist_ft.cli import recipes as recipes_cmd
from dist_ft.cli import submit as submit_cmd
from dist_ft.cli import train as train_cmd
from dist_ft.cluster import forbid_world_writable
from dist_ft.config.errors import ConfigError

SUBCOMMANDS = (plan_cmd, train_cmd, eval_cmd, export_cmd, data_cmd, submit_cmd, jobs_cmd,
               aggregate_cmd, bench_cmd, predict_cmd, recipes_cmd)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; ``(default: X)`` after an option's help where the
    default says something (not None, False or empty) and the help does not name it yet."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text, default = action.help or "", action.default
        if (default is None or default is False or default == argparse.SUPPRESS
                or default in ("", [], ()) or "default" in text.lower()
                or isinstance(action, argparse._CountAction)  # -v: "default: 0" says nothing
                or not (action.option_strings or action.nargs in ("?", "*"))):
            return action.help
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


VERBOSE_HELP = "more output: dist-ft's debug lines and other libraries' INFO; -vv: all debug"
QUIET_HELP = "warnings and errors only, no progress"


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """Every parser below ``parser`` (subcommands, their subcommands ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases: once
                yield child
                yield from _parsers(child)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand registered."""
    parser = argparse.ArgumentParser(
        prog="dist-ft", formatter_class=HelpFormatter,
        description="Fine-tune torchvision models with Accelerate + DeepSpeed, on one machine "
        "or many SLURM nodes.",
    )
    parser.add_argument("--version", action="version", version=f"dist-ft {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help=VERBOSE_HELP)
    parser.add_argument("-q", "--quiet", action="store_true", help=QUIET_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    # Defaults in every help, and -v/-q after the subcommand too (`dist-ft train R -q`). Their
    # own dests: a subcommand's parse would overwrite the top level's values.
    for child in _parsers(parser):
        child.formatter_class = HelpFormatter
        child.add_argument("-v", "--verbose", action="count", dest="sub_verbose",
                           default=argparse.SUPPRESS, help=VERBOSE_HELP)
        child.add_argument("-q", "--quiet", action="store_true", dest="sub_quiet",
                           default=argparse.SUPPRESS, help=QUIET_HELP)
    return parser


def _verbosity(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int | None:
    """The command line's verbosity (-1 quiet, 0, 1, 2), or None when it sets none (the
    inherited ``DIST_FT_VERBOSITY`` then holds: a launcher's workers, a Slurm job)."""
    verbose = args.verbose + getattr(args, "sub_verbose", 0)
    quiet = args.quiet or getattr(args, "sub_quiet", False)
    if verbose and quiet:
        parser.error("-q/--quiet and -v/--verbose contradict each other")
    return -1 if quiet else min(verbose, 2) if verbose else None


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
    try:
        console.configure_logging(_verbosity(parser, args))
        console.progress_mode()  # a bad DIST_FT_PROGRESS: said now, not mid-run
    except ValueError as exc:
        parser.error(str(exc))
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
        if console.verbosity() > 0:
            raise
        print(f"dist-ft {args.command}: error: {exc}", file=sys.stderr)
        return exitcodes.FAILED


if __name__ == "__main__":
    sys.exit(main())
