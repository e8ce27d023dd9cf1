"""Freeze stages: trainable flags, BatchNorm modes, optimizer groups, and switching stages.

Optimizer groups are the plan's groups, further split by *training history*: parameters that
started training in different stages go to different groups (``head@last_block``). Under ZeRO
a group is one flat partition with one Adam step count, so mixing histories would give new
parameters the bias correction of old ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from dist_ft.config.schema import OptimConfig, Recipe
from dist_ft.models.adapters import adapt
from dist_ft.plan import ResolvedPlan, ResolvedStage
from dist_ft.plan.adapters import ResolvedAdapters
from dist_ft.train.checkpoint import PortableState, moments_to_tensors
from dist_ft.train.progress import Progress

log = logging.getLogger("dist_ft.train")


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


def adapter_change(current: ResolvedAdapters | None, target: ResolvedAdapters | None) -> str:
    """What a stage boundary does to the adapters, in words."""
    parts = []
    if current is not None:
        parts.append(f"{current.kind} adapters on {len(current.modules)} layers merged into "
                     "the base weights")
    if target is not None:
        rank = "" if target.kind == "ia3" else f" r={target.r}"
        parts.append(f"{target.kind}{rank} adapters on {len(target.modules)} layers injected")
    return "; ".join(parts)


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


def _load_start_weights(module: nn.Module, weights: dict[str, torch.Tensor],
                        stage: ResolvedStage) -> None:
    """Load a resume's name-keyed weights; a lean (adapter) stage's hold only what is not
    frozen, the module already holds the rest (rebuilt from the recipe).

    Raises:
        ValueError: names the module lacks, or a trainable parameter missing.
    """
    missing, unexpected = module.load_state_dict(weights, strict=False)
    needed = set(stage.trainable) if stage.adapters is not None else set(module.state_dict())
    lacking = sorted(set(missing) & needed)
    if unexpected or lacking:
        raise ValueError(f"the checkpoint's weights do not fit the model: unexpected "
                         f"{unexpected[:3]}, missing {lacking[:3]}")


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


def state_keys(cfg: OptimConfig) -> tuple[str, ...]:
    """Per-element optimizer state the optimizer keeps (carried across stage boundaries)."""
    return ("momentum_buffer",) if cfg.name == "sgd" else ("exp_avg", "exp_avg_sq")


class StageSwitcher:
    """Makes a freeze stage current: trainable set, groups, optimizer, wrapper or engine.

    At a boundary the moments of parameters that were already training are carried into the
    new optimizer (with their groups' step counts); the plan digest is re-checked on every
    rank. Backend differences (re-wrap, the same FSDP2 module, or a new DeepSpeed engine) are
    :func:`dist_ft.train.engine.module_for_new_stage`'s and :func:`dist_ft.train.engine.prepare`'s.

    Args:
        accelerator: the run's Accelerator.
        recipe: the run's recipe.
        plan: the resolved plan.
        rebuild: makes a fresh, ready-to-train module from a full state dict of a module
            carrying the given adapters (or none).
        stage_weights: folder for ``trainer.save_stage_weights`` (main process writes).
    """

    def __init__(self, accelerator: Any, recipe: Recipe, plan: ResolvedPlan,
                 rebuild: Callable[[dict[str, torch.Tensor], ResolvedAdapters | None],
                                   nn.Module],
                 stage_weights: Path) -> None:
        self.accelerator, self.recipe, self.plan = accelerator, recipe, plan
        self.rebuild, self.stage_weights = rebuild, stage_weights
        self.keys = state_keys(recipe.optim)
        # Each entry: stage, step, seconds, and whether an engine was torn down and rebuilt.
        self.entries: list[dict[str, Any]] = []

    def enter(self, index: int, model: Any, optimizer: Any, progress: Progress,
              carry: bool, snapshot: bool = True,
              start: PortableState | None = None) -> tuple[Any, Any]:
        """Enter stage ``index``; ``model`` is the base module before the first stage.

        Args:
            start: with no ``optimizer`` yet (a resume), the weights to give the module
                (after its adapters are injected) and the moments to seed, as a stage change
                carries them: how a ZeRO checkpoint resumes on another number of processes.

        Returns:
            The prepared model and optimizer.
        """
        from dist_ft.train import engine
        from dist_ft.train.consistency import check_plan_consistency

        acc, save = self.accelerator, self.recipe.trainer.save_stage_weights
        started, rebuilt = time.perf_counter(), optimizer is not None
        moments: dict[str, dict[str, torch.Tensor]] = start.moments if start else {}
        # The adapters ``model`` carries: none on the plain module a run (or resume) starts from.
        current = None if optimizer is None else self.plan.stages[progress.stage].adapters
        if optimizer is None:
            module = model
        else:
            if save:
                self.save_weights(f"stage{progress.stage}_end", model, optimizer, moments=True)
            if carry:
                moments = engine.carry_moments(acc, model, optimizer, self.keys)
            module = engine.module_for_new_stage(
                acc, model, lambda state: self.rebuild(state, current),
                same_structure=current == self.plan.stages[index].adapters)
            acc.free_memory()
            model = optimizer = None
        stage = self.plan.stages[index]
        if current != stage.adapters:  # merge the old adapters, inject the new ones (peft)
            module = adapt(module, current, stage.adapters, self.adapter_seed(index))
            log.info("stage %d '%s': %s", index, stage.name, adapter_change(current,
                                                                          stage.adapters))
        if start is not None:
            _load_start_weights(module, start.weights, stage)
        apply_trainable(module, stage)
        groups = optimizer_groups(self.plan, index)
        model, optimizer = engine.prepare(
            acc, module, lambda m: build_optimizer(self.recipe.optim, m, groups),
            self._sharder(stage) if self.recipe.trainer.backend == "fsdp" else None)
        progress.stage = index
        progress.stage_start.setdefault(str(index), progress.step)
        steps = [progress.step - progress.stage_start[str(g.since)] for g in groups]
        if start is not None and start.steps is not None:  # as the optimizer counted them
            steps = [s if s is not None else k for s, k in zip(start.steps, steps, strict=True)]
        seeded = engine.seed_moments(acc, model, optimizer, self.keys, moments, steps) \
            if moments else 0
        check_plan_consistency(acc, self.plan, f"entering stage {index} ({stage.name})")
        if save and snapshot:
            self.save_weights(f"stage{index}_start", model, optimizer, moments=bool(moments))
        seconds = time.perf_counter() - started
        self.entries.append({"stage": index, "step": progress.step, "seconds": round(seconds, 3),
                             "rebuilt": rebuilt})
        log.info("stage %d '%s' at step %d: %s trainable params in %d groups, %d BN layers "
                 "frozen, moments carried for %d tensors, rebuilt in %.2f s; optimizer state "
                 "on this rank: %d elements", index, stage.name, progress.step,
                 f"{stage.trainable_params:,}", len(groups), len(stage.bn_eval), seeded, seconds,
                 engine.optimizer_state_elements(acc, model, self.keys))
        return model, optimizer

    def _sharder(self, stage: ResolvedStage) -> Callable[[nn.Module], nn.Module]:
        """FSDP2's sharding of a plain module carrying ``stage``'s adapters: by its blocks."""
        from dist_ft.train.fsdp import shard_model

        cfg, device = self.recipe.trainer.fsdp, self.accelerator.device
        return lambda module: shard_model(module, stage.spec.blocks.block_of, cfg, device)

    def adapter_seed(self, index: int) -> int:
        """The seed of stage ``index``'s new adapters: the run's seed and the stage alone."""
        return self.recipe.trainer.seed * 1000 + index

    def save_weights(self, label: str, model: Any, optimizer: Any,
                     moments: bool = False) -> None:
        """Full weights (and optimizer moments) at a stage boundary, for inspection and tests
        (a collective call)."""
        from safetensors.torch import save_file

        from dist_ft.train import engine

        state = engine.full_state_dict(self.accelerator, model)
        carried = {}
        if moments:
            carried = moments_to_tensors(
                engine.snapshot_moments(self.accelerator, model, optimizer, self.keys))
        if self.accelerator.is_main_process:
            self.stage_weights.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()},
                      str(self.stage_weights / f"{label}.safetensors"))
            if carried:
                save_file({k: v.contiguous() for k, v in carried.items()},
                          str(self.stage_weights / f"{label}.moments.safetensors"))
