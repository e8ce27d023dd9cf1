"""Apply a resolved freeze stage to a model: trainable flags, BatchNorm modes, optimizer groups.

Optimizer groups are the plan's groups, further split by *training history*: parameters that
started training in different stages go to different groups (``head@last_block``). Under ZeRO
a group is one flat partition with one Adam step count, so mixing histories would give new
parameters the bias correction of old ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dist_ft.config.schema import OptimConfig
from dist_ft.plan import ResolvedPlan, ResolvedStage


@dataclass(frozen=True)
class OptimGroup:
    """One optimizer param group: names, planned lr and decay, and its history key."""

    name: str
    params: tuple[str, ...]
    lr: float
    weight_decay: float
    since: int  # index of the stage in which these parameters started training


def training_since(plan: ResolvedPlan, stage_index: int) -> dict[str, int]:
    """For each parameter trainable in ``stage_index``, the stage its current run began."""
    since: dict[str, int] = {}
    for name in plan.stages[stage_index].trainable:
        k = stage_index
        while k > 0 and name in set(plan.stages[k - 1].trainable):
            k -= 1
        since[name] = k
    return since


def optimizer_groups(plan: ResolvedPlan, stage_index: int) -> list[OptimGroup]:
    """The plan's groups of a stage, split by training history."""
    stage = plan.stages[stage_index]
    since = training_since(plan, stage_index)
    out = []
    for group in stage.groups:
        histories = sorted({since[p] for p in group.params})
        for h in histories:
            names = tuple(p for p in group.params if since[p] == h)
            label = group.name if len(histories) == 1 else f"{group.name}@{plan.stages[h].name}"
            out.append(OptimGroup(label, names, group.lr, group.weight_decay, h))
    return out


def apply_trainable(model: nn.Module, stage: ResolvedStage) -> None:
    """Set ``requires_grad`` exactly as the stage says.

    Raises:
        ValueError: the model's parameters are not the ones the plan was resolved on.
    """
    trainable = set(stage.trainable)
    names = set()
    for name, param in model.named_parameters():
        names.add(name)
        param.requires_grad_(name in trainable)
    unknown = trainable - names
    if unknown:
        raise ValueError(f"plan names parameters the model lacks: {sorted(unknown)[:3]}")


def set_bn_modes(model: nn.Module, stage: ResolvedStage) -> None:
    """Put the stage's frozen BatchNorm layers in eval mode (call after ``model.train()``)."""
    frozen = set(stage.bn_eval)
    if not frozen:
        return
    for name, module in model.named_modules():
        if name in frozen and isinstance(module, _BatchNorm):
            module.eval()


def build_optimizer(cfg: OptimConfig, model: nn.Module,
                    groups: Iterable[OptimGroup]) -> torch.optim.Optimizer:
    """A torch optimizer over ``groups``; each group keeps ``name``, ``base_lr`` and ``since``."""
    params = dict(model.named_parameters())
    param_groups = [
        {"params": [params[n] for n in g.params], "lr": g.lr, "base_lr": g.lr,
         "weight_decay": g.weight_decay, "name": g.name, "since": g.since}
        for g in groups
    ]
    impl = cfg.implementation
    if impl == "auto":
        impl = "fused" if cfg.name in ("adam", "adamw") else "default"
    kwargs = {"fused": {"fused": True}, "foreach": {"foreach": True},
              "for_loop": {"foreach": False}}.get(impl, {})
    if cfg.name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, **kwargs)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(param_groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kwargs)


def step_tensor(steps: int, group: dict[str, Any], param: torch.Tensor) -> torch.Tensor:
    """An Adam ``step`` count as torch keeps it for ``group``: on the parameter's device for
    fused or capturable groups, else a CPU scalar."""
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(float(steps), dtype=torch.float32, device=param.device)
    return torch.tensor(float(steps))


def state_keys(cfg: OptimConfig) -> tuple[str, ...]:
    """Per-element optimizer state the optimizer keeps (carried across stage boundaries)."""
    return ("momentum_buffer",) if cfg.name == "sgd" else ("exp_avg", "exp_avg_sq")
