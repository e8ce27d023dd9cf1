"""``dist-ft train``: run a recipe on 1..N processes (plain, torchrun, accelerate launch, srun)."""

from __future__ import annotations

import argparse
import os
import sys

from dist_ft import exitcodes
from dist_ft.config import load_recipe
from dist_ft.config.errors import ConfigError

EXAMPLES = """\
examples:
  dist-ft train configs/chestxray14_smoke.yaml                       # one process
  dist-ft train chestxray14_smoke        # a shipped recipe by name (dist-ft recipes list)
  accelerate launch --config_file launch/cpu_2proc.yaml -m dist_ft train \\
      configs/chestxray14_smoke.yaml trainer.zero_stage=3
  srun --nodes 2 --ntasks-per-node 4 dist-ft train RECIPE --resume auto   # one task per process
  dist-ft train configs/chestxray14_smoke.yaml --resume auto         # continue the last run
  dist-ft train RECIPE --resume auto --accept-change trainer.epochs trainer.epochs=20  # train on
  dist-ft train RECIPE --overwrite                  # a new run where one was (old one moved aside)

exit codes: 0 finished, 1 failed (also: another trainer holds output_dir), 2 bad recipe or
arguments (also: output_dir holds a run and neither --resume nor --overwrite was given, or the
checkpoint does not fit the recipe), 3 stopped on SIGUSR2/SIGTERM/SIGINT after writing a
checkpoint (after SIGUSR2 under Slurm the job has requeued itself)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    p = sub.add_parser(
        "train", help="fine-tune a model as a recipe says", epilog=EXAMPLES,
        description="Train under DDP or DeepSpeed ZeRO with the recipe's freeze plan; writes "
        "OUTPUT_DIR/{recipe.yaml,plan.json,status.json,tb/,checkpoints/,"
        "final/model.safetensors}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="RECIPE",
                   help="recipe YAML file, or a shipped recipe's name (dist-ft recipes list)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. optim.lr=1e-3 trainer.zero_stage=3")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="'auto': the newest intact checkpoint in output_dir (step 0 if none); "
                   "or a checkpoint folder. Without it, output_dir must not hold a run yet")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an output_dir that holds one: the old run is moved "
                   "to OUTPUT_DIR.replaced-TIME, never mixed or deleted")
    p.add_argument("--accept-change", action="append", default=[], metavar="KEY",
                   help="on resume, accept that this recipe key (or section, e.g. schedule) "
                   "differs from the checkpoint's; recorded in status.json. Repeatable")
    p.add_argument("--sweep", metavar="SWEEP",
                   help="train one task of a sweep (a file or a shipped sweep's name; with "
                   "--sweep-index): its overrides are "
                   "added and it writes to OUTPUT_DIR/TASK_NAME, as `dist-ft submit --sweep` "
                   "does; for plain sbatch job arrays")
    p.add_argument("--sweep-index", type=int, metavar="I",
                   help="which task of --sweep (e.g. \"$SLURM_ARRAY_TASK_ID\")")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; recipe errors exit 2 before any process group starts."""
    from dist_ft.train.lifecycle import RunUsageError
    from dist_ft.train.preemption import Preempted
    from dist_ft.train.trainer import run_training

    overrides = list(args.overrides)
    if (args.sweep is None) != (args.sweep_index is None):
        raise ConfigError(["--sweep and --sweep-index go together"])
    if args.sweep is not None:
        from pathlib import Path

        from dist_ft.launch.sweep import load_sweep, task_folder

        tasks = load_sweep(args.sweep).tasks
        if not 0 <= args.sweep_index < len(tasks):
            raise ConfigError([f"--sweep-index {args.sweep_index}: the sweep has {len(tasks)} "
                               f"tasks (0-{len(tasks) - 1})"], args.sweep)
        task = tasks[args.sweep_index]
        base = load_recipe(args.config, overrides)
        overrides += [*task.overrides,
                      f"output_dir={task_folder(Path(base.output_dir), task)}"]
    recipe = load_recipe(args.config, overrides)
    try:
        run_training(recipe, args.resume, overwrite=args.overwrite,
                     accept_changes=args.accept_change)
    except Preempted as stop:
        print(f"dist-ft train: {stop}")
        return exitcodes.STOPPED
    except RunUsageError as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank raises it; one says it
            print(f"dist-ft train: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    return exitcodes.OK
