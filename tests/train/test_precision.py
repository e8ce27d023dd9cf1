"""``trainer.precision`` checks that need no training: fp16 is refused without CUDA (exit 2,
naming the reason, before any process group), and bf16 under DeepSpeed means torch autocast
over fp32 weights (see :func:`dist_ft.train.runtime.deepspeed_bf16_config`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dist_ft.config import load_recipe
from dist_ft.train.lifecycle import RunUsageError
from dist_ft.train.runtime import check_precision_supported, deepspeed_bf16_config
from tests.conftest import CONFIGS, LAUNCH_VARS, CliResult

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


@pytest.mark.parametrize("backend", ["ddp", "deepspeed"])
def test_fp16_is_refused_without_cuda_and_allowed_with_it(backend: str) -> None:
    fp16 = load_recipe(SMOKE, [f"trainer.backend={backend}", "trainer.precision=fp16"])
    with pytest.raises(RunUsageError, match=r"fp16 needs CUDA.*trainer\.precision=bf16"):
        check_precision_supported(fp16, cuda=False)
    check_precision_supported(fp16, cuda=True)
    for precision in ("bf16", "'no'"):  # these run anywhere (YAML reads a bare no as false)
        check_precision_supported(load_recipe(SMOKE, [f"trainer.precision={precision}"]),
                                  cuda=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed with CUDA")
def test_dist_ft_train_fp16_on_cpu_exits_2_before_any_process_group(
        run_cli: Callable[..., CliResult], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in LAUNCH_VARS:  # a plain process; whatever train sets is undone after the test
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    out = tmp_path / "run"
    result = run_cli("train", str(SMOKE), f"output_dir={out}", "trainer.precision=fp16")
    assert result.code == 2, result.err
    assert "fp16 needs CUDA" in result.err and "trainer.precision=bf16" in result.err
    assert not torch.distributed.is_initialized()
    assert not out.exists()  # refused before the run folder is claimed


def test_deepspeed_reads_bf16_as_autocast_not_its_bf16_mode(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    from deepspeed.runtime.config import DeepSpeedConfig

    config = DeepSpeedConfig({"train_micro_batch_size_per_gpu": 2,
                              "zero_optimization": {"stage": 2}, **deepspeed_bf16_config()})
    assert config.torch_autocast_enabled and config.torch_autocast_dtype == torch.bfloat16
    # DeepSpeed's bf16 mode would cast the module to bf16 (BatchNorm then fails on CPU).
    assert not config.bfloat16_config.enabled and not config.float16_config.enabled
