"""Trainer components without a process group: schedule, losses, metrics, stage groups."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torchvision.models import get_model

from dist_ft.config import Recipe
from dist_ft.config.schema import ScheduleConfig
from dist_ft.models.spec import describe_model
from dist_ft.plan import resolve_plan
from dist_ft.train.losses import FocalLoss, build_loss, pos_weight_from
from dist_ft.train.metrics import classification_metrics
from dist_ft.train.schedule import LrSchedule
from dist_ft.train.stages import (
    apply_trainable,
    build_optimizer,
    optimizer_groups,
    set_bn_modes,
    training_since,
)
from tests.conftest import CONFIGS


def test_cosine_with_warmup() -> None:
    s = LrSchedule(ScheduleConfig(name="cosine", warmup_steps=4, min_lr_scale=0.1), 104, 10)
    assert s.factor(0) == pytest.approx(1 / 5) and s.factor(3) == pytest.approx(4 / 5)
    assert s.factor(4) == pytest.approx(1.0)
    assert s.factor(54) == pytest.approx(0.1 + 0.9 * 0.5)
    assert s.factor(104) == pytest.approx(0.1)


def test_step_and_plateau() -> None:
    step = LrSchedule(ScheduleConfig(name="step", step_epochs=2, gamma=0.5), 100, 10)
    assert [step.factor(k) for k in (0, 19, 20, 40)] == [1.0, 1.0, 0.5, 0.25]
    plateau = LrSchedule(ScheduleConfig(name="plateau", plateau_patience=1, gamma=0.1), 100, 10)
    gains = (True, True, False, False, True)
    reduced = [plateau.observe(m, g) for m, g in zip((0.5, 0.6, 0.6, 0.6, 0.7), gains, strict=True)]
    assert reduced == [False, False, False, True, False]
    assert plateau.factor(50) == pytest.approx(0.1)
    floor = LrSchedule(ScheduleConfig(name="plateau", plateau_patience=0, min_lr_scale=0.1),
                       100, 10)
    assert [floor.observe(1.0, False) for _ in range(3)] == [True, False, False]  # at the floor
    clone = LrSchedule(ScheduleConfig(name="plateau"), 100, 10)
    clone.load_state_dict(plateau.state_dict())
    assert clone.factor(50) == plateau.factor(50)


@pytest.mark.parametrize(("mode", "threshold_mode", "threshold", "patience", "cooldown"), [
    ("min", "rel", 1e-4, 1, 0), ("min", "abs", 0.05, 0, 2), ("max", "rel", 0.01, 2, 1),
    ("max", "abs", 0.0, 1, 3)])
def test_plateau_follows_the_monitor_as_torch_reduce_lr_on_plateau(
        mode: str, threshold_mode: str, threshold: float, patience: int, cooldown: int) -> None:
    """Monitor + LrSchedule give the lr of torch's ReduceLROnPlateau (an independent
    implementation) on the same sequence of monitored values, every setting alike."""
    from dist_ft.train.monitor import Monitor

    cfg = ScheduleConfig(name="plateau", gamma=0.5, plateau_patience=patience,
                         plateau_threshold=threshold, plateau_threshold_mode=threshold_mode,
                         plateau_cooldown=cooldown, min_lr_scale=0.01)
    ours = LrSchedule(cfg, 100, 10)
    monitor = Monitor("val/loss", mode, threshold, threshold_mode)  # type: ignore[arg-type]
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode=mode, factor=0.5, patience=patience, threshold=threshold,
        threshold_mode=threshold_mode, cooldown=cooldown, min_lr=0.01)
    values = np.random.default_rng(3).normal(1.0, 0.05, 60).cumsum() / np.arange(1, 61)
    for epoch, value in enumerate(values):
        _, gain = monitor.update({"val_loss": float(value)}, epoch, epoch)
        ours.observe(float(value), gain)
        reference.step(float(value))
        assert ours.factor(50) == pytest.approx(opt.param_groups[0]["lr"]), epoch
    assert opt.param_groups[0]["lr"] < 0.5  # the sequence did trigger reductions


def test_monitor_selects_the_strict_best_and_counts_gains_beyond_the_threshold() -> None:
    from dist_ft.train.monitor import Monitor, MonitorError, resolve_monitor

    assert resolve_monitor("auto", "auto", True, ["A"]) == ("val/auroc_mean", "max")
    assert resolve_monitor("auto", "auto", False, ["a", "b"]) == ("val/accuracy", "max")
    assert resolve_monitor("val/loss", "auto", True, ["A"]) == ("val/loss", "min")
    assert resolve_monitor("val_auroc/A", "min", True, ["A"]) == ("val_auroc/A", "min")
    with pytest.raises(MonitorError, match=r"val/accuracy.*multi-label.*val/loss"):
        resolve_monitor("val/accuracy", "auto", True, ["A"])
    with pytest.raises(MonitorError, match="val_auroc/B"):
        resolve_monitor("val_auroc/B", "auto", True, ["A"])
    m = Monitor("val/loss", "min", threshold=0.1, threshold_mode="abs")
    seen = [m.update({"val_loss": v}, e, 10 * e) for e, v in enumerate((1.0, 0.95, 0.8, 0.85))]
    assert seen == [(True, True), (True, False), (True, True), (False, False)]
    assert (m.best, m.best_epoch, m.best_step, m.evals_without_gain) == (0.8, 2, 20, 1)
    assert m.update({"val_loss": float("nan")}, 4, 40) == (False, False)
    other = Monitor("val/auroc_mean", "max")
    other.load_state_dict(m.state_dict())  # another metric's best means nothing here
    assert other.best is None


def test_losses() -> None:
    targets = np.array([[1, 0], [1, 0], [0, 0], [1, 1]], dtype=np.float32)
    assert pos_weight_from(targets).tolist() == pytest.approx([1.0, 3.0])  # clipped at 1
    logits, y = torch.zeros(4, 2), torch.from_numpy(targets)
    bce = build_loss("bce", True, targets)(logits, y)
    assert float(bce) == pytest.approx(math.log(2))
    weighted = build_loss("bce_pos_weight", True, targets)(logits, y)
    assert float(weighted) > float(bce)
    focal = FocalLoss()(logits, y)
    assert 0 < float(focal) < float(bce)
    with pytest.raises(ValueError, match="ce needs single-label"):
        build_loss("ce", True, targets)
    with pytest.raises(ValueError, match="use ce here"):
        build_loss("bce", False, np.array([0, 1]))


def test_metrics_exact_auroc_and_accuracy() -> None:
    scores = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.6]], dtype=np.float32)
    targets = np.array([[1, 0], [1, 0], [0, 0], [0, 0]], dtype=np.int64)
    m = classification_metrics(scores, targets, True, ["a", "b"])
    assert m["auroc"]["a"] == pytest.approx(1.0)
    assert math.isnan(m["auroc"]["b"])  # no positives: undefined, left out of the mean
    assert m["auroc_mean"] == pytest.approx(1.0)
    single = classification_metrics(scores, np.array([0, 0, 1, 0]), False, ["a", "b"])
    assert single["accuracy"] == pytest.approx(0.75)


def test_groups_split_by_history_and_optimizer_lrs(recipe_factory: Callable[..., Recipe]) -> None:
    recipe = recipe_factory({
        "model": {"name": "resnet18", "num_classes": 3},
        "plan": {"stages": [
            {"name": "head", "start_step": 0, "include": ["head"]},
            {"name": "top", "start_step": 5, "include": ["head", "layer4"]},
        ]},
        "optim": {"name": "sgd", "lr": 0.1, "no_decay_1d": False, "weight_decay": 0.0,
                  "groups": [{"name": "net", "match": ["all"], "lr_scale": 0.5}]},
    })
    model = get_model("resnet18", weights=None, num_classes=3)
    plan = resolve_plan(recipe, describe_model(model, "resnet18"))
    since = training_since(plan, 1)
    assert since["fc.weight"] == 0 and since["layer4.0.conv1.weight"] == 1
    groups = optimizer_groups(plan, 1)
    assert [g.name for g in groups] == ["net@head", "net@top"]
    assert {n for g in groups for n in g.params} == set(plan.stages[1].trainable)

    # Plain SGD: every parameter moves by exactly lr_group x grad.
    apply_trainable(model, plan.stages[1])
    optimizer = build_optimizer(recipe.optim.model_copy(update={"momentum": 0.0}), model, groups)
    model.train()
    set_bn_modes(model, plan.stages[1])
    assert not model.bn1.training and model.layer4[0].bn1.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    assert set(grads) == set(plan.stages[1].trainable)
    for name, param in model.named_parameters():
        expected = before[name] - 0.05 * grads[name] if name in grads else before[name]
        assert torch.allclose(param, expected, atol=1e-7), name


def test_global_batch_sets_the_per_process_batch_or_names_the_multiples() -> None:
    from dist_ft.config import load_recipe
    from dist_ft.train.runtime import BatchSizeError, with_global_batch

    chexnet = load_recipe(CONFIGS / "chestxray14_densenet121_chexnet.yaml")
    assert [with_global_batch(chexnet, w).data.batch_size for w in (1, 2, 8, 16)] == [16, 8, 2, 1]
    accumulating = chexnet.model_copy(update={"trainer": chexnet.trainer.model_copy(
        update={"grad_accum_steps": 2})})
    assert with_global_batch(accumulating, 4).data.batch_size == 2
    with pytest.raises(BatchSizeError, match=r"global_batch_size=16 does not split over 3 "
                                             r"process\(es\).*multiple of 3 \(e\.g\. 15 or 18\)"):
        with_global_batch(chexnet, 3)
    with pytest.raises(BatchSizeError, match="multiple of 32"):
        with_global_batch(chexnet, 32)
    plain = load_recipe(CONFIGS / "chestxray14_densenet121.yaml")
    assert with_global_batch(plain, 8) is plain  # no global batch: the per-process one stays


def test_the_chexnet_recipe_is_the_published_protocol() -> None:
    """Rajpurkar et al. 2017, 3.1: what the recipe's header claims, checked on the recipe."""
    from dist_ft.config import load_recipe

    r = load_recipe(CONFIGS / "chestxray14_densenet121_chexnet.yaml")
    assert (r.model.name, r.model.pretrained, r.data.image_size) == ("densenet121", "imagenet",
                                                                      224)
    aug = r.data.augment
    assert (aug.crop_scale, aug.ratio, aug.rotation_deg, aug.hflip) == ((1, 1), (1, 1), 0, True)
    assert [s.include[0].keyword for s in r.plan.stages] == ["all"] and r.plan.bn_policy == "train"
    assert (r.optim.name, r.optim.lr, r.optim.betas) == ("adam", 1e-3, (0.9, 0.999))
    assert r.data.global_batch_size == 16 and r.trainer.grad_clip_norm is None
    assert (r.trainer.loss, r.trainer.monitor, r.schedule.name, r.schedule.gamma) == (
        "bce", "val/loss", "plateau", 0.1)


def test_validation_auroc_leaves_out_ignored_labels() -> None:
    """NaN targets (CheXpert's U-Ignore) drop out of their class, as if the rows were absent."""
    rng = np.random.default_rng(0)
    scores = rng.random((200, 3)).astype(np.float32)
    targets = (rng.random((200, 3)) < 0.4).astype(np.float32)
    ignored = targets.copy()
    ignored[:50, 1] = np.nan
    ignored[:, 2] = np.where(np.arange(200) < 199, np.nan, 1.0)  # one known label: undefined
    got = classification_metrics(scores, ignored, True, ["a", "b", "c"])
    kept = classification_metrics(scores[50:], targets[50:], True, ["a", "b", "c"])
    full = classification_metrics(scores, targets, True, ["a", "b", "c"])
    assert got["auroc"]["a"] == pytest.approx(full["auroc"]["a"])
    assert got["auroc"]["b"] == pytest.approx(kept["auroc"]["b"])
    assert math.isnan(got["auroc"]["c"])
    assert got["auroc_mean"] == pytest.approx((got["auroc"]["a"] + got["auroc"]["b"]) / 2)


def test_a_lone_sigterm_in_a_slurm_job_waits_briefly_for_the_sigusr2_of_a_preemption(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """submitit's preemption is SIGTERM then SIGUSR2 (two scancel calls): a step boundary
    between them must not stop the run on SIGTERM alone (no requeue)."""
    import signal

    from dist_ft.train import preemption

    outside = preemption.StopSignals()
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    outside._record(signal.SIGTERM, None)
    assert outside.agreed() == ["SIGTERM"]  # not in Slurm: stop at once
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    stops = preemption.StopSignals()
    stops._record(signal.SIGTERM, None)
    assert stops.agreed() == []  # within the grace: wait for a SIGUSR2
    stops._record(signal.SIGUSR2, None)
    assert stops.agreed() == ["SIGUSR2", "SIGTERM"]  # a preemption: checkpoint and requeue
    lone = preemption.StopSignals()
    lone._record(signal.SIGTERM, None)
    lone.term_at -= preemption.TERM_GRACE_S  # scontrol requeue / scancel: no SIGUSR2 comes
    assert lone.agreed() == ["SIGTERM"]


def test_step_flags_carry_the_nonfinite_ranks_and_the_signals_in_one_reduction() -> None:
    import signal

    from dist_ft.train.step_flags import StepFlags

    flags = StepFlags()
    with pytest.raises(RuntimeError, match="without start"):
        flags.wait()
    flags.start(nonfinite=True, signals={signal.SIGTERM})
    agreed = flags.wait()
    assert (agreed.nonfinite_ranks, agreed.signals) == ([0], ["SIGTERM"])
    flags.start(nonfinite=False, signals=set())
    assert flags.wait() == type(agreed)([], [])
    with pytest.raises(RuntimeError):  # one wait per start
        flags.wait()


def test_the_log_names_the_backend_that_runs() -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from dist_ft.train.engine import backend_name

    def acc(kind: DistributedType, processes: int, stage: int = 0) -> SimpleNamespace:
        plugin = SimpleNamespace(zero_stage=stage)
        return SimpleNamespace(distributed_type=kind, num_processes=processes,
                               state=SimpleNamespace(deepspeed_plugin=plugin))

    assert backend_name(acc(DistributedType.DEEPSPEED, 2, 3)) == "DeepSpeed ZeRO-3"
    assert backend_name(acc(DistributedType.MULTI_CPU, 2)) == "DDP"
    assert backend_name(acc(DistributedType.NO, 1)) == "one process"
