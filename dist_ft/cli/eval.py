"""``dist-ft eval``: per-class metrics of saved weights, beside the published figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dist_ft import exitcodes
from dist_ft.config import ConfigError, load_recipe
from dist_ft.rundir import RunDir

EXAMPLES = """\
examples:
  dist-ft eval runs/chestxray14_smoke/final/model.safetensors
  dist-ft eval runs/cxr14/final/model.safetensors --split test --data /datasets/chestxray14
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``."""
    p = sub.add_parser("eval", help="evaluate saved weights on a split", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("weights", type=Path, help="a model.safetensors (e.g. OUTPUT_DIR/final/...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--config", type=Path,
                   help="recipe (default: recipe.yaml of the run the weights belong to)")
    p.add_argument("--data", help="data.root to evaluate on")
    p.add_argument("--split", choices=("train", "val", "test"), default="val")
    p.add_argument("--out", type=Path, help="folder for the table, JSON and ROC plot "
                   "(default: beside the weights)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Evaluate and print the table (or JSON)."""
    from dist_ft.train.evaluate import OutputPathError, evaluate_weights

    # The run folder is the one above final/ (or best/) that holds the weights.
    config = args.config or RunDir(args.weights.resolve().parent.parent).recipe
    if not config.is_file():
        raise ConfigError([f"no recipe at {config}; pass --config RECIPE"])
    overrides = list(args.overrides) + ([f"data.root={args.data}", "data.cache=null"]
                                        if args.data else [])
    recipe = load_recipe(config, overrides)
    out = args.out or args.weights.parent
    try:
        metrics = evaluate_weights(recipe, args.weights, args.split, out,
                                   protect={"recipe": config})
    except OutputPathError as exc:  # a usage error: nothing was read or written
        print(f"dist-ft eval: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    if args.json:
        from dist_ft.jsonio import dumps

        print(dumps(metrics))
        sys.stdout.write("\n")
    else:
        print((out / f"eval_{args.split}.md").read_text(), end="")
        print(f"wrote {out}/eval_{args.split}.json, .md" +
              (f" and roc_{args.split}.png" if "auroc" in metrics else ""))
    return 0
