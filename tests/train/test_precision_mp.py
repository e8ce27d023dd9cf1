"""``trainer.precision: bf16`` on 2 gloo CPU processes: DeepSpeed ZeRO-2 and DDP train the
smoke recipe's ResNet-18 (BatchNorm included) through a stage change, keep fp32 master weights
and fp32 Adam moments, export fp32 weights, stay within 2% of the fp32 loss, and resume
bitwise.

Four launches in all, shared by the tests through :data:`runs`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ft.logs.events import read_run
from tests.train.conftest import LazyRuns, assert_same_final
from tests.train.test_trainer_mp import BACKENDS, COMMON, SMOKE, launch

pytestmark = pytest.mark.multiprocess

# 20 steps through the smoke plan's three stages (boundaries at steps 4 and 8), a checkpoint
# at step 6 (mid stage 1: the resumed segment crosses the step-8 boundary).
STEPS = 20
LONGER = [*COMMON, f"trainer.max_steps={STEPS}", "trainer.keep_last=10",
          "trainer.activation_checkpointing=false"]
RUNS = {
    "zero2_fp32": [*BACKENDS["zero2"], "trainer.save_stage_weights=false"],
    "zero2_bf16": [*BACKENDS["zero2"], "trainer.precision=bf16"],
    "ddp_bf16": [*BACKENDS["ddp"], "trainer.precision=bf16"],
}


@pytest.fixture(scope="module")
def runs(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folders of one 20-step run per key of :data:`RUNS` (launched lazily, once)."""
    def start(key: str) -> Path:
        out = tmp_path_factory.mktemp(key)
        result = launch(["train", str(SMOKE), f"data.root={smoke_data}", f"output_dir={out}",
                         *LONGER, *RUNS[key]])
        assert result.returncode == 0, result.stderr[-4000:]
        return out

    return LazyRuns(start)


def _float_dtypes(path: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(path).values() if t.is_floating_point()}


def _bf16_share(path: Path) -> float:
    """The share of non-zero float elements in a file that bf16 holds exactly: small for
    fp32 values, 1 for bf16 values stored as fp32 (what a bf16 master or moment would
    leave). Zeros are left out: moments of parameters without gradients stay 0."""
    floats = [t[t != 0] for t in load_file(path).values() if t.is_floating_point()]
    exact = sum(int((t == t.bfloat16().float()).sum()) for t in floats)
    return exact / sum(t.numel() for t in floats)


def _losses(out: Path) -> tuple[float, float]:
    """The mean training loss of the last 5 logged steps (12-20: one batch's loss alone
    swings by 10% between neighbouring steps) and the final validation loss."""
    series = read_run(out / "tb").series
    train = series["train/loss"]
    assert int(train.steps[-1]) == STEPS
    return float(train.values[-5:].mean()), float(series["val/loss"].values[-1])


@pytest.mark.parametrize("key", ["zero2_bf16", "ddp_bf16"])
def test_bf16_keeps_fp32_weights_and_moments_across_stages(runs: dict[str, Path],
                                                           key: str) -> None:
    out = runs[key]
    weights = out / "stage_weights"
    for k in range(3):  # every stage's start and end: masters (all weights) and moments fp32
        for name in (f"stage{k}_start", f"stage{k}_end"):
            assert _float_dtypes(weights / f"{name}.safetensors") == {torch.float32}, name
    moments = sorted(weights.glob("*.moments.safetensors"))
    assert len(moments) == 4
    for path in moments:
        assert _float_dtypes(path) == {torch.float32}, path.name
    # The moments of the parameters trained on are carried across both boundaries.
    for k in (0, 1):
        before = load_file(weights / f"stage{k}_end.moments.safetensors")
        after = load_file(weights / f"stage{k + 1}_start.moments.safetensors")
        assert before and all(torch.equal(before[n], after[n]) for n in before)
    for kind in ("final", "best"):
        assert _float_dtypes(out / kind / "model.safetensors") == {torch.float32}
    # fp32 values, not bf16 ones widened.
    for name in ("stage1_start", "stage2_start", "stage2_end", "stage0_end.moments",
                 "stage1_end.moments"):
        assert _bf16_share(weights / f"{name}.safetensors") < 0.1, name
    assert _bf16_share(out / "final" / "model.safetensors") < 0.1
    log = (out / "logs" / "rank0.log").read_text()
    assert "final weights identical on 2 ranks" in log


def test_zero2_bf16_computes_in_bf16_and_stays_within_2_percent_of_fp32(
        runs: dict[str, Path]) -> None:
    bf16, fp32 = runs["zero2_bf16"], runs["zero2_fp32"]
    a = load_file(bf16 / "final" / "model.safetensors")
    b = load_file(fp32 / "final" / "model.safetensors")
    # The precision is not ignored: bf16 arithmetic leads elsewhere than fp32's (deterministic).
    assert not torch.equal(a["fc.weight"], b["fc.weight"])
    for low, full in zip(_losses(bf16), _losses(fp32), strict=True):
        assert abs(low - full) <= 0.02 * full, (low, full)


def test_zero2_bf16_resumes_bitwise_across_a_stage_change(
        runs: dict[str, Path], smoke_data: Path, tmp_path: Path) -> None:
    first = runs["zero2_bf16"]
    checkpoint = first / "checkpoints" / "step_00000006"
    assert (checkpoint / "COMPLETE").is_file()
    result = launch(["train", str(SMOKE), f"data.root={smoke_data}", f"output_dir={tmp_path}",
                     *LONGER, *RUNS["zero2_bf16"], "trainer.save_stage_weights=false",
                     "--resume", str(checkpoint)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_final(first, tmp_path)
