"""``dist-ft plan``: show exactly what a recipe trains, stage by stage, before any GPU hour."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from typing import Any

from dist_ft.config import ConfigError, Recipe, load_recipe
from dist_ft.plan import ResolvedPlan, ResolvedStage, resolve_plan
from dist_ft.plan.render import adapter_summary, all_params, plan_to_json

EXAMPLES = """\
examples:
  dist-ft plan configs/chestxray14_densenet121.yaml
  dist-ft plan configs/chestxray14_densenet121.yaml optim.layer_decay=0.75 --params
  dist-ft plan configs/imagefolder_resnet18.yaml model.name=resnet50 --json | jq .digest
  dist-ft plan chestxray14_vit_b_16        # a shipped recipe by name (dist-ft recipes list)
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``plan`` on the top-level subparsers."""
    p = sub.add_parser(
        "plan",
        help="show the freeze plan and parameter groups of a recipe",
        description="Resolve a recipe's freeze stages and parameter groups on the model's "
        "structure (meta device: no weights, no GPU) and print them with the plan digest.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="RECIPE",
                   help="recipe YAML file, or a shipped recipe's name (dist-ft recipes list)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. optim.lr=3e-4")
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    p.add_argument("--params", action="store_true", help="also list every parameter")
    p.set_defaults(run=run)


def build_plan(recipe: Recipe) -> ResolvedPlan:
    """Resolve ``recipe``'s plan on a meta-device instance of its model."""
    from dist_ft.models.spec_cache import fast_model_spec

    return resolve_plan(recipe, fast_model_spec(recipe.model))


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def _by_block(plan: ResolvedPlan, modules: tuple[str, ...]) -> str:
    norms = {n.name: n for n in plan.spec.norms}
    blocks = Counter(plan.spec.blocks.block_of[norms[m].params[0]] for m in modules)
    return " · ".join(f"{b} {c}" for b, c in blocks.items())


def _stage_table(plan: ResolvedPlan, stage: ResolvedStage) -> Any:
    from rich.table import Table

    start = ", ".join(f"{k} {v}" for k, v in stage.start.items())
    share = stage.trainable_params / stage.spec.num_params
    title = (
        f"[bold]stage {stage.index + 1}/{len(plan.stages)} · {stage.name}[/] · from {start}"
        + (f" · lr ×{stage.lr_scale:g}" if stage.lr_scale != 1 else "")
    )
    table = Table(title=title, title_justify="left", show_footer=True)
    table.add_column("group", footer="trainable")
    table.add_column("tensors", justify="right", footer=str(len(stage.trainable)))
    table.add_column("params", justify="right", footer=f"{_count(stage.trainable_params)}")
    digits = 1 if share >= 1e-3 else 3  # a head-only stage is often <0.1% of the model
    share_text = f"{share:.{digits}%} of {_count(stage.spec.num_params)}"
    table.add_column("lr", justify="right", footer=share_text)
    table.add_column("× base", justify="right")
    table.add_column("weight decay", justify="right")
    for g in stage.groups:
        table.add_row(
            g.name, str(len(g.params)), _count(g.num_params), f"{g.lr:.3g}",
            f"{g.lr_scale:.4g}", f"{g.weight_decay:g}",
        )
    return table


def print_plan(plan: ResolvedPlan, with_params: bool) -> None:
    """Render the plan as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    # Piped output keeps a readable width instead of rich's 80-column default.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    spec = plan.spec
    console.print(
        f"[bold]{plan.model}[/] · {_count(spec.num_params)} params in {len(spec.params)} tensors"
        f" · blocks: {' → '.join(spec.blocks.blocks)}"
    )
    for stage in plan.stages:
        console.print()
        console.print(_stage_table(plan, stage))
        if stage.adapters is not None:
            console.print(f"  adapters: {adapter_summary(stage)}")
        console.print(f"  frozen: {_count(stage.frozen_params)} params", end="")
        if stage.bn_eval:
            console.print(
                f" · BatchNorm in eval mode (frozen stats): {len(stage.bn_eval)} layers "
                f"({_by_block(plan, stage.bn_eval)})"
            )
        elif stage.frozen_norms:
            console.print(
                f" · bn_policy=train: {len(stage.frozen_norms)} frozen BatchNorm layers still "
                "update running stats"
            )
        else:
            console.print()
        if stage.pruned_groups:
            console.print(
                f"  groups with nothing to train here (pruned): {', '.join(stage.pruned_groups)}"
            )
    if with_params:
        table = Table(title="parameters", title_justify="left")
        table.add_column("name", no_wrap=True)
        for col in ("shape", "block", *(s.name for s in plan.stages)):
            table.add_column(col)
        where = [{p: g.name for g in s.groups for p in g.params} for s in plan.stages]
        for p, block in all_params(plan):
            table.add_row(
                p.name, "×".join(map(str, p.shape)) or "scalar", block,
                *(w.get(p.name, "[dim]frozen[/]") for w in where),
            )
        console.print()
        console.print(table)
    console.print()
    console.print(f"plan digest: [bold]{plan.digest}[/]")


def run(args: argparse.Namespace) -> int:
    """Load, resolve and print the plan; recipe errors propagate as ConfigError (exit 2)."""
    recipe = load_recipe(args.config, args.overrides)
    try:
        plan = build_plan(recipe)
    except ConfigError as exc:
        raise ConfigError(exc.problems, args.config) from None
    if args.json:
        json.dump(plan_to_json(plan, args.params), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_plan(plan, args.params)
    return 0
