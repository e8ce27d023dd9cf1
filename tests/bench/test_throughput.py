"""How the throughput suites turn logged windows into samples/s, and the recipe they train."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.tensorboard import SummaryWriter

from dist_ft.bench.throughput import (
    BenchError,
    bench_recipe,
    dist_ft_windows,
    images_needed,
    launch_command,
    rate_after,
)
from tests.conftest import CONFIGS

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


def test_rate_weighs_windows_by_their_duration() -> None:
    # (last step, images, seconds): 100 img/s for a short window, 10 img/s for a long one.
    windows = [(1, 32.0, 5.0), (5, 100.0, 1.0), (10, 100.0, 10.0)]
    rate = rate_after(windows, warmup=1)
    assert rate["samples_per_s"] == pytest.approx(200 / 11)
    assert rate["measured_steps"] == 9
    assert (rate["window_min"], rate["window_max"]) == (10.0, 100.0)
    with pytest.raises(BenchError, match="after warm-up step 10"):
        rate_after(windows, warmup=10)


def test_dist_ft_windows_invert_the_logged_rates(tmp_path: Path) -> None:
    # As the trainer logs them: step 1, then every 5 steps, images = steps x batch x world.
    writer = SummaryWriter(str(tmp_path / "tb"))
    for step, rate in ((1, 16.0), (5, 32.0), (10, 40.0)):
        writer.add_scalar("train/samples_per_s", rate, step)
    writer.close()
    windows = dist_ft_windows(tmp_path, batch=8, world=2)
    assert windows == [(1, 16.0, 1.0), (5, 64.0, 2.0), (10, 80.0, 2.0)]
    assert rate_after(windows, warmup=1)["samples_per_s"] == pytest.approx(144 / 4)


def test_bench_recipe_is_one_stage_one_epoch_without_checkpoints(tmp_path: Path) -> None:
    recipe, path = bench_recipe(SMOKE, ["data.batch_size=4"], tmp_path / "run", 30, 5)
    assert path == tmp_path / "run.yaml" and path.is_file()
    assert len(recipe.plan.stages) == 1 and recipe.plan.stages[0].name == "full"
    assert [r.keyword for r in recipe.plan.stages[0].include] == ["all"]
    t = recipe.trainer
    assert (t.max_steps, t.epochs, t.checkpoint_every_steps) == (30, 1, None)
    assert recipe.logging.every_steps == 5 and recipe.data.batch_size == 4
    assert recipe.output_dir == str(tmp_path / "run")
    assert images_needed(30, 4, 2) * 0.64 >= 30 * 4 * 2


def test_launch_command_uses_torchrun_for_every_size() -> None:
    one = launch_command(1, ["dist_ft", "train", "r.yaml"])
    two = launch_command(2, ["dist_ft", "train", "r.yaml"])
    assert one[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in one
    assert two[1:3] == ["-m", "accelerate.commands.launch"]
    assert two[two.index("--num_processes") + 1] == "2"
    assert one[-3:] == two[-3:] == ["dist_ft", "train", "r.yaml"]
