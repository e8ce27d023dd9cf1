"""``dist-ft bench SUITE``: measured figures, printed as markdown, ``--json`` for tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SMOKE = "chestxray14_smoke"  # a shipped name: works from any folder and a wheel install
EXAMPLES = """\
examples:
  dist-ft bench trainer --json                          # dist-ft train vs the tutorial loop
  dist-ft bench memory                                  # DDP/ZeRO-1/2/3/FSDP2 bytes vs formulas
  dist-ft bench memory --adapters                       # LoRA vs full: state, checkpoint, time
  dist-ft bench freeze                                  # head / last blocks / full
  dist-ft bench optimizer                               # AdamW kernels: loop, foreach, fused
  dist-ft bench scaling --processes 1 2                 # this machine (1 process per GPU)
  dist-ft bench scaling --nodes 1 2 4 --gpus-per-node 8 --work /shared/bench \\
      --data /shared/bench/cxr14 --submit-arg=--partition=gpu   # nodes, via dist-ft submit
  dist-ft data synth /tmp/cxr_1024 --images 2000 --size 1024 --workers 2
  dist-ft data prepare /tmp/cxr_1024 --out /tmp/cxr_1024_cache --size 256 --workers 2
  dist-ft bench data /tmp/cxr_1024 --cache /tmp/cxr_1024_cache --json
  dist-ft bench aggregate                               # vs tbparse and EventAccumulator
  dist-ft bench aggregate --repeats 5 --aggregate-args="--group-by dir --stats mean"
  dist-ft bench eval --images 2000 --json               # dist-ft eval vs a plain loop
  dist-ft bench cli --repeats 5                         # start-up of commands without a model
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``bench`` and its suites."""
    p = sub.add_parser("bench", help="benchmarks: trainer overhead, input pipeline, memory, "
                       "freezing, scaling, log aggregation, evaluation",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    suites = p.add_subparsers(dest="suite", required=True, metavar="SUITE")
    data = suites.add_parser("data", help="PNG vs cache input pipeline; prepare vs PIL loop",
                             epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    data.add_argument("root", help="ChestX-ray14-layout folder with the PNGs")
    data.add_argument("--cache", required=True, help="a cache of ROOT (dist-ft data prepare)")
    data.add_argument("--images", type=int, default=256,
                      help="images each run reads (the cache's first valid rows)")
    data.add_argument("--batch-size", type=int, default=32, help="loader batch size")
    data.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    data.add_argument("--image-size", type=int, default=224, help="side of the crops")
    data.add_argument("--repeats", type=int, default=3, help="alternating runs per pipeline")
    data.add_argument("--recipe", default="chestxray14_densenet121",
                      help="also time this recipe's model at its batch and input size, next to "
                      "the loader ('none' to skip)")
    data.add_argument("--model-steps", type=int, default=3,
                      help="timed training steps of the --recipe model")
    _add_output_args(data)
    data.set_defaults(run=run_data)
    from dist_ft.bench.suites import AGGREGATE_RUNS, AGGREGATE_STEPS, AGGREGATE_TAGS

    agg = suites.add_parser("aggregate", help="dist-ft aggregate as users run it vs tbparse and "
                            "TensorBoard's EventAccumulator: wall time and peak RSS of fresh "
                            "processes on the same event files",
                            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    agg.add_argument("--data", type=Path, default=Path("runs/bench/tb_aggregate"),
                     help="folder for the event files, written once with torch's SummaryWriter "
                     "and reused while its manifest records the same shape (default "
                     "runs/bench/tb_aggregate)")
    agg.add_argument("--runs", type=int, default=AGGREGATE_RUNS, help="run folders")
    agg.add_argument("--tags", type=int, default=AGGREGATE_TAGS, help="scalar tags per run")
    agg.add_argument("--steps", type=int, default=AGGREGATE_STEPS, help="points per tag")
    agg.add_argument("--repeats", type=int, default=3,
                     help="runs of each command, alternating")
    agg.add_argument("--aggregate-args", default="", metavar="ARGS",
                     help="extra dist-ft aggregate flags, one shell-quoted string; write it "
                     "with = when it starts with -: --aggregate-args=\"--stats mean\"")
    agg.add_argument("--work", type=Path,
                     help="folder for each dist-ft aggregate output (default: a temporary "
                     "folder; each output is removed once measured)")
    _add_output_args(agg)
    agg.set_defaults(run=run_aggregate)


    _add_trainer(suites)
    _add_memory(suites)
    _add_freeze(suites)
    _add_scaling(suites)
    _add_optimizer(suites)
    _add_eval(suites)
    _add_cli(suites)


def _add_cli(suites: argparse._SubParsersAction) -> None:
    from dist_ft.bench.suites import CLI_COMMANDS

    p = _suite(suites, "cli", "wall time of the commands that need no model (fresh processes), "
               "next to python alone and import torch")
    p.add_argument("--commands", nargs="+", choices=list(CLI_COMMANDS), default=None,
                   metavar="NAME", help=f"only these, of: {', '.join(CLI_COMMANDS)}")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each, alternating")
    p.add_argument("--data", type=Path,
                   help="ChestX-ray14 metadata folder for `data stats` (default: the repo's "
                   "copy of the real metadata, else a synthetic one of the same size)")
    _add_output_args(p)
    p.set_defaults(run=run_cli_bench)


def _add_eval(suites: argparse._SubParsersAction) -> None:
    p = _suite(suites, "eval", "images/s of dist-ft eval vs a plain scoring loop; bootstrap time")
    p.add_argument("recipe", nargs="?", default=SMOKE, help=f"recipe (default {SMOKE})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--data", type=Path, default=Path("runs/bench/cxr14_synth"),
                   help="synthetic twin to score, made once at the recipe's load size")
    p.add_argument("--images", type=int, default=600, help="images of the twin")
    p.add_argument("--split", choices=("train", "val", "test"), default="val",
                   help="split to score")
    p.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating")
    p.add_argument("--resamples", type=int, default=1000, help="dist-ft eval --resamples")
    p.add_argument("--work", type=Path, help="folder for the run and reports")
    p.add_argument("--no-bootstrap", action="store_true",
                   help="skip the 25,596 x 14 bootstrap timing")
    _add_output_args(p)
    p.set_defaults(run=run_eval)


def _add_optimizer(suites: argparse._SubParsersAction) -> None:
    from dist_ft.bench.suites import OPTIMIZER_MODELS as DEFAULT_MODELS

    p = _suite(suites, "optimizer", "AdamW step time per kernel: for_loop, foreach, fused")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="torchvision model names")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each kernel")
    _add_output_args(p)
    p.set_defaults(run=run_optimizer)


def _add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.add_argument("--out", type=Path, help="also write the JSON here")


def _add_run_args(p: argparse.ArgumentParser, steps: int, repeats: int) -> None:
    p.add_argument("recipe", nargs="?", default=SMOKE, help=f"recipe (default {SMOKE})")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides")
    p.add_argument("--data", type=Path, default=Path("runs/bench/cxr14_synth"),
                   help="synthetic twin the runs read, made once at the recipe's load size "
                   "(default runs/bench/cxr14_synth); 'recipe' keeps the recipe's data.root")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=10, help="steps left out of the rate")
    p.add_argument("--every", type=int, default=5, help="logging window in steps")
    p.add_argument("--repeats", type=int, default=repeats, help="runs per loop / size")
    _add_output_args(p)


def _suite(suites: argparse._SubParsersAction, name: str,
           help_text: str) -> argparse.ArgumentParser:
    return suites.add_parser(name, help=help_text, epilog=EXAMPLES,
                             formatter_class=argparse.RawDescriptionHelpFormatter)


def _add_trainer(suites: argparse._SubParsersAction) -> None:
    p = _suite(suites, "trainer", "samples/s of dist-ft train vs the tutorial Accelerate loop, "
               "under DDP and ZeRO-2 (or ZeRO-1/3, FSDP2); start-up and engine rebuilds")
    _add_run_args(p, steps=45, repeats=3)
    p.set_defaults(warmup=5)
    p.add_argument("--processes", type=int, default=2, help="processes per run")
    p.add_argument("--backends", nargs="+", default=["ddp", "zero2"],
                   choices=["ddp", "zero1", "zero2", "zero3", "fsdp"],
                   help="backends to time (fsdp has no tutorial loop: its dist-ft rate is "
                   "compared with the other backends' in the same run)")
    p.add_argument("--no-stage-changes", action="store_true",
                   help="skip the three-stage run that times engine rebuilds")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE[,...]",
                   help="also time dist-ft with these overrides, alternating with the others "
                   "(an A/B), e.g. for_loop:optim.implementation=for_loop")
    p.set_defaults(run=run_trainer)


def _add_memory(suites: argparse._SubParsersAction) -> None:
    from dist_ft.bench.suites import MEMORY_BACKENDS as BACKENDS
    from dist_ft.bench.suites import MEMORY_MODELS as DEFAULT_MODELS

    p = _suite(suites, "memory", "per-rank parameter/gradient/optimizer bytes under DDP, "
               "ZeRO-1/2/3 and FSDP2 vs the ZeRO formulas (FSDP2: 16P/N)")
    p.add_argument("--models", nargs="+",
                   help=f"torchvision model names (default {' '.join(DEFAULT_MODELS)}; with "
                   "--adapters: vit_b_16 vit_l_16, counted by the plan engine)")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS),
                   help="backends to measure")
    p.add_argument("--processes", type=int, default=2, help="processes per run")
    p.add_argument("--image-size", type=int, default=224, help="input side")
    p.add_argument("--adapters", action="store_true",
                   help="LoRA r=8 (every encoder block's MLP Linear layers + head) vs full "
                   "fine-tuning: optimizer state per rank and checkpoint bytes by formula, "
                   "measured under ZeRO-2 for --measure-models; step time head/LoRA/full")
    p.add_argument("--measure-models", nargs="*", default=["vit_b_16"],
                   help="with --adapters: models measured by a real ZeRO-2 run and checkpoint "
                   "(none: formulas only)")
    p.add_argument("--time-model", default="vit_b_16",
                   help="with --adapters: model whose step time is compared ('none' to skip)")
    p.add_argument("--batch-size", type=int, default=4, help="with --adapters: timed batch")
    p.add_argument("--steps", type=int, default=3, help="with --adapters: timed steps per plan")
    _add_output_args(p)
    p.set_defaults(run=run_memory)


def _add_freeze(suites: argparse._SubParsersAction) -> None:
    from dist_ft.bench.suites import FREEZE_MODELS as DEFAULT_MODELS
    from dist_ft.bench.suites import FREEZE_PLANS as PLANS

    p = _suite(suites, "freeze", "step time and memory: head-only, last blocks, full training")
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                   help="torchvision model names")
    p.add_argument("--plans", nargs="+", choices=list(PLANS), default=list(PLANS),
                   help="what trains: the head, the last blocks, or everything")
    p.add_argument("--batch-size", type=int, default=8, help="images per step")
    p.add_argument("--image-size", type=int, default=224, help="input side")
    p.add_argument("--steps", type=int, default=3, help="timed steps per plan")
    _add_output_args(p)
    p.set_defaults(run=run_freeze)


def _add_scaling(suites: argparse._SubParsersAction) -> None:
    p = _suite(suites, "scaling", "samples/s at 1..N processes, locally or on nodes via "
               "dist-ft submit")
    _add_run_args(p, steps=40, repeats=2)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                   help="local process counts (one per GPU on a GPU machine)")
    p.add_argument("--nodes", type=int, nargs="+", default=[],
                   help="node counts: each size is one `dist-ft submit --wait` job")
    p.add_argument("--gpus-per-node", type=int, default=0,
                   help="with --nodes: processes per node (0: one CPU process per node)")
    p.add_argument("--submit-arg", action="append", default=[], metavar="FLAG",
                   help="extra dist-ft submit flag, repeatable (e.g. --submit-arg=--partition=gpu)")
    p.add_argument("--work", type=Path,
                   help="folder for the run directories (shared by the nodes with --nodes)")
    p.set_defaults(run=run_scaling)


def _data_arg(args: argparse.Namespace) -> Path | None:
    return None if str(args.data) == "recipe" else args.data


def _recipe_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The recipe and overrides; a lone ``KEY=VALUE`` in the recipe slot is an override."""
    if "=" in args.recipe and not Path(args.recipe).is_file():
        return SMOKE, [args.recipe, *args.overrides]
    return args.recipe, list(args.overrides)


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
                        workers=args.workers, image_size=args.image_size, repeats=args.repeats,
                        recipe=None if args.recipe == "none" else args.recipe,
                        model_steps=args.model_steps)
    return _emit(result, args, format_table(result))


def run_aggregate(args: argparse.Namespace) -> int:
    """``bench aggregate``."""
    import shlex

    from dist_ft import exitcodes
    from dist_ft.bench.aggregate import bench_aggregate, format_table

    try:
        extra = shlex.split(args.aggregate_args)
    except ValueError as exc:
        raise ValueError(f"--aggregate-args {args.aggregate_args!r}: {exc}") from exc
    result = bench_aggregate(args.data, args.runs, args.tags, args.steps, args.repeats,
                             extra, args.work)
    code = _emit(result, args, format_table(result))
    # Different point counts: the commands read different data, so the figures mean nothing.
    return code if result["points_agree"] else exitcodes.FAILED


def run_trainer(args: argparse.Namespace) -> int:
    """``bench trainer``."""
    from dist_ft.bench.trainer import bench_trainer, format_table
    from dist_ft.config.errors import ConfigError

    recipe, overrides = _recipe_args(args)
    variants = {}
    for spec in args.variant:
        name, _, values = spec.partition(":")
        if not name or not values:
            raise ConfigError([f"--variant {spec!r}: use NAME:KEY=VALUE[,KEY=VALUE...]"])
        variants[name] = values.split(",")
    result = bench_trainer(recipe, _data_arg(args), overrides, args.processes,
                           args.steps, args.warmup, args.every, args.repeats,
                           tuple(args.backends), variants, not args.no_stage_changes)
    return _emit(result, args, format_table(result))


def run_memory(args: argparse.Namespace) -> int:
    """``bench memory``."""
    from dist_ft.bench import memory

    if args.adapters:
        result = memory.bench_adapters(
            args.models or memory.ADAPTER_MODELS,
            [m for m in args.measure_models if m != "none"],
            None if args.time_model == "none" else args.time_model, args.processes,
            args.image_size, args.batch_size, args.steps)
        return _emit(result, args, memory.format_adapters_table(result))
    result = memory.bench_memory(args.models or memory.DEFAULT_MODELS, args.backends,
                                 args.processes, args.image_size)
    return _emit(result, args, memory.format_table(result))


def run_freeze(args: argparse.Namespace) -> int:
    """``bench freeze``."""
    from dist_ft.bench.freeze import bench_freeze, format_table

    result = bench_freeze(args.models, args.plans, args.batch_size, args.image_size, args.steps)
    return _emit(result, args, format_table(result))


def run_scaling(args: argparse.Namespace) -> int:
    """``bench scaling``."""
    from dist_ft.bench.scaling import bench_scaling, format_table

    recipe, overrides = _recipe_args(args)
    result = bench_scaling(recipe, _data_arg(args), overrides, tuple(args.processes),
                           tuple(args.nodes), args.gpus_per_node, args.submit_arg, args.steps,
                           args.warmup, args.every, args.repeats, args.work)
    return _emit(result, args, format_table(result))


def run_eval(args: argparse.Namespace) -> int:
    """``bench eval``."""
    from dist_ft.bench.eval_speed import bench_eval, format_table

    recipe, overrides = _recipe_args(args)
    result = bench_eval(recipe, args.data, overrides, images=args.images, split=args.split,
                        repeats=args.repeats, resamples=args.resamples, work=args.work,
                        bootstrap=not args.no_bootstrap)
    return _emit(result, args, format_table(result))


def run_optimizer(args: argparse.Namespace) -> int:
    """``bench optimizer``."""
    from dist_ft.bench.optimizer import bench_optimizer, format_table

    result = bench_optimizer(args.models, args.repeats)
    return _emit(result, args, format_table(result))


def run_cli_bench(args: argparse.Namespace) -> int:
    """``bench cli``."""
    from dist_ft.bench.cli_speed import bench_cli, format_table

    result = bench_cli(args.commands, args.repeats, args.data)
    return _emit(result, args, format_table(result))
