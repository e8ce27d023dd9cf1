"""``dist-ft bench memory``: the formulas it compares with, how it counts bytes, and a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_ft.bench.memory import formula_bytes, storage_bytes

P, N = 1000, 4


@pytest.mark.parametrize(("backend", "total"), [
    ("ddp", 16 * P), ("zero1", 4 * P + 12 * P / N), ("zero2", 2 * P + 14 * P / N),
    ("zero3", 16 * P / N)])
def test_mixed_precision_formulas_are_the_zero_papers(backend: str, total: float) -> None:
    assert sum(formula_bytes(backend, P, N, mixed=True).values()) == pytest.approx(total)


@pytest.mark.parametrize(("backend", "total", "optimizer"), [
    ("ddp", 16 * P, 8 * P), ("zero1", 8 * P + 12 * P / N, 12 * P / N),
    ("zero2", 4 * P + 16 * P / N, 12 * P / N), ("zero3", 20 * P / N, 12 * P / N)])
def test_fp32_counterparts(backend: str, total: float, optimizer: float) -> None:
    found = formula_bytes(backend, P, N, mixed=False)
    assert sum(found.values()) == pytest.approx(total)
    assert found["optimizer"] == pytest.approx(optimizer)


def test_storage_bytes_counts_each_storage_once() -> None:
    flat = torch.zeros(100)
    views = [flat[:50], flat[50:], flat.view(10, 10)]
    assert storage_bytes([*views, None, torch.empty(0)]) == 400
    assert storage_bytes([*views, torch.zeros(3, dtype=torch.float64)]) == 424


@pytest.mark.multiprocess
def test_zero_optimizer_state_matches_the_formula_on_two_ranks(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    # ZeRO-3 only (the suite runs DDP and ZeRO-1/2 alike; each backend is one more launch).
    result = run_cli("bench", "memory", "--models", "resnet18", "--image-size", "64",
                     "--backends", "zero3", "--out", str(out))
    assert result.code == 0, result.err
    assert "| resnet18 | 11.2M | ZeRO-3 |" in result.out
    (row,) = json.loads(out.read_text())["rows"]
    p = row["num_params"]
    assert p == sum(x.numel() for x in __import__("torchvision").models.resnet18(
        num_classes=14).parameters())
    assert row["world_size"] == 2
    # Each rank holds half of the fp32 master copy and of Adam's two moments ...
    assert row["optimizer"] == pytest.approx(12 * p / 2, rel=0.05)
    assert row["state_elements"] == pytest.approx(2 * p / 2, rel=0.05)
    # ... and half of the gradients and (but for small persistent tensors) of the weights.
    assert row["grads"] == pytest.approx(4 * p / 2, rel=0.05)
    assert 4 * p / 2 <= row["params"] < 0.6 * 4 * p
