"""Resolve a recipe's freeze plan and parameter groups against a model, stage by stage."""

from __future__ import annotations

from dataclasses import dataclass

from dist_ft.config.errors import ConfigError
from dist_ft.config.schema import Recipe
from dist_ft.models.structure import ModelSpec
from dist_ft.plan.adapters import ResolvedAdapters, resolve_adapters
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
        spec: the model as this stage trains it (with its adapters injected, if any).
        adapters: the stage's adapters, or None.
        adapter_params: trainable adapter elements (0 without adapters).
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
    spec: ModelSpec
    adapters: ResolvedAdapters | None = None
    adapter_params: int = 0

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
        return plan_records(self.stages)

    @property
    def has_adapters(self) -> bool:
        """Whether some stage trains adapters."""
        return any(s.adapters is not None for s in self.stages)

    def changed_before(self, index: int) -> tuple[str, ...]:
        """Base parameters (the model's own names) that differ from the initial weights when
        stage ``index`` begins: trained in an earlier stage, or merged into by earlier
        adapters that stage ``index`` no longer carries."""
        base = {p.name for p in self.spec.params}
        changed: set[str] = set()
        for k in range(index):
            changed |= base & set(self.stages[k].trainable)
            adapters = self.stages[k].adapters
            if adapters is not None and any(s.adapters != adapters
                                            for s in self.stages[k + 1:index + 1]):
                wrapped = set(adapters.modules)
                changed |= {n for n in base if n.rpartition(".")[0] in wrapped}
        return tuple(p.name for p in self.spec.params if p.name in changed)

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

    def adapted(adapters: ResolvedAdapters) -> ModelSpec:
        # The adapted model's parameter shapes are peft's: a meta-device build (torch).
        from dist_ft.models.adapters import adapted_spec

        return adapted_spec(recipe.model, adapters)

    def matches(rules: list, key: str, stage_spec: ModelSpec) -> set[str]:
        out: set[str] = set()
        for j, rule in enumerate(rules):
            try:
                out.update(match_rule(rule, stage_spec))
            except RuleError as exc:
                problems.append(f"{key}[{j}]: {exc}")
        return out

    members_by_spec: dict[int, dict[str, set[str]]] = {}

    def group_members(stage_spec: ModelSpec) -> dict[str, set[str]]:
        key = id(stage_spec)
        if key not in members_by_spec:
            members_by_spec[key] = {
                g.name: matches(g.match, f"optim.groups[{i}].match", stage_spec)
                for i, g in enumerate(recipe.optim.groups)
            }
        return members_by_spec[key]

    stages: list[ResolvedStage] = []
    for i, cfg in enumerate(recipe.plan.stages):
        before = len(problems)
        adapters, stage_spec, adapter_names = None, spec, set()
        if cfg.adapters is not None:
            try:
                adapters = resolve_adapters(cfg.adapters, spec)
            except RuleError as exc:
                problems.append(f"{_stage_key(i, 'adapters.target')}: {exc}")
                continue
            try:
                stage_spec = adapted(adapters)
            except ValueError as exc:  # peft refuses a layer (its message names it)
                problems.append(f"{_stage_key(i, 'adapters.target')}: peft cannot adapt "
                                f"these layers: {exc}")
                continue
            renamed = {adapters.adapted_name(p.name) for p in spec.params}
            adapter_names = {p.name for p in stage_spec.params} - renamed
        selected = matches(cfg.include, _stage_key(i, "include"), stage_spec)
        selected -= matches(cfg.exclude, _stage_key(i, "exclude"), stage_spec)
        if len(problems) > before:
            continue
        if adapters is not None:  # wrapped layers' own weights stay frozen: adapters train
            wrapped = sorted(n for n in selected if ".base_layer." in n)
            if wrapped:
                problems.append(
                    f"plan.stages[{i}] ({cfg.name}): include selects {', '.join(wrapped[:3])}"
                    f"{'...' if len(wrapped) > 3 else ''}, weights of layers its adapters wrap "
                    "(they stay frozen): remove those layers from adapters.target or from "
                    "include")
                continue
            selected |= adapter_names
        if not selected:
            problems.append(f"plan.stages[{i}] ({cfg.name}): exclude removes every parameter")
            continue
        info = {p.name: p for p in stage_spec.params}
        trainable = [p.name for p in stage_spec.params if p.name in selected]
        groups, pruned = resolve_groups(stage_spec, recipe.optim, trainable,
                                        group_members(stage_spec), cfg.lr_scale)
        bn_policy = cfg.bn_policy or recipe.plan.bn_policy
        frozen_norms = tuple(
            n.name for n in stage_spec.norms
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
                frozen_params=stage_spec.num_params - trainable_params,
                spec=stage_spec,
                adapters=adapters,
                adapter_params=sum(info[n].numel for n in adapter_names),
            )
        )
    if problems:
        raise ConfigError(problems)
    digest = records_digest(plan_records(stages))
    return ResolvedPlan(spec.name, spec, recipe.optim.lr, tuple(stages), digest)
