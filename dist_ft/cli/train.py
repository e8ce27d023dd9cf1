"""``dist-ft train``: run a recipe on 1..N processes (plain, torchrun, accelerate launch, srun)."""

from __future__ import annotations

import argparse

from dist_ft.config import load_recipe

EXAMPLES = """\
examples:
  dist-ft train configs/chestxray14_smoke.yaml                       # one process
  accelerate launch --config_file launch/cpu_2proc.yaml -m dist_ft train \\
      configs/chestxray14_smoke.yaml trainer.zero_stage=3
  dist-ft train configs/chestxray14_smoke.yaml --resume auto         # continue the last run
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``train``."""
    p = sub.add_parser(
        "train", help="fine-tune a model as a recipe says", epilog=EXAMPLES,
        description="Train under DDP or DeepSpeed ZeRO with the recipe's freeze plan; writes "
        "OUTPUT_DIR/{recipe.yaml,plan.json,tb/,checkpoints/,final/model.safetensors}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="'auto': the newest finished checkpoint in output_dir (fresh start if "
                   "none); or a checkpoint folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Train; recipe errors exit 2 before any process group starts."""
    recipe = load_recipe(args.config, args.overrides)
    from dist_ft.train.trainer import Trainer

    trainer = Trainer(recipe, resume=args.resume)
    try:
        trainer.setup()
        metrics = trainer.train()
        final = trainer.finish()
        if trainer.main:
            score = metrics.get("auroc_mean", metrics.get("accuracy"))
            print(f"done: {trainer.progress.step} steps, validation score {score:.4f}; "
                  f"weights {final}; TensorBoard: tensorboard --logdir {trainer.output_dir / 'tb'}")
    finally:
        trainer.close()
    return 0
