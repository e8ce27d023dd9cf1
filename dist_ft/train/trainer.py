"""The training recipe: set-up, stages, the loop, evaluation, checkpoints, final weights.

Reads top to bottom: :meth:`Trainer.setup` builds everything and checks rank consistency,
:meth:`Trainer.train` runs epochs and enters freeze stages at their boundaries,
:meth:`Trainer.evaluate` computes exact metrics over the whole validation split, and
:meth:`Trainer.finish` writes ``final/model.safetensors``. Only the main process prints and
writes TensorBoard; every rank logs to ``OUTPUT_DIR/logs/rank{r}.log``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from dist_ft.cluster import requeue_command
from dist_ft.config.load import recipe_to_dict
from dist_ft.config.schema import ModelConfig, Recipe
from dist_ft.data.cache import CacheError, CacheReader
from dist_ft.data.datasets import build_dataset
from dist_ft.data.images import ImageError
from dist_ft.data.sampler import ShardedSampler
from dist_ft.data.transforms import BatchAugment, BatchNormalize, BatchResize
from dist_ft.jsonio import dumps
from dist_ft.models.factory import build_model
from dist_ft.models.spec import describe_model
from dist_ft.plan import ResolvedPlan, resolve_plan
from dist_ft.train import engine
from dist_ft.train.checkpoint import (
    check_output_dir,
    check_pickles,
    checkpoint_bytes,
    latest_checkpoint,
    load_rank_state,
    read_trainer_state,
    save_checkpoint,
)
from dist_ft.train.consistency import (
    check_plan_consistency,
    check_replicas,
    gather_objects,
    ranks_flagging,
)
from dist_ft.train.losses import build_loss
from dist_ft.train.metrics import classification_metrics
from dist_ft.train.preemption import Preempted, StopSignals
from dist_ft.train.runtime import build_accelerator, lost_peer, process_resources
from dist_ft.train.schedule import LrSchedule
from dist_ft.train.stages import (
    apply_trainable,
    build_optimizer,
    optimizer_groups,
    set_bn_modes,
    state_keys,
)

log = logging.getLogger("dist_ft.train")


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to change."""


@dataclass
class Progress:
    """Counters that a checkpoint saves and a resume restores."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0  # current epoch (0-based)
    micro_in_epoch: int = 0  # micro-batches this rank consumed in the current epoch
    stage: int = 0
    stage_start: dict[str, int] = field(default_factory=lambda: {"0": 0})
    best_score: float | None = None
    evals_without_gain: int = 0
    skipped_steps: int = 0  # steps whose update was dropped for a non-finite loss
    nonfinite_in_row: int = 0
    last_metrics: dict[str, Any] = field(default_factory=dict)


def _setup_logging(output_dir: Path, rank: int, main: bool) -> None:
    logs = output_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger("dist_ft")
    root.setLevel(logging.INFO)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    file_handler = logging.FileHandler(logs / f"rank{rank}.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(file_handler)
    if main:
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("dist-ft: %(message)s"))
        root.addHandler(console)
    root.propagate = False


class Trainer:
    """Fine-tune ``recipe.model`` on ``recipe.data`` under the recipe's plan and backend.

    Args:
        recipe: the validated recipe.
        resume: ``"auto"`` (latest finished checkpoint in ``output_dir``, if any), a
            checkpoint folder, or None (start fresh).
    """

    def __init__(self, recipe: Recipe, resume: str | None = None) -> None:
        self.recipe = recipe
        self.resume = resume
        self.output_dir = Path(recipe.output_dir)
        self.progress = Progress()
        self.model: Any = None
        self.optimizer: Any = None
        self.writer: Any = None
        self.rank_writer: Any = None
        self.grad_check_pending = False
        # Finite training losses since the last evaluation; tensors, so no per-step device sync.
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_count: torch.Tensor | int = 0
        self.window_finite: torch.Tensor | None = None  # all losses of this step finite
        self.gaps: list[float] = []
        self.stops = StopSignals()

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Build the accelerator, model, plan, data, loss and logging; check consistency."""
        recipe = self.recipe
        self.acc = acc = build_accelerator(recipe)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.main = acc.is_main_process
        self.stops.install()  # record SIGUSR2/SIGTERM from here on; acted on between steps
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1 and not (
                engine.is_deepspeed(acc) or acc.distributed_type.name.startswith("MULTI_")):
            raise TrainingError(f"{dist.get_world_size()} processes but Accelerate chose "
                                f"{acc.distributed_type}: ranks would train separately")
        from accelerate.utils import set_seed

        set_seed(recipe.trainer.seed)
        module = self._checkpointed(build_model(recipe.model))
        self.spec = describe_model(module, recipe.model.name)
        if self.main:
            check_output_dir(self.output_dir, checkpoint_bytes(self.spec.num_params))
        acc.wait_for_everyone()
        _setup_logging(self.output_dir, self.rank, self.main)
        self.plan: ResolvedPlan = resolve_plan(recipe, self.spec)
        check_plan_consistency(acc, self.plan, "at start")
        self.base_module = module

        data = recipe.data
        if data.cache is not None and data.verify_cache:
            self._verify_cache(data.cache)
        self.train_set = build_dataset(data, "train")
        self.val_set = build_dataset(data, "val")
        for dataset in (self.train_set, self.val_set):
            if hasattr(dataset, "bad_image_log"):  # images read from files, skippable
                dataset.bad_image_log = self.output_dir / "logs" / \
                    f"bad_images.rank{self.rank}.jsonl"
        classes = len(self.train_set.classes)
        if classes != recipe.model.num_classes:
            raise TrainingError(
                f"model.num_classes is {recipe.model.num_classes} but the data has {classes} "
                f"classes ({', '.join(self.train_set.classes[:5])}...)"
            )
        if len(self.train_set) == 0 or len(self.val_set) == 0:
            raise TrainingError(f"empty split: train {len(self.train_set)}, "
                                f"val {len(self.val_set)} images under {data.root or data.cache}")
        self.train_sampler = ShardedSampler(len(self.train_set), self.rank, self.world,
                                            seed=recipe.trainer.seed)
        self.val_sampler = ShardedSampler(len(self.val_set), self.rank, self.world,
                                          shuffle=False, pad=False)
        cuda = acc.device.type == "cuda"
        loader_args = {"batch_size": data.batch_size, "num_workers": data.num_workers,
                       "pin_memory": cuda, "persistent_workers": data.num_workers > 0}
        self.train_loader = DataLoader(self.train_set, sampler=self.train_sampler, **loader_args)
        self.val_loader = DataLoader(self.val_set, sampler=self.val_sampler, **loader_args)
        self.loss_fn = build_loss(recipe.trainer.loss, self.train_set.multilabel,
                                  self.train_set.targets).to(acc.device)
        aug = data.augment
        self.augment = BatchAugment(data.image_size, aug.crop_scale, aug.ratio, hflip=aug.hflip,
                                    rotation_deg=aug.rotation_deg)
        self.resize = BatchResize(data.image_size)
        self.normalize = BatchNormalize().to(acc.device)
        self.generator = torch.Generator().manual_seed(recipe.trainer.seed * 1000 + self.rank)

        micro_per_epoch = len(self.train_loader)
        self.steps_per_epoch = max(1, micro_per_epoch // recipe.trainer.grad_accum_steps)
        total = recipe.trainer.epochs * self.steps_per_epoch
        self.total_steps = min(total, recipe.trainer.max_steps or total)
        self.schedule = LrSchedule(recipe.schedule, self.total_steps, self.steps_per_epoch)

        checkpoint = self._resume_path()
        if checkpoint is not None:
            self._load(checkpoint)
        else:
            self._enter_stage(0, carry=False)
        if self.main:
            self._write_run_files()
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output_dir / "tb"), purge_step=self._purge_step())
            self.writer.add_text("recipe", "```yaml\n" + yaml.safe_dump(
                recipe_to_dict(recipe), sort_keys=False) + "\n```", self.progress.step)
            self.writer.add_text("plan", self._plan_text(), self.progress.step)
        if recipe.logging.per_rank:
            from torch.utils.tensorboard import SummaryWriter

            self.rank_writer = SummaryWriter(str(self.output_dir / "tb" / f"rank{self.rank}"),
                                             purge_step=self._purge_step())
        self.write_status("running")
        log.info("rank %d/%d on %s, backend %s (ZeRO-%d), %d train / %d val images, "
                 "%d steps of %d images", self.rank, self.world, acc.device,
                 recipe.trainer.backend, engine.zero_stage(acc), len(self.train_set),
                 len(self.val_set), self.total_steps,
                 data.batch_size * self.world * recipe.trainer.grad_accum_steps)

    def _verify_cache(self, cache: str) -> None:
        """Checksums of every shard against the manifest, once (main process), before use.

        Raises:
            CacheError: on every rank, naming the shard that differs.
        """
        problem = None
        if self.main:
            started = time.perf_counter()
            try:
                reader = CacheReader(cache, verify=True)
                log.info("cache %s: %d shards match their checksums (%.1f s)", cache,
                         len(reader.manifest["shards"]), time.perf_counter() - started)
            except CacheError as exc:
                problem = str(exc)
        problem = gather_objects(problem)[0]
        if problem:
            raise CacheError(f"{problem}; rebuild it with dist-ft data prepare (or set "
                             "data.verify_cache=false to train without this check)")

    def _purge_step(self) -> int | None:
        # A checkpoint at step N was written after everything logged at step N, so a resumed
        # run hides only what an interrupted segment logged after it (steps > N).
        return self.progress.step + 1 if self.progress.step else None

    def _plan_text(self) -> str:
        lines = [f"digest {self.plan.digest}"]
        for s in self.plan.stages:
            start = ", ".join(f"{k} {v}" for k, v in s.start.items())
            lines.append(f"stage {s.index} {s.name} from {start}: {s.trainable_params:,} "
                         f"trainable, {len(s.bn_eval)} BN frozen")
            lines += [f"  {g.name}: {g.num_params:,} params, lr {g.lr:.3g}, wd {g.weight_decay:g}"
                      for g in s.groups]
        return "\n".join(lines)

    def _write_run_files(self) -> None:
        (self.output_dir / "recipe.yaml").write_text(
            yaml.safe_dump(recipe_to_dict(self.recipe), sort_keys=False))
        from dist_ft.cli.plan import plan_to_json

        (self.output_dir / "plan.json").write_text(json.dumps(plan_to_json(self.plan), indent=2))

    # ------------------------------------------------------------------ stages
    def _fresh_module(self, state: dict[str, torch.Tensor]) -> nn.Module:
        cfg = ModelConfig(name=self.recipe.model.name, num_classes=self.recipe.model.num_classes)
        module = build_model(cfg)
        module.load_state_dict(state)
        return self._checkpointed(module)

    def _checkpointed(self, module: nn.Module) -> nn.Module:
        if self.recipe.trainer.activation_checkpointing:
            from dist_ft.models.checkpointing import enable_activation_checkpointing

            blocks = enable_activation_checkpointing(module, self.recipe.model.name)
            log.info("activation checkpointing on %d blocks", len(blocks))
        return module

    def _enter_stage(self, index: int, carry: bool, snapshot: bool = True) -> None:
        """Make stage ``index`` current: trainable set, groups, optimizer, wrapper/engine."""
        acc, recipe = self.acc, self.recipe
        started = time.perf_counter()
        keys = state_keys(recipe.optim)
        moments: dict[str, dict[str, torch.Tensor]] = {}
        if self.model is not None and self.recipe.trainer.save_stage_weights:
            self._save_stage_weights(f"stage{self.progress.stage}_end", moments=True)
        if self.model is None:
            module = self.base_module
        else:
            if carry:
                moments = engine.snapshot_moments(acc, self.model, self.optimizer, keys)
            if engine.is_deepspeed(acc):
                # A new engine for the new trainable set (DeepSpeed has no add_param_group);
                # ZeRO-3 holds only shards, so rebuild the module from gathered weights.
                module = self._fresh_module(engine.full_state_dict(acc, self.model))
            else:
                module = engine.unwrap(acc, self.model)
            acc.free_memory()
            self.model = self.optimizer = None
        stage = self.plan.stages[index]
        apply_trainable(module, stage)
        groups = optimizer_groups(self.plan, index)
        optimizer = build_optimizer(recipe.optim, module, groups)
        self.model, self.optimizer = acc.prepare(module, optimizer)
        self.progress.stage = index
        self.progress.stage_start.setdefault(str(index), self.progress.step)
        steps = [self.progress.step - self.progress.stage_start[str(g.since)] for g in groups]
        seeded = engine.seed_moments(acc, self.model, self.optimizer, keys, moments, steps) \
            if moments else 0
        check_plan_consistency(acc, self.plan, f"entering stage {index} ({stage.name})")
        if recipe.trainer.save_stage_weights and snapshot:
            self._save_stage_weights(f"stage{index}_start", moments=bool(moments))
        self.grad_check_pending = True
        log.info("stage %d '%s' at step %d: %s trainable params in %d groups, %d BN layers "
                 "frozen, moments carried for %d tensors, rebuilt in %.2f s; optimizer state "
                 "on this rank: %d elements", index, stage.name, self.progress.step,
                 f"{stage.trainable_params:,}", len(groups), len(stage.bn_eval), seeded,
                 time.perf_counter() - started,
                 engine.optimizer_state_elements(acc, self.model, keys))

    def _save_stage_weights(self, label: str, moments: bool = False) -> None:
        """Full weights (and optimizer moments) at a stage boundary, for inspection and tests."""
        from safetensors.torch import save_file

        state = engine.full_state_dict(self.acc, self.model)
        carried = {}
        if moments:
            keys = state_keys(self.recipe.optim)
            found = engine.snapshot_moments(self.acc, self.model, self.optimizer, keys)
            carried = {f"{k}/{n}": v for n, kv in found.items() for k, v in kv.items()}
        if self.main:
            folder = self.output_dir / "stage_weights"
            folder.mkdir(exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()},
                      str(folder / f"{label}.safetensors"))
            if carried:
                save_file({k: v.contiguous() for k, v in carried.items()},
                          str(folder / f"{label}.moments.safetensors"))

    def _stage_due(self) -> int:
        p = self.progress
        return self.plan.stage_at(epoch=p.epoch, step=p.step).index

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run until ``trainer.max_steps``/``trainer.epochs`` or early stopping."""
        acc, recipe, p = self.acc, self.recipe, self.progress
        from tqdm import tqdm

        bar = tqdm(total=self.total_steps, initial=p.step, disable=not self.main,
                   unit="step", dynamic_ncols=True)
        stop = p.step >= self.total_steps
        while not stop:
            if self._stage_due() != p.stage:
                self._enter_stage(self._stage_due(), carry=True)
            self.train_sampler.set_epoch(p.epoch, start=p.micro_in_epoch * recipe.data.batch_size)
            self._train_mode()
            window_start, window_images = time.perf_counter(), 0
            for images, targets in self.train_loader:
                if p.step >= self.total_steps:  # max_steps reached mid-epoch
                    break
                loss, finite = self._micro_step(images, targets)
                self.loss_sum = self.loss_sum + torch.where(finite, loss, 0.0)
                self.loss_count = self.loss_count + finite.long()
                p.micro_in_epoch += 1
                window_images += len(images) * self.world
                if not acc.sync_gradients:
                    continue
                p.step += 1
                bar.update(1)
                if p.step % recipe.logging.every_steps == 0 or p.step == 1:
                    # Windows are contiguous: logging's own cost counts in the next one.
                    now = time.perf_counter()
                    rate = window_images / max(1e-9, now - window_start)
                    window_start, window_images = now, 0
                    self._log_step(loss, rate, bar)
                every = recipe.trainer.checkpoint_every_steps
                if every and p.step % every == 0 and p.step < self.total_steps:
                    self.save()
                if p.step < self.total_steps and self._stage_due() != p.stage:
                    self._enter_stage(self._stage_due(), carry=True)
                    self._train_mode()
                if p.step < self.total_steps:
                    signals = self.stops.agreed()
                    if signals:
                        self._stop_on_signal(signals)
            else:  # the epoch ran to its end
                p.epoch += 1
                p.micro_in_epoch = 0
                if p.epoch % recipe.trainer.eval_every_epochs == 0 or p.step >= self.total_steps:
                    stop = self._end_of_epoch_eval()
                if engine.zero_stage(acc) != 3:
                    check_replicas(acc, engine.unwrap(acc, self.model), f"after epoch {p.epoch}")
                if p.step < self.total_steps and not stop:
                    self.save()
            stop = stop or p.step >= self.total_steps
        bar.close()
        if not p.last_metrics or p.micro_in_epoch:
            self._end_of_epoch_eval()
        return p.last_metrics

    def _stop_on_signal(self, signals: list[str]) -> None:
        """Checkpoint on every rank, requeue after SIGUSR2 (rank 0), and raise Preempted."""
        p = self.progress
        log.warning("rank %d: %s received; checkpointing at step %d", self.rank,
                    "+".join(signals), p.step)
        latest = latest_checkpoint(self.output_dir)
        path = latest if latest is not None and latest.name == f"step_{p.step:08d}" \
            else self.save()
        requeued, note = False, "not requeued (SIGTERM: Slurm or the user is ending the job)"
        if "SIGUSR2" in signals:
            argv, note = requeue_command(os.environ, self.recipe.launch.max_requeues)
            if argv is not None and self.main:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
                requeued = done.returncode == 0
                note = note if requeued else f"{' '.join(argv)} failed: {done.stderr.strip()}"
            requeued = bool(gather_objects(requeued)[0])
        self.write_status("stopped", signals=signals, checkpoint=str(path), note=note)
        if self.writer is not None:
            self.writer.flush()
        raise Preempted(p.step, path, signals, requeued, note)

    def write_status(self, state: str, **extra: Any) -> None:
        """``OUTPUT_DIR/status.json`` (main process): state, step, total, time; atomic."""
        if not self.main:
            return
        p = self.progress
        status = {"state": state, "step": p.step,
                  "total_steps": getattr(self, "total_steps", None),
                  "epoch": p.epoch, "stage": p.stage, "time": time.time(),
                  "job_id": os.environ.get("SLURM_JOB_ID"), **extra}
        tmp = self.output_dir / "status.json.tmp"
        try:
            tmp.write_text(dumps(status))
            tmp.replace(self.output_dir / "status.json")
        except OSError as exc:  # status is advisory: never mask the run's own error
            log.warning("cannot write %s: %s", tmp.with_name("status.json"), exc)

    def _train_mode(self) -> None:
        self.model.train()
        set_bn_modes(engine.unwrap(self.acc, self.model), self.plan.stages[self.progress.stage])

    def _micro_step(self, images: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch; the update at a step boundary.

        Returns:
            The detached loss and whether it is finite (0-d tensors on the device).
        """
        acc = self.acc
        images = images.to(acc.device, non_blocking=True)
        targets = targets.to(acc.device, non_blocking=True)
        x = self.normalize(self.augment(images, self.generator))
        with acc.accumulate(self.model):
            boundary = acc.sync_gradients
            if boundary:
                factor = self.schedule.factor(self.progress.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            loss = self.loss_fn(self.model(x), targets)
            finite = torch.isfinite(loss.detach())
            self.window_finite = finite if self.window_finite is None \
                else self.window_finite & finite
            if engine.is_deepspeed(acc):
                # Accelerate's backward would also run engine.step(); split them so the
                # gradient check sees gradients (DeepSpeed clips from its own config).
                ds = acc.deepspeed_engine_wrapped.engine
                ds.backward(loss)
                skip = boundary and self._nonfinite_step()
                if boundary and self.grad_check_pending and not skip:
                    self._report_gradless()
                # DeepSpeed itself drops an update whose gradient norm is not finite (its
                # overflow path, every ZeRO stage): the skip is checked, not assumed.
                skipped_before = ds.skipped_steps
                ds.step()
                if skip and ds.skipped_steps == skipped_before:
                    raise TrainingError(
                        f"step {self.progress.step + 1}: the loss was not finite but DeepSpeed "
                        "applied the update (finite gradients?); stopping rather than go on")
            else:
                acc.backward(loss)
                if boundary:
                    if self._nonfinite_step():
                        self.optimizer.zero_grad()
                        return loss.detach(), finite
                    if self.grad_check_pending:
                        self._report_gradless()
                    clip = self.recipe.trainer.grad_clip_norm
                    if clip:
                        # Kept as a tensor: float() here would sync the GPU every step.
                        self.grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
                self.optimizer.step()
                self.optimizer.zero_grad()
        return loss.detach(), finite

    def _nonfinite_step(self) -> bool:
        """At a step boundary: True when any rank's loss in this step was NaN/inf.

        Every rank takes part (one small all-reduce) and so decides alike: under
        ``trainer.nonfinite_loss=stop`` all raise before the update, naming the step; under
        ``skip`` all drop the update, until ``nonfinite_max_in_row`` steps in a row.

        Raises:
            TrainingError: the policy says stop.
        """
        finite = self.window_finite is None or bool(self.window_finite)  # one sync per step
        self.window_finite = None
        ranks = ranks_flagging(not finite)
        p, cfg = self.progress, self.recipe.trainer
        if not ranks:
            p.nonfinite_in_row = 0
            return False
        step = p.step + 1
        latest = latest_checkpoint(self.output_dir)
        kept = f"last complete checkpoint: {latest}" if latest else "no checkpoint yet"
        if cfg.nonfinite_loss == "stop":
            raise TrainingError(
                f"non-finite loss at step {step} on rank(s) {ranks}: stopped before the update "
                f"({kept}); lower optim.lr, check the data, or set trainer.nonfinite_loss=skip")
        p.skipped_steps += 1
        p.nonfinite_in_row += 1
        if p.nonfinite_in_row >= cfg.nonfinite_max_in_row:
            raise TrainingError(
                f"non-finite loss in {p.nonfinite_in_row} steps in a row (steps "
                f"{step - p.nonfinite_in_row + 1}-{step}, trainer.nonfinite_max_in_row="
                f"{cfg.nonfinite_max_in_row}): stopped ({kept})")
        log.warning("step %d: non-finite loss on rank(s) %s; update skipped on every rank "
                    "(%d skipped in all)", step, ranks, p.skipped_steps)
        if self.writer is not None:
            self.writer.add_scalar("train/skipped_steps", p.skipped_steps, step)
        return True

    def _report_gradless(self) -> None:
        """After the first backward of a stage: name trainable params that got no gradient."""
        self.grad_check_pending = False
        module = engine.unwrap(self.acc, self.model)
        missing = []
        for name, param in module.named_parameters():
            if param.requires_grad:
                grad = engine.full_grad(self.acc, param)
                if grad is None or not bool(torch.any(grad != 0)):
                    missing.append(name)
        if missing:
            log.warning("stage %d: %d trainable parameter(s) received no gradient: %s",
                        self.progress.stage, len(missing), ", ".join(missing[:10]))

    def _log_step(self, loss: torch.Tensor, images_per_s: float, bar: Any) -> None:
        if self.rank_writer is not None:  # this rank's own view, before the reduction
            self.rank_writer.add_scalar("rank/loss", float(loss), self.progress.step)
            self.rank_writer.add_scalar("rank/samples_per_s", images_per_s / self.world,
                                        self.progress.step)
        mean_loss = float(self.acc.reduce(loss.float(), reduction="mean"))
        if not self.main:
            return
        self.write_status("running")
        step = self.progress.step
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        if math.isfinite(mean_loss):  # else a skipped step (trainer.nonfinite_loss=skip)
            self.writer.add_scalar("train/loss", mean_loss, step)
        self.writer.add_scalar("train/samples_per_s", images_per_s, step)
        self.writer.add_scalar("train/stage", self.progress.stage, step)
        for name, lr in lrs.items():
            self.writer.add_scalar(f"lr/{name}", lr, step)
        norm = getattr(self, "grad_norm", None)
        if engine.is_deepspeed(self.acc):
            norm = self.acc.deepspeed_engine_wrapped.engine.get_global_grad_norm()
        if norm is not None and math.isfinite(float(norm)):
            self.writer.add_scalar("train/grad_norm", float(norm), step)
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{max(lrs.values()):.2e}",
                        img_s=f"{images_per_s:.0f}", stage=self.progress.stage)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Exact metrics over the whole validation split (each sample once, all ranks)."""
        acc = self.acc
        engine.average_bn_stats(acc, self.model)
        self.model.eval()
        batches = gather_objects(len(self.val_loader))
        rounds = max(batches)  # ZeRO-3 forwards are collective: keep ranks in lockstep
        scores, targets, loss_sum = [], [], 0.0
        iterator = iter(self.val_loader)
        filler = self.val_set[0][0].unsqueeze(0)  # for ranks that run out of batches first
        with torch.no_grad():
            for _ in range(rounds):
                batch = next(iterator, None)
                images = filler if batch is None else batch[0]
                logits = self.model(self.normalize(self.resize(images.to(acc.device))))
                if batch is None:
                    continue
                target = batch[1].to(acc.device)
                loss_sum += float(self.loss_fn(logits, target)) * len(images)
                probs = torch.sigmoid(logits) if self.val_set.multilabel else logits.softmax(-1)
                scores.append(probs.float().cpu().numpy())
                targets.append(target.cpu().numpy())
        parts = gather_objects((np.concatenate(scores) if scores else None,
                                np.concatenate(targets) if targets else None, loss_sum))
        all_scores = np.concatenate([s for s, _, _ in parts if s is not None])
        all_targets = np.concatenate([t for _, t, _ in parts if t is not None])
        metrics = classification_metrics(all_scores, all_targets, self.val_set.multilabel,
                                         self.val_set.classes)
        metrics["val_loss"] = sum(x for _, _, x in parts) / len(all_scores)
        metrics["val_samples"] = len(all_scores)
        return metrics

    def _end_of_epoch_eval(self) -> bool:
        """Evaluate, log, feed the schedule and early stopping; True to stop."""
        p, cfg = self.progress, self.recipe.trainer
        metrics = self.evaluate()
        metrics.update(epoch=p.epoch, step=p.step)
        trained = isinstance(self.loss_count, torch.Tensor)  # alike on every rank
        if trained:  # mean over all ranks' finite micro-batch losses since the last evaluation
            totals = torch.stack([torch.as_tensor(self.loss_sum, dtype=torch.float32),
                                  torch.as_tensor(self.loss_count, dtype=torch.float32)])
            total, count = self.acc.reduce(totals.to(self.acc.device), reduction="sum").tolist()
            self.loss_sum, self.loss_count = 0.0, 0
        if trained and count:
            train_loss = total / count
            metrics["train_loss"] = train_loss
            self.gaps.append(metrics["val_loss"] - train_loss)
            if len(self.gaps) >= 3 and self.gaps[-3] < self.gaps[-2] < self.gaps[-1]:
                log.warning("train/validation gap widening for 2 evaluations: %s "
                            "(overfitting? consider early stopping or a lower lr)",
                            " -> ".join(f"{g:.4f}" for g in self.gaps[-3:]))
        p.last_metrics = metrics
        score = metrics["score"]
        self.schedule.observe(score)
        if p.best_score is None or score > p.best_score + 1e-4:
            p.best_score, p.evals_without_gain = score, 0
        else:
            p.evals_without_gain += 1
        if self.main:
            if self.gaps:
                self.writer.add_scalar("val/gap", self.gaps[-1], p.step)
            for key in ("val_loss", "auroc_mean", "accuracy", "f1_macro"):
                if key in metrics:
                    self.writer.add_scalar(f"val/{key}", metrics[key], p.step)
            for cls, value in metrics.get("auroc", {}).items():
                if math.isfinite(value):
                    self.writer.add_scalar(f"val_auroc/{cls}", value, p.step)
            self.writer.flush()
            log.info("epoch %d step %d: val loss %.4f, score %.4f", p.epoch, p.step,
                     metrics["val_loss"], score)
        patience = cfg.early_stopping_patience
        if patience and p.evals_without_gain >= patience:
            log.info("early stopping: no gain in %d evaluations", patience)
            return True
        return False

    # ------------------------------------------------------------------ checkpoints
    def _resume_path(self) -> Path | None:
        if self.resume is None:
            return None
        if self.resume == "auto":
            return latest_checkpoint(self.output_dir)
        path = Path(self.resume)
        if not path.is_dir():
            raise TrainingError(f"--resume {path}: no such checkpoint folder")
        return path

    def save(self) -> Path:
        """Write a checkpoint of the current state (every rank takes part)."""
        p = self.progress
        engine.average_bn_stats(self.acc, self.model)
        state = {
            "step": p.step, "epoch": p.epoch, "micro_in_epoch": p.micro_in_epoch,
            "stage": p.stage, "stage_start": p.stage_start, "best_score": p.best_score,
            "evals_without_gain": p.evals_without_gain, "last_metrics": p.last_metrics,
            "skipped_steps": p.skipped_steps, "nonfinite_in_row": p.nonfinite_in_row,
            "schedule": self.schedule.state_dict(), "world_size": self.world,
            "digest": self.plan.digest, "backend": self.recipe.trainer.backend,
            "zero_stage": engine.zero_stage(self.acc),
        }
        rank_state = {"generator": self.generator.get_state()}
        path = save_checkpoint(self.acc, self.output_dir, p.step, state, rank_state,
                               self.recipe.trainer.keep_last)
        usage = process_resources()  # a soak's evidence: no growth from one to the next
        log.info("checkpoint %s (rank %d: %s open files, RSS %.0f MiB)", path, self.rank,
                 usage.get("open_files", "?"), usage.get("rss_mib", float("nan")))
        return path

    def _load(self, path: Path) -> None:
        state = read_trainer_state(path)
        problems = []
        if state["digest"] != self.plan.digest:
            problems.append("the plan differs from the checkpoint's (recipe changed?)")
        if state["world_size"] != self.world and engine.is_deepspeed(self.acc):
            problems.append(f"saved with {state['world_size']} processes, now {self.world}: "
                            "ZeRO checkpoints resume on the same number of processes")
        if state["backend"] != self.recipe.trainer.backend:
            problems.append(f"saved under {state['backend']}, recipe says "
                            f"{self.recipe.trainer.backend}")
        if problems:
            raise TrainingError(f"cannot resume from {path}: " + "; ".join(problems))
        p = self.progress
        p.step, p.epoch, p.stage = state["step"], state["epoch"], state["stage"]
        p.micro_in_epoch = state["micro_in_epoch"] * state["world_size"] // self.world
        p.stage_start = {str(k): v for k, v in state["stage_start"].items()}
        p.best_score, p.evals_without_gain = state["best_score"], state["evals_without_gain"]
        p.last_metrics = state["last_metrics"]
        p.skipped_steps = state.get("skipped_steps", 0)
        p.nonfinite_in_row = state.get("nonfinite_in_row", 0)
        self.schedule.load_state_dict(state["schedule"])
        self._enter_stage(p.stage, carry=False, snapshot=False)
        check_pickles(path)  # before DeepSpeed unpickles its files with weights_only=False
        self.acc.load_state(str(path))
        rank_file = path / f"rank{self.rank}.pt"
        if rank_file.is_file():
            self.generator.set_state(load_rank_state(path, self.rank)["generator"])
        log.info("resumed from %s at step %d (epoch %d, stage %d)", path, p.step, p.epoch,
                 p.stage)

    # ------------------------------------------------------------------ end
    def finish(self) -> Path:
        """Write ``final/model.safetensors`` (consolidated fp32, torchvision names)."""
        from safetensors.torch import save_file

        if self.recipe.trainer.save_stage_weights:
            self._save_stage_weights(f"stage{self.progress.stage}_end")
        state = engine.full_state_dict(self.acc, self.model)
        sums = gather_objects([float(v.double().sum()) for v in state.values()])
        if any(s != sums[0] for s in sums):
            raise TrainingError("final weights differ between ranks")
        log.info("final weights identical on %d rank(s)", self.world)
        final = self.output_dir / "final"
        if self.main:
            final.mkdir(parents=True, exist_ok=True)
            tmp = final / "model.safetensors.tmp"
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"model": self.recipe.model.name, "digest": self.plan.digest})
            tmp.replace(final / "model.safetensors")
            (final / "metrics.json").write_text(dumps(self.progress.last_metrics))
            self.write_status("finished", score=self.progress.last_metrics.get("score"))
            if self.writer is not None:
                self.writer.close()
        if self.rank_writer is not None:
            self.rank_writer.close()
        self.acc.wait_for_everyone()
        return final / "model.safetensors"

    def close(self) -> None:
        """Release the process group (avoids exit-time aborts seen with gloo + DeepSpeed)."""
        self.stops.restore()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _data_error_message(exc: Exception) -> str:
    # Raised in a loader worker, the text is "Caught ImageError in DataLoader worker ..." and
    # a traceback whose last line, "dist_ft.data.images.ImageError: PATH: why", names the file.
    last = [x for x in str(exc).strip().splitlines() if x.strip()][-1]
    if last.startswith("dist_ft."):
        last = last.split(": ", 1)[1]
    if isinstance(exc, ImageError):
        last += " (data.on_bad_image=skip trains on without such images, recording each)"
    return last


def _lost_peer_message(trainer: Trainer, exc: BaseException) -> str:
    latest = latest_checkpoint(trainer.output_dir)
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {getattr(trainer, 'rank', '?')} lost contact with the other ranks at step "
            f"{trainer.progress.step}: another rank died, was killed or hung for longer than "
            f"trainer.collective_timeout_min={trainer.recipe.trainer.collective_timeout_min:g} "
            f"(see {trainer.output_dir / 'logs'}/rank*.log). Continue with --resume auto: "
            f"{'from ' + str(latest) if latest else 'no checkpoint yet, so from the start'}. "
            f"[{first[:300]}]")


def run_training(recipe: Recipe, resume: str | None = None) -> dict[str, Any]:
    """Set up, train and finish one run on this process; what ``dist-ft train`` runs.

    Returns:
        The final validation metrics plus ``weights`` (the final file's path) and ``step``.

    Raises:
        Preempted: a SIGUSR2/SIGTERM stopped the run after a complete checkpoint.
        TrainingError: the run cannot start or continue.
    """
    trainer = Trainer(recipe, resume=resume)
    try:
        trainer.setup()
        metrics = trainer.train()
        final = trainer.finish()
        if trainer.main:
            score = metrics.get("auroc_mean", metrics.get("accuracy"))
            print(f"done: {trainer.progress.step} steps, validation score {score:.4f}; "
                  f"weights {final}; TensorBoard: tensorboard --logdir {trainer.output_dir / 'tb'}",
                  flush=True)
    except Preempted:
        raise
    except Exception as exc:
        error: Exception = exc
        if lost_peer(exc):
            error = TrainingError(_lost_peer_message(trainer, exc))
        elif isinstance(exc, ImageError | CacheError):
            error = TrainingError(_data_error_message(exc))
        log.error("rank %s stopped: %s", getattr(trainer, "rank", "?"), error)
        if getattr(trainer, "main", False):
            trainer.write_status("failed", error=f"{type(error).__name__}: {error}")
        if error is exc:
            raise
        raise error from exc
    finally:
        trainer.close()
    return {**metrics, "weights": str(final), "step": trainer.progress.step}
