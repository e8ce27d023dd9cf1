"""``dist-ft eval``: the clinical report of a run's (or a file's) weights on a split.

Scores every image once (one process, or each process of ``accelerate launch``/``srun``, on
the GPU where there is one), then writes the report: per-finding AUROC/AUPRC with patient
bootstrap CIs, operating points chosen on val, calibration, subgroups, an optional paired
comparison and localization, and appends the run's evaluation record.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_ft import exitcodes
from dist_ft.config import ConfigError, Recipe, load_recipe, resolve_recipe
from dist_ft.rundir import RunDir

log = logging.getLogger("dist_ft.cli")

if TYPE_CHECKING:  # torch-free at import: the CLI loads dist_ft.train lazily
    from dist_ft.train.evaluate import EvalRequest

EXAMPLES = """\
examples:
  dist-ft eval runs/cxr14 --split test                  # best/ weights (else final/), test split
  dist-ft eval runs/cxr14 --weights final --split val   # the last weights instead
  dist-ft eval runs/cxr14/best/model.safetensors --split test --resamples 2000 --json
  accelerate launch --num_processes 8 -m dist_ft eval runs/cxr14 --split test   # 8 GPUs
  dist-ft eval runs/cxr14 --split test --compare runs/cxr14_tuned   # paired comparison
  dist-ft eval runs/cxr14 --split test --localize       # + data.root/BBox_List_2017.csv
  dist-ft eval runs/cxr14 --split test --data-config configs/chexpert.yaml   # external data
  dist-ft eval runs/cxr14 --split val data.format=chexpert data.root=/data/CheXpert-v1.0-small

Writes eval_SPLIT.json, eval_SPLIT.md, scores_SPLIT.npz, roc_SPLIT.png and
reliability_SPLIT.png (into --out, default beside the weights) and appends one line to
RUN/evaluations.jsonl; an eval of the test split says how often it was evaluated before.
"""

BBOX_CSV = "BBox_List_2017.csv"


@dataclass(frozen=True)
class ResolvedWeights:
    """The weights file a command takes from its argument.

    Attributes:
        path: the ``.safetensors`` file.
        run: the run folder it belongs to (None for a file outside any run).
        kind: ``best``, ``final`` or ``file``.
        note: why this file was taken when the default was not available (or None).
    """

    path: Path
    run: Path | None
    kind: str
    note: str | None = None


def resolve_weights(target: Path, choice: str | None = None) -> ResolvedWeights:
    """The weights to use for ``target``: a run folder or a ``.safetensors`` file.

    From a run folder: ``best/model.safetensors`` by default, else ``final/`` (saying so);
    ``choice`` (``best``/``final``) insists on one.

    Raises:
        ConfigError: the folder has no such weights, or ``choice`` is given with a file.
    """
    if target.is_dir():
        run = RunDir(target)
        best, final = run.best_weights, run.final_weights
        if choice is not None:
            path = best if choice == "best" else final
            if not path.is_file():
                other = "final" if choice == "best" else "best"
                raise ConfigError([f"{target}: no {choice} weights ({path} is missing); "
                                   f"pass --weights {other}, or a .safetensors file"])
            return ResolvedWeights(path, run.root, choice)
        if best.is_file():
            return ResolvedWeights(best, run.root, "best")
        if final.is_file():
            return ResolvedWeights(final, run.root, "final",
                                   f"{target} has no best/ weights (a run without model "
                                   "selection); took final/, the last weights")
        raise ConfigError([f"{target}: neither {best} nor {final} exists: not a finished run "
                           "folder; pass a run folder or a .safetensors file"])
    if choice is not None:
        raise ConfigError([f"--weights {choice} chooses within a run folder; {target} is a "
                           "file: pass the run folder instead, or drop --weights"])
    # A file of a run sits in RUN/final/ or RUN/best/ beside the run's recipe.yaml; anything
    # else is a loose file (its record goes beside it, never into an unrelated folder).
    run = RunDir(target.expanduser().absolute().parent.parent)
    parent = target.expanduser().absolute().parent
    of_run = parent in (run.best, run.final) and run.recipe.is_file()
    return ResolvedWeights(target, run.root if of_run else None,
                           parent.name if of_run else "file")


def recipe_of(resolved: ResolvedWeights, config: Path | None) -> Path:
    """The recipe that built the weights: ``--config`` (a file or a shipped recipe's name) or
    the run folder's ``recipe.yaml``.

    Raises:
        ConfigError: neither is at hand, naming the fix.
    """
    if config is not None:
        path = resolve_recipe(config)
    else:
        path = RunDir(resolved.run or resolved.path.expanduser().absolute().parent.parent).recipe
    if not path.is_file():
        raise ConfigError([f"no recipe at {path}; pass --config RECIPE"])
    return path


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval``."""
    p = sub.add_parser("eval", help="evaluate a run's weights on a split (clinical report)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", type=Path, metavar="RUN_OR_WEIGHTS",
                   help="a run folder (takes best/, else final/) or a model.safetensors")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides; data.* ones choose the data evaluated on")
    p.add_argument("--weights", choices=("best", "final"),
                   help="which weights of a run folder (default: best, else final)")
    p.add_argument("--config", type=Path, metavar="RECIPE",
                   help="recipe file or shipped recipe name (default: recipe.yaml of the run "
                   "the weights belong to)")
    p.add_argument("--data", help="data.root to evaluate on")
    p.add_argument("--data-config", type=Path, metavar="RECIPE",
                   help="evaluate on this recipe's data section (another data set; a file or a "
                   "shipped name); findings are matched by name and the unshared ones dropped")
    p.add_argument("--split", choices=("train", "val", "test"), default="val",
                   help="which split of the data to score")
    p.add_argument("--out", type=Path, help="folder for the report files "
                   "(default: beside the weights)")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples (by patient) for the CIs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--sensitivity", type=float, default=0.9,
                   help="the fixed-sensitivity operating point (default 0.9)")
    p.add_argument("--no-val", action="store_true",
                   help="with --split test: skip the val split (no operating points)")
    p.add_argument("--compare", type=Path, metavar="RUN_OR_WEIGHTS",
                   help="a second model scored on the same images: paired comparison")
    p.add_argument("--localize", nargs="?", const="auto", metavar="BBOX_CSV",
                   help=f"score Grad-CAM heatmaps against boxes (default data.root/{BBOX_CSV})")
    p.add_argument("--batch-size", type=int, help="scoring batch (default data.batch_size)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(run=run)


def _recipes(args: argparse.Namespace, config: Path) -> tuple[Recipe, Recipe]:
    """The training recipe (names the model's classes) and the one to evaluate with."""
    overrides = list(args.overrides) + ([f"data.root={args.data}", "data.cache=null"]
                                        if args.data else [])
    data_overrides = [o for o in overrides if o.startswith("data.")]
    trained = load_recipe(config, [o for o in overrides if not o.startswith("data.")])
    recipe = load_recipe(config, overrides)
    if args.data_config is not None:
        other = load_recipe(args.data_config, data_overrides)
        recipe = recipe.model_copy(update={"data": other.data})
    return trained, recipe


def _localize_csv(args: argparse.Namespace, data_root: str | None) -> Path | None:
    if args.localize is None:
        return None
    if args.localize != "auto":
        if not Path(args.localize).is_file():
            raise ConfigError([f"--localize {args.localize}: no such file; pass the box list "
                               f"({BBOX_CSV} of the ChestX-ray14 release)"])
        return Path(args.localize)
    if data_root is None or not (Path(data_root) / BBOX_CSV).is_file():
        raise ConfigError([f"--localize: no {BBOX_CSV} in data.root ({data_root}); "
                           "pass --localize PATH/TO/BBox_List_2017.csv"])
    return Path(data_root) / BBOX_CSV


@dataclass(frozen=True)
class LocalizationSection:
    """The report's localization section: Grad-CAM of the split's images that have a box in
    ``boxes``, scored by pointing game and IoU (:mod:`dist_ft.explain.localize`)."""

    boxes: Path

    def __call__(self, req: EvalRequest, report: dict[str, Any], device: Any) -> str:
        """Add ``report["localization"]``; return its markdown.

        Raises:
            ValueError: the data has no image files (a cache), or no box can be scored.
        """
        from dist_ft.data.datasets import build_dataset
        from dist_ft.explain.localize import (
            localization_report,
            read_bbox_csv,
            render_localization_markdown,
        )
        from dist_ft.train.scoring import load_trained

        dataset = build_dataset(req.data, req.split)
        if not hasattr(dataset, "paths"):
            raise ValueError("--localize needs the image files: evaluate with data.cache=null "
                             "and data.root set to the PNG folder")
        model = load_trained(req.weights.recipe, req.weights.path).to(device)
        from dist_ft.models.preprocessing import input_config

        prep = input_config(req.weights.recipe.model, req.weights.recipe.data)
        loc = localization_report(
            model, req.weights.recipe.data.image_size,
            {Path(p).name: Path(p) for p in dataset.paths}, read_bbox_csv(self.boxes),
            req.model_classes, batch_size=req.batch_size or req.data.batch_size,
            channels=dataset.channels, resamples=req.resamples, seed=req.seed,
            mean=prep.mean, std=prep.std)
        loc["boxes_file"] = str(self.boxes)
        report["localization"] = loc
        return (f"### Localization ({req.split} images with a box in {self.boxes.name})\n\n"
                + render_localization_markdown(loc))


def run(args: argparse.Namespace) -> int:
    """Evaluate; the main process prints the report (or JSON)."""
    from dist_ft.train.evaluate import EvalRequest, Weights, evaluate
    from dist_ft.train.output_safety import OutputPathError
    from dist_ft.train.scoring import model_classes

    resolved = resolve_weights(args.target, args.weights)
    config = recipe_of(resolved, args.config)
    trained, recipe = _recipes(args, config)
    if args.split != "test" and args.no_val:
        raise ConfigError(["--no-val only applies with --split test (operating points are "
                           "chosen on val and applied to test)"])
    weights = Weights.from_file(resolved.path, trained, resolved.kind)
    compare = None
    protect = {"recipe": config}
    if args.compare is not None:
        other = resolve_weights(args.compare)
        other_config = recipe_of(other, None if other.run else args.config)
        compare = Weights.from_file(other.path, load_recipe(other_config), other.kind)
        protect["compare recipe"] = other_config
    out = args.out or resolved.path.parent
    boxes = _localize_csv(args, recipe.data.root)
    sections = (LocalizationSection(boxes),) if boxes is not None else ()
    record = RunDir(resolved.run).evaluations if resolved.run else RunDir(out).evaluations
    request = EvalRequest(
        weights=weights, data=recipe.data, split=args.split, out=out,
        model_classes=model_classes(trained), record=record, compare=compare,
        use_val=not args.no_val, resamples=args.resamples, seed=args.seed,
        sensitivity=args.sensitivity, sections=sections,
        protect=protect, batch_size=args.batch_size)
    try:
        report = evaluate(request)
    except OutputPathError as exc:  # a usage error: nothing was read or written
        print(f"dist-ft eval: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    if report is None:  # not the main process: it only scored
        return exitcodes.OK
    if resolved.note:
        log.warning("eval: %s", resolved.note)
    log.info("eval: %s", weights.describe())
    if report.get("test_split_history"):
        log.warning("eval: %s", report["test_split_history"])
    if args.json:
        from dist_ft.jsonio import dumps

        print(dumps(report))
    else:
        print((out / f"eval_{args.split}.md").read_text(), end="")
        print(f"wrote {out}/eval_{args.split}.json, .md, scores_{args.split}.npz" +
              (f", roc_{args.split}.png, reliability_{args.split}.png"
               if report.get("multilabel") else ""))
    return exitcodes.OK
