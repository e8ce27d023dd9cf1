"""Plan rendering: the JSON document and the plain-text summary come from one module."""

from __future__ import annotations

import json
from collections.abc import Callable

from dist_ft.config import load_recipe
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import ResolvedPlan, resolve_plan
from dist_ft.plan.render import plan_to_json, plan_to_text
from tests.conftest import CONFIGS, CliResult

DENSENET = str(CONFIGS / "chestxray14_densenet121.yaml")


def _plan() -> ResolvedPlan:
    recipe = load_recipe(DENSENET, ["model.pretrained=none"])
    return resolve_plan(recipe, fast_model_spec(recipe.model))


def test_text_lists_digest_stages_and_groups() -> None:
    plan = _plan()
    lines = plan_to_text(plan).splitlines()
    assert lines[0] == f"digest {plan.digest}"
    stage_lines = [line for line in lines if line.startswith("stage ")]
    assert len(stage_lines) == len(plan.stages)
    first = plan.stages[0]
    assert stage_lines[0].startswith(f"stage {first.index} {first.name} from ")
    assert f"{first.trainable_params:,} trainable, {len(first.bn_eval)} BN frozen" in lines[1]
    group = first.groups[0]
    assert lines[2] == (f"  {group.name}: {group.num_params:,} params, lr {group.lr:.3g}, "
                        f"wd {group.weight_decay:g}")
    assert len(lines) == 1 + sum(1 + len(s.groups) for s in plan.stages)


def test_cli_json_is_the_render_document(run_cli: Callable[..., CliResult]) -> None:
    doc = json.loads(run_cli("plan", DENSENET, "model.pretrained=none", "--json").out)
    assert doc == json.loads(json.dumps(plan_to_json(_plan())))
