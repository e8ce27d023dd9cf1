"""``dist-ft train`` as one plain process (no launcher), and its early failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CONFIGS, REPO, plain_env

# Each test starts dist-ft train processes: run apart from the quick loop.
pytestmark = pytest.mark.multiprocess

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
FAST = ["data.image_size=32", "data.load_size=32", "data.batch_size=8", "trainer.max_steps=6",
        "plan.stages[1].start_step=2", "plan.stages[2].start_step=4", "logging.every_steps=1"]


def _train(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dist_ft", "train", str(SMOKE), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())


@pytest.mark.parametrize("backend", ["trainer.backend=ddp", "trainer.backend=deepspeed"])
def test_one_plain_process_trains_through_all_stages(
    tiny_cxr14_session: Path, tmp_path: Path, backend: str
) -> None:
    result = _train(f"data.root={tiny_cxr14_session}", f"output_dir={tmp_path}", *FAST,
                    "data.val_fraction=0.3", backend)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 6 steps, validation mean AUROC " in result.stdout
    assert "built successfully" not in result.stdout  # DeepSpeed's op note stays off stdout
    assert f"last weights: {tmp_path / 'final' / 'model.safetensors'}" in result.stdout
    assert f"tensorboard --logdir {tmp_path / 'tb'}" in result.stdout
    assert (tmp_path / "final" / "model.safetensors").is_file()
    assert (tmp_path / "best" / "model.safetensors").is_file()  # consolidated under ZeRO too
    metrics = json.loads((tmp_path / "final" / "metrics.json").read_text())
    assert metrics["val_samples"] > 0 and "auroc" in metrics
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "stage 2 'full' at step 4" in log
    assert (tmp_path / "recipe.yaml").is_file() and (tmp_path / "plan.json").is_file()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def test_bad_recipe_fails_before_any_process_group(tmp_path: Path) -> None:
    result = _train(f"output_dir={tmp_path}", "trainer.zero_stage=4", "optim.lrr=1")
    assert result.returncode == 2
    assert "trainer.zero_stage" in result.stderr and "did you mean 'lr'" in result.stderr
    assert not (tmp_path / "logs").exists()


def test_unwritable_output_and_wrong_class_count_fail_clearly(
    tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _train(f"data.root={tiny_cxr14_session}", f"output_dir={blocker}/run", *FAST)
    assert result.returncode == 1 and "is not writable" in result.stderr
    result = _train(f"data.root={tiny_cxr14_session}", f"output_dir={tmp_path}/b", *FAST,
                    "model.num_classes=3")
    assert result.returncode == 1
    assert "model.num_classes is 3 but the data has 14 classes" in result.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["trainer.backend=ddp", "trainer.backend=deepspeed"])
def test_bf16_on_cuda(tiny_cxr14_session: Path, tmp_path: Path, backend: str) -> None:
    result = _train(f"data.root={tiny_cxr14_session}", f"output_dir={tmp_path}", *FAST,
                    "data.val_fraction=0.3", "trainer.precision=bf16", backend)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on cuda" in (tmp_path / "logs" / "rank0.log").read_text()


def test_early_stopping_ends_a_run_without_gains(tiny_cxr14_session: Path, tmp_path: Path) -> None:
    result = _train(f"data.root={tiny_cxr14_session}", f"output_dir={tmp_path}",
                    "data.image_size=32", "data.load_size=32", "data.batch_size=8",
                    "data.val_fraction=0.3", "trainer.epochs=6", "trainer.max_steps=null",
                    "optim.lr=1e-12", "schedule.warmup_steps=0",
                    "trainer.early_stopping_patience=1", "trainer.backend=ddp")
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "early stopping: val/auroc_mean without a gain in 1 evaluations" in log
    assert json.loads((tmp_path / "final" / "metrics.json").read_text())["epoch"] == 2


# Two sensible epochs on the head, then every layer at lr 0.5: validation loss rises after
# epoch 2, so model selection by val/loss must keep epoch 2's weights.
OVERFIT = """\
model: {name: resnet18, pretrained: none, num_classes: 14}
data: {format: chestxray14, image_size: 32, load_size: 32, batch_size: 8, num_workers: 0,
       val_fraction: 0.3, augment: {hflip: false, rotation_deg: 0, crop_scale: [1.0, 1.0]}}
plan:
  stages:
    - {name: head, start_epoch: 0, include: [head]}
    - {name: blowup, start_epoch: 2, include: [all], lr_scale: 500}
optim: {name: adam, lr: 1.0e-3, weight_decay: 0.0}
schedule: {name: plateau, plateau_patience: 0, gamma: 0.5, min_lr_scale: 0.5}
trainer: {epochs: 4, backend: ddp, grad_clip_norm: null, monitor: val/loss, keep_last: 5}
logging: {every_steps: 1}
"""


def test_best_holds_the_weights_of_the_best_monitored_epoch(
        tiny_cxr14_session: Path, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    recipe = tmp_path / "overfit.yaml"
    recipe.write_text(OVERFIT)
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "train", str(recipe), f"data.root={tiny_cxr14_session}",
         f"output_dir={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
        env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    # Each epoch's checkpoint records that epoch's validation loss.
    losses = {}
    for ckpt in sorted((out / "checkpoints").glob("step_*")):
        progress = json.loads((ckpt / "trainer_state.json").read_text())["progress"]
        losses[progress["epoch"]] = (progress["last_metrics"]["val_loss"], ckpt)
    assert sorted(losses) == [1, 2, 3]
    assert losses[2][0] < losses[1][0] < losses[3][0], losses  # rose after epoch 2
    final = json.loads((out / "final" / "metrics.json").read_text())
    assert final["epoch"] == 4 and final["val_loss"] > losses[2][0]
    best = json.loads((out / "best" / "metrics.json").read_text())
    assert best["selected_by"] == {"monitor": "val/loss", "mode": "min",
                                   "value": losses[2][0], "epoch": 2, "step": best["step"]}
    assert best["epoch"] == 2 and best["val_loss"] == losses[2][0]
    # best/ is bitwise the model of epoch 2's checkpoint (DDP: Accelerate's model file).
    chosen = load_file(str(out / "best" / "model.safetensors"))
    saved = load_file(str(losses[2][1] / "model.safetensors"))
    assert chosen.keys() == saved.keys()
    assert all(chosen[k].equal(saved[k]) for k in chosen)
    with safe_open(str(out / "best" / "model.safetensors"), "pt") as fh:
        header = fh.metadata()
    assert header["monitor"] == "val/loss" and header["epoch"] == "2"
    # The plateau schedule followed val/loss: halved after each evaluation without a gain.
    log = (out / "logs" / "rank0.log").read_text()
    assert "plateau: val/loss without a gain for 1 evaluations; lr x0.5 (now x0.5)" in log
    status = json.loads((out / "status.json").read_text())
    assert status["best"]["epoch"] == 2
    assert "best weights (val/loss " in result.stdout and "best/model.safetensors" in result.stdout
