"""``dist-ft predict``: probabilities per finding for image files, and Grad-CAM overlays."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dist_ft import exitcodes
from dist_ft.cli.eval import recipe_of, resolve_weights
from dist_ft.config import load_recipe

EXAMPLES = """\
examples:
  dist-ft predict runs/cxr14 scans/ --out preds            # best/ weights, else final/
  dist-ft predict runs/cxr14/final/model.safetensors 'scans/**/*.dcm' --out preds --heatmaps
  dist-ft predict runs/cxr14 worklist.csv --out preds --heatmaps --threshold 0.3 --json
  (a CSV lists images in its 'path' column, or its first one, relative to the CSV)
"""

# Formats whose loaders read one grey channel; the others (csv, imagefolder) read RGB.
GRAY_FORMATS = ("chestxray14", "chexpert", "mimic_cxr")

log = logging.getLogger("dist_ft.cli")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``predict``."""
    p = sub.add_parser("predict", help="score image files (PNG, JPEG, DICOM); Grad-CAM overlays",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, metavar="WEIGHTS",
                   help="a run folder (takes best/, else final/) or a model.safetensors")
    p.add_argument("images", nargs="+", metavar="IMAGES",
                   help="image files, folders (recursive), globs, or a .csv of paths")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for predictions.csv and heatmaps/")
    p.add_argument("--config", type=Path, metavar="RECIPE",
                   help="recipe file or shipped recipe name (default: recipe.yaml of the run "
                   "the weights belong to)")
    p.add_argument("--heatmaps", action="store_true",
                   help="write Grad-CAM overlays for every finding at or above --threshold")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="probability for an overlay and for the summary's counts")
    p.add_argument("--batch-size", type=int, default=16, metavar="N",
                   help="images per forward pass")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Resolve weights and images, refuse unsafe outputs, score, write, summarise."""
    import torch

    from dist_ft.explain.predict import (
        HEATMAPS,
        PREDICTIONS,
        ImageArgumentError,
        collect_images,
        predict_images,
    )
    from dist_ft.train.output_safety import OutputPathError, check_outputs
    from dist_ft.train.scoring import load_trained, model_classes

    def usage(message: str) -> int:
        print(f"dist-ft predict: error: {message}", file=sys.stderr)
        return exitcodes.USAGE

    if not 0 <= args.threshold <= 1:
        return usage(f"--threshold must be within [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        return usage(f"--batch-size must be at least 1, got {args.batch_size}")
    resolved = resolve_weights(args.target)
    config = recipe_of(resolved, args.config)
    try:
        paths = collect_images(args.images)
    except ImageArgumentError as exc:
        return usage(str(exc))
    files = {"weights": resolved.path, "recipe": config}
    folders = {}
    for arg in args.images:
        given = Path(arg).expanduser()
        if given.is_dir():
            folders[f"IMAGES {arg}"] = given
        elif given.is_file():
            files[f"IMAGES {arg}"] = given
    outputs = [args.out / PREDICTIONS] + ([args.out / HEATMAPS / "x.png"] if args.heatmaps
                                          else [])
    try:
        check_outputs(outputs, files, folders, "--out")
    except OutputPathError as exc:
        return usage(str(exc))
    if resolved.note:
        log.warning("predict: %s", resolved.note)
    log.info("predict: weights %s (%s), recipe %s", resolved.path, resolved.kind, config)
    recipe = load_recipe(config)
    classes = model_classes(recipe)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_trained(recipe, resolved.path).to(device)
    from dist_ft.models.preprocessing import input_config

    prep = input_config(recipe.model, recipe.data)
    summary = predict_images(
        model, paths, args.out, classes, recipe.data.image_size, batch_size=args.batch_size,
        channels=1 if recipe.data.format in GRAY_FORMATS else 3,
        multilabel=recipe.data.format != "imagefolder", heatmaps=args.heatmaps,
        threshold=args.threshold, mean=prep.mean, std=prep.std)
    summary.update(weights=str(resolved.path), weights_kind=resolved.kind)
    if args.json:
        from dist_ft.jsonio import dumps

        print(dumps(summary))
        return 0
    above = {c: n for c, n in summary["above_threshold"].items() if n}
    counts = ", ".join(f"{c} {n}" for c, n in sorted(above.items(), key=lambda kv: -kv[1]))
    print(f"scored {summary['images']} image(s) on {device.type}: {summary['predictions']}")
    print(f"at or above {args.threshold:g}: {counts or 'no finding'}")
    if args.heatmaps:
        print(f"{summary['heatmaps']} heatmap(s) in {args.out / HEATMAPS}")
    return 0
