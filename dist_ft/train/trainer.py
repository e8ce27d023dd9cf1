"""The training loop: set-up, epochs and stages, evaluation, checkpoints, final weights.

Reads top to bottom: :meth:`Trainer.setup` builds the processes, the model and plan, claims
the run folder (lock; fresh start, resume or overwrite), builds the data, the schedule and
the reporting; :meth:`Trainer.train` runs epochs and enters freeze stages at their
boundaries; :meth:`Trainer.evaluate` computes exact metrics over the whole validation split;
:meth:`Trainer.finish` writes ``final/model.safetensors``. The services it calls each own one
rule: the run folder (:mod:`dist_ft.rundir`, :mod:`dist_ft.train.lifecycle`), backend
mechanics (:mod:`dist_ft.train.engine`), stage switching (:mod:`dist_ft.train.stages`),
reporting (:mod:`dist_ft.train.reporting`), checkpoints and what an exact resume needs
(:mod:`dist_ft.train.checkpoint`, :mod:`dist_ft.train.resume`), stops and requeues
(:mod:`dist_ft.train.preemption`).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from dist_ft.config.load import recipe_to_dict
from dist_ft.config.schema import ModelConfig, Recipe
from dist_ft.data.cache import CacheError, CacheReader
from dist_ft.data.images import ImageError
from dist_ft.models.adapters import (
    ADAPTER_WEIGHTS,
    adapt,
    merged_state_dict,
    peft_modules_to_save,
    remove_peft_adapter,
    save_peft_adapter,
    state_digest,
)
from dist_ft.models.factory import build_model
from dist_ft.models.spec import describe_model
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import ResolvedPlan, ResolvedStage, resolve_plan
from dist_ft.plan.adapters import ResolvedAdapters
from dist_ft.plan.render import plan_to_json, plan_to_text
from dist_ft.rundir import WEIGHTS, RunDir, write_json_atomic
from dist_ft.runlock import RunLock
from dist_ft.train import engine
from dist_ft.train.checkpoint import (
    CheckpointDamaged,
    PortableState,
    checkpoint_bytes,
    load_checkpoint,
    load_rank_state,
    read_changed_frozen,
    read_portable,
    read_trainer_state,
    save_checkpoint,
)
from dist_ft.train.consistency import (
    check_plan_consistency,
    check_replicas,
    cpu_group,
    gather_objects,
)
from dist_ft.train.inputs import build_inputs
from dist_ft.train.lifecycle import Claim, RunUsageError, claim_run_folder
from dist_ft.train.losses import build_loss
from dist_ft.train.metrics import score_text
from dist_ft.train.monitor import Monitor, MonitorError, metric_value, resolve_monitor
from dist_ft.train.nonfinite import NonFinitePolicy
from dist_ft.train.preemption import Preempted, StopSignals, requeue_job
from dist_ft.train.progress import Progress
from dist_ft.train.reporting import Reporter, setup_logging
from dist_ft.train.resume import (
    ResumeMismatch,
    check_resume,
    run_contract,
    with_recorded_global_batch,
)
from dist_ft.train.runtime import (
    BatchSizeError,
    build_accelerator,
    ensure_process_group_env,
    lost_peer,
    process_resources,
    with_global_batch,
)
from dist_ft.train.schedule import LrSchedule
from dist_ft.train.stages import StageSwitcher, set_bn_modes
from dist_ft.train.step_flags import StepFlags
from dist_ft.train.trackers import RunTrackers, check_trackers
from dist_ft.train.validation import evaluate_exact

log = logging.getLogger("dist_ft.train")


class TrainingError(RuntimeError):
    """The run cannot start or continue; the message says why and what to change."""


class Trainer:
    """Fine-tune ``recipe.model`` on ``recipe.data`` under the recipe's plan and backend.

    Args:
        recipe: the validated recipe.
        resume: ``"auto"`` (newest intact checkpoint in ``output_dir``, if any), a checkpoint
            folder, or None (a fresh start, refused where a run already is).
        overwrite: start anew where a run already is, moving it aside.
        accept_changes: recipe keys (or sections) a resume may find changed.
    """

    def __init__(self, recipe: Recipe, resume: str | None = None, overwrite: bool = False,
                 accept_changes: Sequence[str] = ()) -> None:
        check_trackers(recipe.logging.trackers)  # a missing package: exit 2 before any start
        self.recipe, self.resume = recipe, resume
        self.overwrite, self.accept_changes = overwrite, tuple(accept_changes)
        self.run = RunDir(recipe.output_dir)
        self.progress = Progress()
        self.model: Any = None
        self.optimizer: Any = None
        self.backend: engine.StepBackend | None = None
        self.reporter: Reporter | None = None
        self.trackers: RunTrackers | None = None  # the main process's (logging.trackers)
        self.lock: RunLock | None = None
        self.last_saved: Path | None = None  # the checkpoint this process last wrote
        self.accepted_changes: list[dict[str, Any]] = []  # over every resume of the run
        self.grad_check_pending = False
        # Finite training losses since the last evaluation; tensors, so no per-step device sync.
        self.loss_sum: torch.Tensor | float = 0.0
        self.loss_count: torch.Tensor | int = 0
        self.nonfinite = NonFinitePolicy(recipe.trainer)
        self.gaps: list[float] = []
        self.stops = StopSignals()
        self.flags = StepFlags()
        self.signals: list[str] = []  # stop signals any rank had at the last step's flags

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        """Build everything, claim the run folder, and resume or enter the first stage.

        Each phase's seconds go to ``status.json`` (``setup_s``): where a start-up goes.
        """
        times: dict[str, float] = {}
        clock = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            times[name] = round(now - clock, 3)
            clock = now

        self._setup_processes()
        phase("processes")
        claim = self._setup_run_folder()
        phase("run_folder")
        self._setup_model()
        phase("model")
        self._setup_data()
        phase("data")
        self._setup_schedule()
        if claim.checkpoint is not None:
            self._load(claim.checkpoint)
            phase("resume")
        else:
            self._enter_stage(0, carry=False)
            phase("engine")
        self._setup_reporting(claim)
        phase("reporting")
        assert self.reporter is not None
        self.reporter.status_extra["setup_s"] = times
        log.info("set-up in %.2f s: %s", sum(times.values()),
                 ", ".join(f"{k} {v:.2f}" for k, v in times.items()))

    def _setup_processes(self) -> None:
        ensure_process_group_env()  # the launcher's world size, for a global batch
        try:
            self.recipe = with_global_batch(self.recipe, int(os.environ["WORLD_SIZE"]))
        except BatchSizeError as exc:
            raise TrainingError(str(exc)) from None
        self.acc = acc = build_accelerator(self.recipe)
        self.rank, self.world = acc.process_index, acc.num_processes
        self.main = acc.is_main_process
        self.stops.install()  # record SIGUSR2/SIGTERM/SIGINT from here on; acted on at steps
        dist = torch.distributed
        if dist.is_initialized() and dist.get_world_size() > 1:
            if not (engine.is_deepspeed(acc) or acc.distributed_type.name.startswith("MULTI_")):
                raise TrainingError(f"{dist.get_world_size()} processes but Accelerate chose "
                                    f"{acc.distributed_type}: ranks would train separately")
            cpu_group()  # the step flags' group: created (a collective) at the same point
        from accelerate.utils import set_seed

        set_seed(self.recipe.trainer.seed)

    def _setup_model(self) -> None:
        self.base_module = self._checkpointed(build_model(self.recipe.model))
        self.spec = describe_model(self.base_module, self.recipe.model.name)

        self.plan: ResolvedPlan = resolve_plan(self.recipe, self.spec)
        # Adapter stages checkpoint only what trains; the rest is rebuilt from the recipe's
        # model section, which this digest pins (checked on resume).
        self.base_digest = state_digest(self.base_module.state_dict()) \
            if self.plan.has_adapters else None
        check_plan_consistency(self.acc, self.plan, "at start")
        self.stages = StageSwitcher(self.acc, self.recipe, self.plan, self._fresh_module,
                                    self.run.stage_weights)

    def _setup_run_folder(self) -> Claim:
        """The main process locks and claims the folder; every rank learns the outcome."""
        claim, problem = None, None
        if self.main:
            try:
                # The room for a checkpoint, from the model's shipped spec: no build needed.
                room = checkpoint_bytes(fast_model_spec(self.recipe.model).num_params,
                                        self.recipe.trainer)
                claim, self.lock = claim_run_folder(self.run, self.resume, self.overwrite,
                                                    recipe_to_dict(self.recipe), room)
            except Exception as exc:  # every rank waits below: tell them, then raise
                gather_objects((None, (isinstance(exc, RunUsageError), str(exc))))
                raise
        claim, problem = gather_objects((claim, problem))[0]
        if problem is not None:
            usage, message = problem
            raise (RunUsageError if usage else TrainingError)(message)
        self.run_id = claim.run_id
        setup_logging(self.run, self.rank, self.main)
        self.reporter = Reporter(self.run, claim.run_id, self.rank, self.world, self.main,
                                 self.recipe.logging.per_rank)
        for note in claim.notes:
            log.warning("%s", note)
        return claim

    def _setup_data(self) -> None:
        recipe, data = self.recipe, self.recipe.data
        if data.cache is not None and data.verify_cache:
            self._verify_cache(data.cache)
        from dist_ft.models.preprocessing import input_config

        self.inputs = inputs = build_inputs(data, recipe.trainer.seed, self.rank, self.world,
                                            self.acc.device, self.run.bad_images(self.rank),
                                            input_config(recipe.model, data))
        train_set, val_set = inputs.train_set, inputs.val_set
        classes = len(train_set.classes)
        if classes != recipe.model.num_classes:
            raise TrainingError(
                f"model.num_classes is {recipe.model.num_classes} but the data has {classes} "
                f"classes ({', '.join(train_set.classes[:5])}...)"
            )
        if len(train_set) == 0 or len(val_set) == 0:
            raise TrainingError(f"empty split: train {len(train_set)}, "
                                f"val {len(val_set)} images under {data.root or data.cache}")
        self.loss_fn = build_loss(recipe.trainer.loss, train_set.multilabel,
                                  train_set.targets).to(self.acc.device)
        try:
            name, mode = resolve_monitor(recipe.trainer.monitor, recipe.trainer.monitor_mode,
                                         train_set.multilabel, list(train_set.classes))
        except MonitorError as exc:
            raise TrainingError(str(exc)) from None
        self.monitor = Monitor(name, mode, recipe.schedule.plateau_threshold,
                               recipe.schedule.plateau_threshold_mode)
        self.contract = run_contract(
            recipe_to_dict(recipe), self.plan.digest, inputs.split_digest(),
            global_batch=data.batch_size * self.world * recipe.trainer.grad_accum_steps)

    def _setup_schedule(self) -> None:
        trainer = self.recipe.trainer
        micro_per_epoch = len(self.inputs.train_loader)
        self.steps_per_epoch = max(1, micro_per_epoch // trainer.grad_accum_steps)
        total = trainer.epochs * self.steps_per_epoch
        self.total_steps = min(total, trainer.max_steps or total)
        self.schedule = LrSchedule(self.recipe.schedule, self.total_steps, self.steps_per_epoch)

    def _setup_reporting(self, claim: Claim) -> None:
        recipe, p = self.recipe, self.progress
        if self.main:
            write_json_atomic(self.run.recipe, None, text=yaml.safe_dump(
                recipe_to_dict(recipe), sort_keys=False))
            write_json_atomic(self.run.plan, plan_to_json(self.plan))
        # A checkpoint at step N was written after everything logged at step N, so a resumed
        # run hides only what an interrupted segment logged after it (steps > N); a restart
        # at step 0 of a run that logged before hides all of it.
        purge = p.step + 1 if claim.checkpoint is not None else \
            (0 if self.resume is not None and self.run.tb.exists() else None)
        texts = {"recipe": "```yaml\n" + yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)
                 + "\n```", "plan": plan_to_text(self.plan), "run": f"run id {self.run_id}"}
        assert self.reporter is not None
        self.reporter.segment_extra["backend"] = engine.backend_name(self.acc, self.model)
        if self.main:
            self.trackers = RunTrackers(self.acc, self.run, recipe.logging.trackers)
            self.trackers.start(self.run_id, recipe_to_dict(recipe), purge)
        self.reporter.open(p, self.total_steps, texts, purge, self.trackers)
        self.reporter.status("running", p)
        log.info("run %s, rank %d/%d on %s, %s, %d train / %d val images, "
                 "%d steps of %d images", self.run_id, self.rank, self.world, self.acc.device,
                 engine.backend_name(self.acc, self.model),
                 len(self.inputs.train_set), len(self.inputs.val_set), self.total_steps,
                 recipe.data.batch_size * self.world * recipe.trainer.grad_accum_steps)

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

    # ------------------------------------------------------------------ stages
    def _fresh_module(self, state: dict[str, torch.Tensor],
                      adapters: ResolvedAdapters | None) -> nn.Module:
        cfg = ModelConfig(name=self.recipe.model.name, num_classes=self.recipe.model.num_classes)
        module = build_model(cfg)
        if adapters is not None:  # their values come from ``state``: no seed needed
            module = adapt(module, None, adapters)
        module.load_state_dict(state)
        return self._checkpointed(module)

    def _checkpointed(self, module: nn.Module) -> nn.Module:
        if self.recipe.trainer.activation_checkpointing:
            from dist_ft.models.checkpointing import enable_activation_checkpointing

            blocks = enable_activation_checkpointing(module, self.recipe.model.name)
            log.info("activation checkpointing on %d blocks", len(blocks))
        return module

    def _enter_stage(self, index: int, carry: bool, snapshot: bool = True,
                     start: PortableState | None = None) -> None:
        """Make stage ``index`` current (see :class:`StageSwitcher`)."""
        model = self.base_module if self.model is None else self.model
        self.model, self.optimizer = self.stages.enter(index, model, self.optimizer,
                                                       self.progress, carry, snapshot, start)
        if self.reporter is not None:  # every stage entry's cost (an engine rebuild)
            self.reporter.status_extra["stage_entries"] = self.stages.entries
        self.backend = engine.step_backend(self.acc, self.model, self.optimizer)
        self.grad_check_pending = True

    def _stage_due(self) -> int:
        p = self.progress
        return self.plan.stage_at(epoch=p.epoch, step=p.step).index

    def _train_mode(self) -> None:
        self.model.train()
        set_bn_modes(engine.unwrap(self.acc, self.model), self.plan.stages[self.progress.stage])

    # ------------------------------------------------------------------ loop
    def train(self) -> dict[str, Any]:
        """Run until ``trainer.max_steps``/``trainer.epochs`` or early stopping."""
        acc, recipe, p = self.acc, self.recipe, self.progress
        assert self.reporter is not None and self.backend is not None
        self.reporter.status_extra["train_started_at"] = time.time()
        stop = p.step >= self.total_steps
        while not stop:
            if self._stage_due() != p.stage:
                self._enter_stage(self._stage_due(), carry=True)
            self.inputs.train_sampler.set_epoch(p.epoch, start=p.samples_in_epoch // self.world)
            self._train_mode()
            window_start, window_images = time.perf_counter(), 0
            for images, targets in self.inputs.train_loader:
                if p.step >= self.total_steps:  # max_steps reached mid-epoch
                    break
                loss, finite = self._micro_step(images, targets)
                self.loss_sum = self.loss_sum + torch.where(finite, loss, 0.0)
                self.loss_count = self.loss_count + finite.long()
                p.samples_in_epoch += len(images) * self.world
                window_images += len(images) * self.world
                if not acc.sync_gradients:
                    continue
                p.step += 1
                if p.step % recipe.logging.every_steps == 0 or p.step == 1:
                    # Windows are contiguous: logging's own cost counts in the next one.
                    now = time.perf_counter()
                    rate = window_images / max(1e-9, now - window_start)
                    window_start, window_images = now, 0
                    self._log_step(loss, rate)
                # After the window's postfix: a progress line shows this step's loss, not
                # the previous window's.
                self.reporter.bar.update(1)
                every = recipe.trainer.checkpoint_every_steps
                slow = False  # a checkpoint or an engine rebuild: where signals tend to land
                if every and p.step % every == 0 and p.step < self.total_steps:
                    self.save()
                    slow = True
                if p.step < self.total_steps and self._stage_due() != p.stage:
                    self._enter_stage(self._stage_due(), carry=True)
                    self._train_mode()
                    slow = True
                if slow and not self.signals and p.step < self.total_steps:
                    # Alike on every rank: ask again now rather than at the next step, so a
                    # stop reuses the checkpoint just written instead of writing another.
                    self.signals = self.stops.agreed()
                if p.step < self.total_steps and self.signals:
                    self._stop_on_signal(self.signals)
            else:  # the epoch ran to its end
                p.epoch += 1
                p.samples_in_epoch = 0
                if p.epoch % recipe.trainer.eval_every_epochs == 0 or p.step >= self.total_steps:
                    stop = self._end_of_epoch_eval()
                if self.backend.replicated:
                    check_replicas(acc, engine.unwrap(acc, self.model), f"after epoch {p.epoch}")
                if p.step < self.total_steps and not stop:
                    self.save()
                    self.signals = self.signals or self.stops.agreed()  # as after a save above
                    if self.signals:
                        self._stop_on_signal(self.signals)
            stop = stop or p.step >= self.total_steps
        if not p.last_metrics or p.samples_in_epoch:
            self._end_of_epoch_eval()
        return p.last_metrics

    def _micro_step(self, images: torch.Tensor,
                    targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward of one micro-batch; the update at a step boundary.

        Returns:
            The detached loss and whether it is finite (0-d tensors on the device).
        """
        acc, backend = self.acc, self.backend
        assert backend is not None
        images = images.to(acc.device, non_blocking=True)
        targets = targets.to(acc.device, non_blocking=True)
        x = self.inputs.train_batch(images)
        with acc.accumulate(self.model):
            boundary = acc.sync_gradients
            if boundary:
                factor = self.schedule.factor(self.progress.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
            loss = self.loss_fn(self.model(x), targets)
            finite = self.nonfinite.observe(loss)
            if boundary:  # the step's flags travel while the backward runs
                self.flags.start(self.nonfinite.take_window(), self.stops.pending())
            backend.backward(loss)
            skip = boundary and self._skip_step()
            if boundary and not skip:
                if self.grad_check_pending:
                    self._report_gradless()
                backend.clip(self.recipe.trainer.grad_clip_norm)
            try:
                backend.step(skip)
            except RuntimeError as exc:  # a skip DeepSpeed did not honour
                raise TrainingError(f"step {self.progress.step + 1}: {exc}") from None
        return loss.detach(), finite

    def _skip_step(self) -> bool:
        """Whether this step's update is dropped (trainer.nonfinite_loss), from the step's
        flags; also records the stop signals they carry."""
        step = self.progress.step + 1
        agreed = self.flags.wait()
        self.signals = agreed.signals
        skip = self.nonfinite.skip_step(self.progress, agreed.nonfinite_ranks,
                                        self.run.latest_checkpoint)
        if skip:
            assert self.reporter is not None
            self.reporter.skipped(self.progress, step)
        return skip

    def _report_gradless(self) -> None:
        """After the first backward of a stage: name trainable params that got no gradient."""
        self.grad_check_pending = False
        missing = engine.params_without_grad(self.acc, self.model)
        # LoRA starts with B = 0, so A's first gradient is exactly zero: expected, not a fault.
        missing = [n for n in missing if ".lora_A." not in n]
        if missing:
            log.warning("stage %d: %d trainable parameter(s) received no gradient: %s",
                        self.progress.stage, len(missing), ", ".join(missing[:10]))

    def _log_step(self, loss: torch.Tensor, rate: float) -> None:
        assert self.reporter is not None and self.backend is not None
        mean_loss = float(self.acc.reduce(loss.float(), reduction="mean"))
        lrs = {g["name"]: g["lr"] for g in self.optimizer.param_groups}
        self.reporter.step(self.progress, float(loss), mean_loss, rate, lrs,
                           self.backend.grad_norm() if self.main else None)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, Any]:
        """Exact metrics over the whole validation split (each sample once, all ranks)."""
        return evaluate_exact(self.acc, self.model, self.inputs.val_loader, self.inputs.val_set,
                              self.inputs.eval_batch, self.loss_fn)

    def _end_of_epoch_eval(self) -> bool:
        """Evaluate, log, feed the schedule and early stopping; True to stop."""
        p, cfg = self.progress, self.recipe.trainer
        metrics = self.evaluate()
        metrics.update(epoch=p.epoch, step=p.step)
        trained = isinstance(self.loss_count, torch.Tensor)  # alike on every rank
        gap = None
        if trained:  # mean over all ranks' finite micro-batch losses since the last evaluation
            totals = torch.stack([torch.as_tensor(self.loss_sum, dtype=torch.float32),
                                  torch.as_tensor(self.loss_count, dtype=torch.float32)])
            total, count = self.acc.reduce(totals.to(self.acc.device), reduction="sum").tolist()
            self.loss_sum, self.loss_count = 0.0, 0
            if count:
                metrics["train_loss"] = total / count
                gap = metrics["val_loss"] - metrics["train_loss"]
                self.gaps.append(gap)
                if len(self.gaps) >= 3 and self.gaps[-3] < self.gaps[-2] < self.gaps[-1]:
                    log.warning("train/validation gap widening for 2 evaluations: %s "
                                "(overfitting? consider early stopping or a lower lr)",
                                " -> ".join(f"{g:.4f}" for g in self.gaps[-3:]))
        p.last_metrics = metrics
        monitor = self.monitor
        new_best, gain = monitor.update(metrics, p.epoch, p.step)
        value = metric_value(metrics, monitor.name)
        if math.isnan(value):
            log.warning("%s is undefined at epoch %d (no positives or no negatives in the "
                        "validation split?): no model selected, patience counts on",
                        monitor.name, p.epoch)
        if self.schedule.observe(value, gain):
            log.info("plateau: %s without a gain for %d evaluations; lr x%g (now x%g)",
                     monitor.name, self.recipe.schedule.plateau_patience + 1,
                     self.recipe.schedule.gamma, self.schedule.plateau_scale)
        assert self.reporter is not None
        self.reporter.evaluation(p, metrics, gap)
        if new_best:
            self._save_best(metrics)
        patience = cfg.early_stopping_patience
        if patience and monitor.evals_without_gain >= patience:
            log.info("early stopping: %s without a gain in %d evaluations (best %s at epoch "
                     "%s)", monitor.name, patience, monitor.best, monitor.best_epoch)
            return True
        return False

    def _save_best(self, metrics: dict[str, Any]) -> None:
        """Write ``best/`` (a collective call): the weights just evaluated, outside the
        checkpoint rotation, so early stopping and ``keep_last`` never lose them."""
        monitor = self.monitor
        state = engine.full_state_dict(self.acc, self.model)
        if self.main:
            selected = monitor.selected()
            self._write_weights(self.run.best_weights, self.run.best_metrics, state,
                                {**metrics, "selected_by": selected}, selected)
            assert self.reporter is not None
            self.reporter.status_extra["best"] = selected
            log.info("new best %s %.4f at epoch %d (step %d): %s", monitor.name, monitor.best,
                     monitor.best_epoch, monitor.best_step, self.run.best_weights)

    def _write_weights(self, weights: Path, metrics_path: Path, state: dict[str, torch.Tensor],
                       metrics: dict[str, Any], about: dict[str, Any] | None = None) -> None:
        """Consolidated fp32 weights (torchvision names) and their metrics, each atomically.

        The safetensors header names the model, plan, run and (``about``) the epoch, step and
        selection: the weights describe themselves, so a crash between the two renames
        leaves at worst a stale ``metrics.json`` beside them, never a wrong description read
        from the weights (``dist-ft eval`` reads the header first).
        """
        from safetensors.torch import save_file

        weights.parent.mkdir(parents=True, exist_ok=True)
        stage = self.plan.stages[self.progress.stage]
        adapted = state
        if stage.adapters is not None:  # a plain model, loadable anywhere: adapters merged
            state = merged_state_dict(self.recipe.model, state, stage.adapters)
        else:
            remove_peft_adapter(weights.parent)  # left by an adapter stage: not these weights
        tmp = weights.with_name(weights.name + ".tmp")
        header = {"model": self.recipe.model.name, "digest": self.plan.digest,
                  "run_id": self.run_id, **{k: str(v) for k, v in (about or {}).items()}}
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata=header)
        with open(tmp, "rb") as fh:  # on disk before the rename makes it the weights
            os.fsync(fh.fileno())
        tmp.replace(weights)
        write_json_atomic(metrics_path, metrics)
        if stage.adapters is not None:
            self._write_peft_adapter(weights.parent, adapted, stage)

    def _write_peft_adapter(self, folder: Path, state: dict[str, torch.Tensor],
                            stage: ResolvedStage) -> None:
        """The stage's adapters alone, in peft's format, beside the merged weights (written
        after them: the weights are what ``eval``/``export`` read)."""
        assert stage.adapters is not None
        remove_peft_adapter(folder)
        saved, why = peft_modules_to_save(stage.trainable, stage.adapters)
        if why:
            log.warning("adapters not written in peft's format to %s: %s; the merged weights "
                        "are in %s", folder, why, folder / WEIGHTS)
            return
        try:
            size = save_peft_adapter(folder, self.recipe.model, state, stage.adapters, saved)
        except Exception as exc:  # the merged weights are written: never lose them to this
            log.warning("adapters not written in peft's format to %s: %s", folder, exc)
            return
        log.info("adapters (%s, %s params) in peft's format: %s (%.2f MiB)", stage.adapters.kind,
                 f"{stage.adapter_params:,}", folder / ADAPTER_WEIGHTS, size / 2**20)
        if set(self.plan.changed_before(stage.index)) - set(stage.trainable):
            log.warning("%s applies to the base these weights merged it into, not to the model "
                        "built from model.pretrained alone (earlier stages changed frozen "
                        "weights): use %s", folder / ADAPTER_WEIGHTS, folder / WEIGHTS)

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> Path:
        """Write a checkpoint of the current state (every rank takes part)."""
        engine.average_bn_stats(self.acc, self.model)
        state = {"run_id": self.run_id, "progress": self.progress.state_dict(),
                 "schedule": self.schedule.state_dict(), "monitor": self.monitor.state_dict(),
                 "contract": self.contract,
                 "accepted_changes": self.accepted_changes, "world_size": self.world,
                 "steps_per_epoch": self.steps_per_epoch}
        rank_state = {"generator": self.inputs.generator.get_state()}
        changed = None
        stage = self.plan.stages[self.progress.stage]
        if stage.adapters is not None:  # lean: what trains, what changed, the base's digest
            changed = self._changed_frozen(stage)
            state["base"] = {"model": self.recipe.model.name,
                             "pretrained": self.recipe.model.pretrained,
                             "digest": self.base_digest, "changed_frozen": sorted(changed)}
        portable = None
        if engine.is_deepspeed(self.acc) and self.recipe.trainer.portable_checkpoints:
            # For a resume on another number of processes (DeepSpeed's files fit only theirs).
            weights = engine.full_state_dict(self.acc, self.model)
            if changed is not None:  # lean, as DeepSpeed's files: the frozen weights are rebuilt
                frozen = {n for n, q in engine.unwrap(self.acc, self.model).named_parameters()
                          if not q.requires_grad}
                weights = {n: v for n, v in weights.items() if n not in frozen}
            portable = PortableState(weights, engine.snapshot_moments(
                self.acc, self.model, self.optimizer, self.stages.keys),
                engine.group_steps(self.acc, self.optimizer))
            portable = portable if self.main else None  # every rank gathered; main writes
        path = save_checkpoint(self.acc, self.run, self.progress.step, state, rank_state,
                               self.recipe.trainer.keep_last, changed, self._sharded(),
                               portable)
        self.last_saved = path
        usage = process_resources()  # a soak's evidence: no growth from one to the next
        log.info("checkpoint %s (rank %d: %s open files, RSS %.0f MiB)", path, self.rank,
                 usage.get("open_files", "?"), usage.get("rss_mib", float("nan")))
        return path

    def _changed_frozen(self, stage: ResolvedStage) -> dict[str, torch.Tensor]:
        """Frozen weights of ``stage`` that differ from the initial ones, by their base names
        (a collective call under ZeRO-3)."""
        assert stage.adapters is not None
        trainable = set(stage.trainable)
        names = {n: stage.adapters.adapted_name(n)
                 for n in self.plan.changed_before(stage.index)}
        names = {n: a for n, a in names.items() if a not in trainable}
        found = engine.full_params(self.acc, self.model, list(names.values()))
        return {n: found[a] for n, a in names.items()}

    def _load_base(self, path: Path, state: dict[str, Any]) -> None:
        """Before resuming a lean checkpoint: check that the model built from the recipe is
        the one it was trained from, and put back its frozen weights that had changed.

        Raises:
            RunUsageError: the initial weights differ (``model.pretrained`` changed).
        """
        base = state.get("base", {})
        if base.get("digest") != self.base_digest:
            raise RunUsageError(
                f"{path} stores only what trains in an adapter stage; the rest comes from "
                f"model.pretrained ({base.get('pretrained')!r} when saved, "
                f"{self.recipe.model.pretrained!r} now), whose weights differ from the ones "
                f"it was trained from ({base.get('digest')} != {self.base_digest}): resume "
                "with the same initial weights")
        changed = read_changed_frozen(path)
        if changed:
            _missing, unexpected = self.base_module.load_state_dict(changed, strict=False)
            if unexpected:
                raise RunUsageError(f"{path}: frozen weights the model lacks: {unexpected[:3]}")

    def _load(self, path: Path) -> None:
        """Resume from a verified checkpoint after checking that it fits this run.

        Raises:
            RunUsageError: the run differs from the checkpoint in a way not accepted.
        """
        state = read_trainer_state(path)
        if "progress" not in state:
            raise RunUsageError(f"{path} was written by an older dist-ft, before run ids and "
                                "exact-resume checks: start a new run from its weights instead")
        # Checkpoints written before the contract held the global batch: derived here.
        state["contract"] = with_recorded_global_batch(state.get("contract", {}),
                                                       state.get("world_size"))
        try:
            changes = check_resume(state["contract"], self.contract,
                                   self.accept_changes, str(path))
        except ResumeMismatch as exc:
            raise RunUsageError(str(exc)) from None
        self.accepted_changes = [*state.get("accepted_changes", []), *(
            {"key": c.key, "was": c.saved, "now": c.now, "at_step": state["progress"]["step"]}
            for c in changes)]
        for change in changes:
            log.warning("resume: accepted change %s", change)
        if self.accepted_changes:
            assert self.reporter is not None
            self.reporter.status_extra["accepted_changes"] = self.accepted_changes
        p = self.progress
        p.load_state_dict(state["progress"])
        self.schedule.load_state_dict(state["schedule"])
        if not self.monitor.load_state_dict(state.get("monitor", {})) and "monitor" in state:
            log.warning("resume: the checkpoint selected best/ by %s (%s), this run by %s (%s): "
                        "selection starts anew and the next evaluation replaces best/",
                        state["monitor"].get("name"), state["monitor"].get("mode"),
                        self.monitor.name, self.monitor.mode)
        if self.monitor.best is not None and self.reporter is not None:
            self.reporter.status_extra["best"] = self.monitor.selected()
        stage = self.plan.stages[p.stage]
        lean = stage.adapters is not None  # the checkpoint holds what trains: see save()
        saved_world = state.get("world_size", self.world)
        portable = None
        if saved_world != self.world:
            self._note_world_change(path, state)
            if engine.is_deepspeed(self.acc):  # DeepSpeed's partitions fit only their world
                try:
                    portable = read_portable(path)
                except CheckpointDamaged as exc:
                    raise RunUsageError(f"{exc} (trainer.portable_checkpoints was false, or "
                                        f"an older dist-ft wrote it): resume it on "
                                        f"{saved_world} processes") from None
        if lean:
            self._load_base(path, state)
        self._enter_stage(p.stage, carry=False, snapshot=False, start=portable)
        if portable is None:
            load_checkpoint(self.acc, path, stage.trainable if lean else None, self._sharded())
        if (path / f"rank{self.rank}.pt").is_file():
            self.inputs.generator.set_state(load_rank_state(path, self.rank)["generator"])
        log.info("resumed from %s at step %d (epoch %d, stage %d)%s", path, p.step, p.epoch,
                 p.stage, f" on {self.world} processes, saved on {saved_world}: name-keyed "
                 "weights and moments" if portable is not None else "")

    def _note_world_change(self, path: Path, state: dict[str, Any]) -> None:
        """Say what a resume on another number of processes keeps: the global batch (checked
        by the contract), the data position (in samples of the global order), the steps."""
        p, saved = self.progress, state.get("world_size")
        batch, was = self.contract["data.global_batch"], state["contract"].get("data.global_batch")
        kept = f"the global batch stays {batch}" if was in (None, batch) else (
            f"the global batch changes from {was} to {batch} (accepted): steps count on from "
            f"{p.step} and the schedule's step counts now mean batches of {batch}")
        log.warning(
            "resume: %s was written by %s processes, this run has %d; %s (%d per process), "
            "the epoch continues at its sample %d (step %d)%s", path, saved, self.world, kept,
            self.recipe.data.batch_size, p.samples_in_epoch, p.step,
            (f"; ranks {saved}..{self.world - 1} start their augmentation streams anew"
             if isinstance(saved, int) and self.world > saved else "")
            + (f"; {p.samples_in_epoch % self.world} samples before it are read again (the "
               f"position rounds down to a multiple of {self.world})"
               if p.samples_in_epoch % self.world else ""))
        before = state.get("steps_per_epoch")
        if before is not None and before != self.steps_per_epoch:
            # The last batch of an epoch is padded per process: its size depends on the world.
            log.warning("resume: an epoch is %d steps on %d processes, %d on %s: epoch "
                        "boundaries and trainer.epochs' step count follow this run",
                        self.steps_per_epoch, self.world, before, saved)

    def _sharded(self) -> tuple[Any, Any] | None:
        """The FSDP2 model and optimizer, whose checkpoints go through DCP; None otherwise."""
        return (self.model, self.optimizer) if engine.is_fsdp(self.acc, self.model) else None

    def _stop_on_signal(self, signals: list[str]) -> None:
        """Checkpoint on every rank, requeue after SIGUSR2, and raise Preempted."""
        p = self.progress
        log.warning("rank %d: %s received; checkpointing at step %d", self.rank,
                    "+".join(signals), p.step)
        saved = self.last_saved  # written this step already (a checkpoint or epoch end)?
        path = saved if saved is not None and RunDir.checkpoint_step(saved) == p.step \
            else self.save()
        requeued, note = requeue_job(signals, self.recipe.launch.max_requeues, self.main)
        assert self.reporter is not None
        self.reporter.status("stopped", p, signals=signals, checkpoint=str(path), note=note)
        self.reporter.flush()
        raise Preempted(p.step, path, signals, requeued, note)

    # ------------------------------------------------------------------ end
    def finish(self) -> Path:
        """Write ``final/model.safetensors``: the last weights (consolidated fp32, torchvision
        names); the selected ones are in ``best/``."""
        assert self.reporter is not None
        if self.recipe.trainer.save_stage_weights:
            self.stages.save_weights(f"stage{self.progress.stage}_end", self.model,
                                     self.optimizer)
        state = engine.full_state_dict(self.acc, self.model)
        sums = gather_objects([float(v.double().sum()) for v in state.values()])
        if any(s != sums[0] for s in sums):
            raise TrainingError("final weights differ between ranks")
        if self.world > 1:
            log.info("final weights identical on %d ranks", self.world)
        if self.main:
            self._write_weights(self.run.final_weights, self.run.final_metrics, state,
                                self.progress.last_metrics,
                                {"epoch": self.progress.epoch, "step": self.progress.step})
            self.reporter.status("finished", self.progress,
                                 score=self.progress.last_metrics.get("score"))
        self.reporter.close()
        self.acc.wait_for_everyone()
        return self.run.final_weights

    def explain(self, exc: BaseException) -> BaseException:
        """The error to report for ``exc``: lost ranks and bad data get their own wording."""
        if isinstance(exc, KeyboardInterrupt):
            latest = self.run.latest_checkpoint()
            return TrainingError(f"interrupted (Ctrl-C twice) at step {self.progress.step}; "
                                 "continue with --resume auto"
                                 + (f": from {latest}" if latest else ""))
        if lost_peer(exc):
            return TrainingError(_lost_peer_message(self, exc))
        if isinstance(exc, ImageError | CacheError):
            return TrainingError(_data_error_message(exc))
        return exc

    def close(self) -> None:
        """Release the handlers, the lock and the process group."""
        self.stops.restore()
        if self.reporter is not None:
            self.reporter.close()
        if self.lock is not None:
            self.lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Avoids exit-time aborts seen with gloo + DeepSpeed.
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
    latest = trainer.run.latest_checkpoint()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"rank {getattr(trainer, 'rank', '?')} lost contact with the other ranks at step "
            f"{trainer.progress.step}: another rank died, was killed or hung for longer than "
            f"trainer.collective_timeout_min={trainer.recipe.trainer.collective_timeout_min:g} "
            f"(see {trainer.run.logs}/rank*.log). Continue with --resume auto: "
            f"{'from ' + str(latest) if latest else 'no checkpoint yet, so from the start'}. "
            f"[{first[:300]}]")


def done_summary(trainer: Trainer, metrics: dict[str, Any], final: Path) -> str:
    """The lines ``dist-ft train`` ends with: the validation score named as what it is, the
    selected and the last weights, and where the trackers (TensorBoard ...) recorded the run."""
    lines = [f"done: {trainer.progress.step} steps, validation {score_text(metrics)}"]
    m = trainer.monitor
    if m.best is not None:
        lines.append(f"  best weights ({m.name} {m.best:.4f} at epoch {m.best_epoch}): "
                     f"{trainer.run.best_weights}")
    lines.append(f"  last weights: {final}")
    # Where logging.trackers recorded the run, and how to look (tensorboard --logdir ...).
    lines += [f"  {hint}" for hint in (trainer.trackers.hints if trainer.trackers else [])]
    return "\n".join(lines)


def run_training(recipe: Recipe, resume: str | None = None, overwrite: bool = False,
                 accept_changes: Sequence[str] = ()) -> dict[str, Any]:
    """Set up, train and finish one run on this process; what ``dist-ft train`` runs.

    Returns:
        The final validation metrics plus ``weights`` (the final file's path) and ``step``.

    Raises:
        Preempted: a SIGUSR2/SIGTERM/SIGINT stopped the run after a complete checkpoint.
        RunUsageError: the run folder or the resume does not allow this start (exit 2).
        TrainingError: the run cannot start or continue.
    """
    trainer = Trainer(recipe, resume=resume, overwrite=overwrite, accept_changes=accept_changes)
    try:
        trainer.setup()
        metrics = trainer.train()
        final = trainer.finish()
        if trainer.main:
            print(done_summary(trainer, metrics, final), flush=True)
    except Preempted:
        raise
    except BaseException as exc:
        error = trainer.explain(exc)
        # The rank's log file keeps it (once it exists); the console has the command's own
        # error line.
        if trainer.reporter is not None:
            log.error("rank %s stopped: %s", getattr(trainer, "rank", "?"), error,
                      extra={"file_only": True})
        # Only a folder this run claimed gets its failure (never another run's status.json),
        # and a refused resume leaves the run's own status as it was.
        if trainer.reporter is not None and not isinstance(error, RunUsageError):
            trainer.reporter.status("failed", trainer.progress,
                                    error=f"{type(error).__name__}: {error}")
        if error is exc:
            raise
        raise error from exc
    finally:
        trainer.close()
    return {**metrics, "weights": str(final), "step": trainer.progress.step}
