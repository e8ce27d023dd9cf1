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
    assert "done: 6 steps" in result.stdout
    assert (tmp_path / "final" / "model.safetensors").is_file()
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
    assert "early stopping: no gain in 1 evaluations" in log
    assert json.loads((tmp_path / "final" / "metrics.json").read_text())["epoch"] == 2
