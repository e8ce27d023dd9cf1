"""Bad data, bad recipes, full or read-only disks and hostile files, through ``dist-ft train``
and ``dist-ft submit``: a clear error naming the culprit, before training where it can be."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from dist_ft.train.checkpoint import UnsafeCheckpointError, verify_checkpoint
from tests.conftest import CONFIGS, REPO, CliResult, plain_env

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
FAST = ["data.image_size=32", "data.load_size=32", "data.batch_size=8", "trainer.max_steps=4",
        "trainer.backend=ddp", "plan.stages[1].start_step=2", "plan.stages[2].start_step=3",
        "data.val_fraction=0.3"]


def train(*args: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dist_ft", "train", str(SMOKE), *FAST, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env(),
                          preexec_fn=None if umask is None else (lambda: os.umask(umask)))


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.replace("\r", "\n").splitlines()
    return next((x for x in lines if x.startswith("dist-ft train: error:")), result.stderr[-2000:])


def train_images(root: Path) -> list[Path]:
    """Images of the train/val part of the release (read in the first epoch)."""
    names = (root / "train_val_list.txt").read_text().split()
    return [next(root.glob(f"images_*/images/{n}")) for n in names]


# ----------------------------------------------------------------- data faults
@pytest.mark.multiprocess  # starts a dist-ft train process
def test_an_empty_png_stops_training_naming_it(tiny_cxr14: Path, tmp_path: Path) -> None:
    bad = train_images(tiny_cxr14)[5]
    bad.write_bytes(b"")
    result = train(f"data.root={tiny_cxr14}", f"output_dir={tmp_path}/run")
    assert result.returncode == 1
    assert error_line(result) == (
        f"dist-ft train: error: {bad}: image file is empty (0 bytes) (data.on_bad_image=skip "
        "trains on without such images, recording each)")
    status = json.loads((tmp_path / "run" / "status.json").read_text())
    assert status["state"] == "failed" and str(bad) in status["error"]


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_a_truncated_png_read_by_a_loader_worker_is_named(tiny_cxr14: Path, tmp_path: Path,
                                                           ) -> None:
    bad = train_images(tiny_cxr14)[2]
    bad.write_bytes(bad.read_bytes()[:300])
    result = train(f"data.root={tiny_cxr14}", f"output_dir={tmp_path}/run", "data.num_workers=1")
    assert result.returncode == 1
    line = error_line(result)
    assert line.startswith(f"dist-ft train: error: {bad}: cannot decode image"), line


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_skip_trains_on_and_records_each_bad_image(tiny_cxr14: Path, tmp_path: Path) -> None:
    images = train_images(tiny_cxr14)
    empty, truncated, missing = images[1], images[4], images[7]
    empty.write_bytes(b"")
    truncated.write_bytes(truncated.read_bytes()[:300])
    missing.unlink()
    result = train(f"data.root={tiny_cxr14}", f"output_dir={tmp_path}/run",
                   "data.on_bad_image=skip")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(x) for x in
               (tmp_path / "run" / "logs" / "bad_images.rank0.jsonl").read_text().splitlines()]
    assert {r["image"] for r in records} == {str(empty), str(truncated)}
    assert any("empty (0 bytes)" in r["reason"] for r in records)
    assert any("cannot decode" in r["reason"] for r in records)
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert f"images missing under {tiny_cxr14} (skipped), first {missing.name}" in log
    assert "skipped unreadable image (data.on_bad_image=skip)" in log


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_a_missing_image_stops_before_training(tiny_cxr14: Path, tmp_path: Path) -> None:
    missing = train_images(tiny_cxr14)[3]
    missing.unlink()
    result = train(f"data.root={tiny_cxr14}", f"output_dir={tmp_path}/run")
    assert result.returncode == 1
    line = error_line(result)
    assert f"first {missing.name!r} (looked in images/, images_*/images/" in line
    assert "set data.on_bad_image=skip" in line
    assert not list((tmp_path / "run").glob("checkpoints/*"))


@pytest.fixture
def cache(tiny_cxr14: Path, tmp_path: Path) -> Path:
    from dist_ft.data.cache import prepare_cache

    out = tmp_path / "cache"
    prepare_cache(tiny_cxr14, out, size=32, shard_size=16, progress=False,
                  val_fraction=0.3)
    return out


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_a_cache_shard_that_differs_from_its_checksum_stops_before_training(
    cache: Path, tmp_path: Path
) -> None:
    shard = cache / "shard_00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the checksum tells
    shard.write_bytes(bytes(data))
    result = train(f"data.cache={cache}", "data.root=null", f"output_dir={tmp_path}/run")
    assert result.returncode == 1
    assert error_line(result) == (
        f"dist-ft train: error: {shard}: checksum mismatch with manifest.json; rebuild it with "
        "dist-ft data prepare (or set data.verify_cache=false to train without this check)")


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_an_unreadable_cache_shard_is_named_when_first_read(cache: Path, tmp_path: Path) -> None:
    shard = cache / "shard_00000.npy"
    data = bytearray(shard.read_bytes())
    data[:6] = b"NOTNPY"  # a damaged header, same size
    shard.write_bytes(bytes(data))
    result = train(f"data.cache={cache}", "data.root=null", f"output_dir={tmp_path}/run",
                   "data.verify_cache=false")
    assert result.returncode == 1
    assert error_line(result).startswith(
        f"dist-ft train: error: {shard}: cannot read this cache shard")


# ----------------------------------------------------------------- recipe faults
BAD_PLANS = {  # the plan engine's own refusals (the recipe's schema is valid)
    "a block the model lacks": ("plan.stages[1].include=[{blocks: [layer9]}]",
                                "resnet18 has no block 'layer9'; did you mean"),
    "a group matching nothing": ("optim.groups[1].match=[nothing_like_this*]",
                                 "'nothing_like_this*' matched no parameter of resnet18"),
    "too many last blocks": ("plan.stages[1].include=[{last_blocks: 99}]",
                             "last_blocks: 99 but resnet18 has 4 body blocks"),
    "stages out of order": ("plan.stages[2].start_step=1", "stages out of order"),
}


@pytest.mark.parametrize("override,named", BAD_PLANS.values(), ids=BAD_PLANS.keys())
def test_a_bad_plan_fails_submit_before_anything_is_written(
    run_cli: Callable[..., CliResult], tmp_path: Path, override: str, named: str
) -> None:
    result = run_cli("submit", str(SMOKE), override, f"output_dir={tmp_path}/run",
                     "--cluster", "local")
    assert result.code == 2
    assert named in result.err, result.err
    assert not (tmp_path / "run").exists()


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_a_bad_plan_fails_train_before_training(tiny_cxr14_session: Path, tmp_path: Path,
                                                ) -> None:
    override, named = BAD_PLANS["a group matching nothing"]
    result = train(f"data.root={tiny_cxr14_session}", f"output_dir={tmp_path}/run", override)
    assert result.returncode == 2
    assert named in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@contextlib.contextmanager
def small_disk(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path`` (needs root, as CI runs; skipped otherwise)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    path.mkdir()
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_a_full_or_read_only_disk_fails_train_and_submit_before_training(
    tiny_cxr14_session: Path, tmp_path: Path, run_cli: Callable[..., CliResult]
) -> None:
    with small_disk(tmp_path / "tiny", "1m") as disk:
        result = train(f"data.root={tiny_cxr14_session}", f"output_dir={disk}/run")
        assert result.returncode == 1
        assert error_line(result).startswith(f"dist-ft train: error: output_dir {disk}/run: ")
        assert "MiB free, a checkpoint needs about 128 MiB" in error_line(result)
        assert not (disk / "run" / "logs").exists()
        sub = run_cli("submit", str(SMOKE), f"output_dir={disk}/job", "--cluster", "local")
        # The smoke recipe runs ZeRO-2: its checkpoints also hold portable/, twice the room.
        assert sub.code == 1 and "a checkpoint needs about 256 MiB" in sub.err
        assert not (disk / "job").exists()
    with small_disk(tmp_path / "ro", "64m", read_only=True) as disk:
        result = train(f"data.root={tiny_cxr14_session}", f"output_dir={disk}/run")
        assert result.returncode == 1 and "is not writable" in error_line(result)
        sub = run_cli("submit", str(SMOKE), f"output_dir={disk}/job", "--cluster", "local")
        assert sub.code == 1 and f"output_dir {disk}/job is not writable" in sub.err


# ----------------------------------------------------------------- security
def test_pickled_code_in_a_checkpoint_is_refused_before_deepspeed_reads_it(
    tmp_path: Path,
) -> None:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    folder = tmp_path / "step_00000004"
    (folder / "pytorch_model").mkdir(parents=True)
    (folder / "trainer_state.json").write_text("{}")
    # What DeepSpeed writes passes: tensors and its plain data classes.
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0),
                                         "zero_stage": ZeroStageEnum.gradients,
                                         "fp32": torch.ones(3)}},
               folder / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    verify_checkpoint(folder)

    class Evil:
        def __reduce__(self) -> tuple:
            return (Path.touch, (tmp_path / "PWNED",))

    evil = folder / "pytorch_model" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": Evil()}, evil)
    with pytest.raises(UnsafeCheckpointError, match=rf"{evil}: refused to load .*GLOBAL"):
        verify_checkpoint(folder)
    assert not (tmp_path / "PWNED").exists()


def test_recipes_are_read_with_a_safe_yaml_loader(tmp_path: Path,
                                                  run_cli: Callable[..., CliResult]) -> None:
    recipe = yaml.safe_load(SMOKE.read_text())
    text = yaml.safe_dump(recipe).replace(
        "name: resnet18", f"name: !!python/object/apply:os.system ['touch {tmp_path}/PWNED']")
    path = tmp_path / "evil.yaml"
    path.write_text(text)
    result = run_cli("plan", str(path))
    assert result.code == 2 and "python/object/apply" in result.err
    assert not (tmp_path / "PWNED").exists()


def world_writable(root: Path) -> list[str]:
    return [str(p) for p in [root, *root.rglob("*")]
            if not p.is_symlink() and p.stat().st_mode & stat.S_IWOTH]


@pytest.mark.multiprocess  # starts a dist-ft train process
def test_nothing_a_run_creates_is_world_writable_even_under_umask_000(
    tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = train(f"data.root={tiny_cxr14_session}", f"output_dir={out}",
                   "trainer.checkpoint_every_steps=2", umask=0)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.glob("checkpoints/step_*"))
    assert world_writable(out) == []
