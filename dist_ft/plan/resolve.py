"""Resolve a recipe's freeze plan and parameter groups against a model, stage by stage."""

from __future__ import annotations

from dataclasses import dataclass

from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import Recipe
from dist_ft.models.structure import ModelSpec
from dist_ft.plan.digest import plan_records, records_digest
from dist_ft.plan.groups import ResolvedGroup, resolve_groups
from dist_ft.plan.rules import RuleError, match_rule


@dataclass(frozen=True)
class ResolvedStage:
    """What trains during one stage, in which groups, and which BatchNorm layers are frozen.

    Attributes:
        index: position in the plan.
        name: the stage's name.
        start_epoch, start_step: when it begins (one of them is set).
        bn_policy: ``freeze`` (frozen BN layers run in eval mode) or ``train``.
        lr_scale: the stage's lr multiplier (already folded into each group's lr).
        trainable: trainable parameter names, in model order.
        groups: the optimizer groups.
        frozen_norms: BatchNorm layers whose parameters are all frozen in this stage.
        bn_eval: the BatchNorm layers held in eval mode (``frozen_norms`` under ``freeze``).
        pruned_groups: configured groups with no trainable parameter in this stage.
        trainable_params, frozen_params: element counts.
    """

    index: int
    name: str
    start_epoch: int | None
    start_step: int | None
    bn_policy: str
    lr_scale: float
    trainable: tuple[str, ...]
    groups: tuple[ResolvedGroup, ...]
    frozen_norms: tuple[str, ...]
    bn_eval: tuple[str, ...]
    pruned_groups: tuple[str, ...]
    trainable_params: int
    frozen_params: int

    @property
    def start(self) -> dict[str, int]:
        """``{"epoch": n}`` or ``{"step": n}``."""
        return {"step": self.start_step} if self.start_step is not None else {
            "epoch": self.start_epoch or 0
        }


@dataclass(frozen=True)
class ResolvedPlan:
    """The whole plan for one model: every stage resolved, plus its digest."""

    model: str
    spec: ModelSpec
    base_lr: float
    stages: tuple[ResolvedStage, ...]
    digest: str

    def records(self) -> list[dict]:
        """Per-stage, per-parameter records (see :func:`dist_ft.plan.digest.plan_records`)."""
        return plan_records(self.spec, self.stages)

    def stage_at(self, epoch: int, step: int) -> ResolvedStage:
        """The stage in force at ``epoch`` (0-based) and global ``step``."""
        current = self.stages[0]
        for stage in self.stages[1:]:
            reached = (
                step >= stage.start_step if stage.start_step is not None
                else epoch >= (stage.start_epoch or 0)
            )
            if reached:
                current = stage
        return current


def _stage_key(i: int, field: str) -> str:
    return f"plan.stages[{i}].{field}"


def resolve_plan(recipe: Recipe, spec: ModelSpec) -> ResolvedPlan:
    """Resolve every stage of ``recipe.plan`` with ``recipe.optim``'s groups against ``spec``.

    Raises:
        ConfigError: every rule that names an unknown block, selects nothing, or leaves a
            stage with nothing to train, each with its key path.
    """
    problems: list[str] = []
    info = {p.name: p for p in spec.params}

    def matches(rules: list, key: str) -> set[str]:
        out: set[str] = set()
        for j, rule in enumerate(rules):
            try:
                out.update(match_rule(rule, spec))
            except RuleError as exc:
                problems.append(f"{key}[{j}]: {exc}")
        return out

    group_members = {
        g.name: matches(g.match, f"optim.groups[{i}].match")
        for i, g in enumerate(recipe.optim.groups)
    }
    stages: list[ResolvedStage] = []
    for i, cfg in enumerate(recipe.plan.stages):
        before = len(problems)
        selected = matches(cfg.include, _stage_key(i, "include"))
        selected -= matches(cfg.exclude, _stage_key(i, "exclude"))
        if len(problems) > before:
            continue
        if not selected:
            problems.append(f"plan.stages[{i}] ({cfg.name}): exclude removes every parameter")
            continue
        trainable = [p.name for p in spec.params if p.name in selected]
        groups, pruned = resolve_groups(spec, recipe.optim, trainable, group_members, cfg.lr_scale)
        bn_policy = cfg.bn_policy or recipe.plan.bn_policy
        frozen_norms = tuple(
            n.name for n in spec.norms
            if n.tracks_stats and n.params and not any(p in selected for p in n.params)
        )
        trainable_params = sum(info[n].numel for n in trainable)
        stages.append(
            ResolvedStage(
                index=i,
                name=cfg.name,
                start_epoch=cfg.start_epoch if cfg.start_step is None else None,
                start_step=cfg.start_step,
                bn_policy=bn_policy,
                lr_scale=cfg.lr_scale,
                trainable=tuple(trainable),
                groups=tuple(groups),
                frozen_norms=frozen_norms,
                bn_eval=frozen_norms if bn_policy == "freeze" else (),
                pruned_groups=tuple(pruned),
                trainable_params=trainable_params,
                frozen_params=spec.num_params - trainable_params,
            )
        )
    if problems:
        raise ConfigError(problems)
    digest = records_digest(plan_records(spec, stages))
    return ResolvedPlan(spec.name, spec, recipe.optim.lr, tuple(stages), digest)
