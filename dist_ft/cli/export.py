"""``dist-ft export``: TorchScript or ONNX (dynamic batch), verified within 1e-4; int8 option."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dist_ft import exitcodes
from dist_ft.cli.eval import recipe_of, resolve_weights
from dist_ft.config import load_recipe

EXAMPLES = """\
examples:
  dist-ft export runs/chestxray14_smoke --format onnx     # best/ weights, else final/
  dist-ft export runs/chestxray14_smoke --weights final --format onnx
  dist-ft export runs/chestxray14_smoke/final/model.safetensors --format torchscript \\
      --quantize dynamic --json
"""

log = logging.getLogger("dist_ft.cli")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export``."""
    p = sub.add_parser("export", help="export weights to TorchScript or ONNX", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, metavar="RUN_OR_WEIGHTS",
                   help="a run folder (takes best/, else final/) or a model.safetensors")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. data.image_size=256")
    p.add_argument("--format", choices=("torchscript", "onnx"), required=True,
                   help="TorchScript (torch.jit) or ONNX (for onnxruntime, TensorRT ...)")
    p.add_argument("--weights", choices=("best", "final"),
                   help="which weights of a run folder (default: best, else final)")
    p.add_argument("--config", type=Path, metavar="RECIPE",
                   help="recipe file or shipped recipe name (default: recipe.yaml of the run "
                   "the weights belong to)")
    p.add_argument("--quantize", choices=("dynamic",), help="also write an int8 variant")
    p.add_argument("--out", type=Path, help="output file (default: beside the weights)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest |logit| difference from PyTorch the export may have")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Export, verify, report."""
    from dist_ft.train.evaluate import Weights
    from dist_ft.train.export import export_model
    from dist_ft.train.output_safety import OutputPathError

    resolved = resolve_weights(args.target, args.weights)
    config = recipe_of(resolved, args.config)
    recipe = load_recipe(config, args.overrides)
    try:
        report = export_model(recipe, resolved.path, args.format, args.out, args.quantize,
                              args.tolerance, protect={"recipe": config})
    except OutputPathError as exc:  # a usage error: nothing was read or written
        print(f"dist-ft export: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    if resolved.note:
        log.warning("export: %s", resolved.note)
    taken = Weights.from_file(resolved.path, recipe, resolved.kind)
    log.info("export: exported %s", taken.describe())
    report.update(weights=str(resolved.path), weights_kind=resolved.kind, epoch=taken.epoch,
                  step=taken.step)
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=float)
        sys.stdout.write("\n")
        return 0
    print(f"{report['format']}: {report['path']} ({report['bytes'] / 2**20:.1f} MiB), "
          f"max |logit error| {report['max_abs_error']:.2e} vs PyTorch")
    q = report.get("int8")
    if q:
        auroc = q["auroc"]
        change = (f"; val AUROC {auroc['fp32']:.4f} -> {auroc['int8']:.4f} "
                  f"({auroc['change']:+.4f})" if auroc else "; no validation data for AUROC")
        print(f"int8: {q['path']} ({q['bytes'] / 2**20:.1f} MiB), max |logit error| "
              f"{q['max_abs_error']:.2e}{change}")
    return 0
