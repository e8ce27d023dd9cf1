"""Shared pieces of the multi-process trainer tests: the data, lazily launched runs, and the
bitwise comparison of two runs' final weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def smoke_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 synthetic ChestX-ray14 images at 32 px (read-only)."""
    from dist_ft.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("smoke_data")
    write_synthetic(root, images=200, size=32, seed=0)
    return root


class LazyRuns(dict):
    """key -> output folder of a run, started by ``start(key)`` the first time it is asked."""

    def __init__(self, start: Callable[[str], Path]) -> None:
        super().__init__()
        self.start = start

    def __missing__(self, key: str) -> Path:
        self[key] = out = self.start(key)
        return out


def assert_same_final(first: Path, second: Path) -> None:
    """Both runs' ``final/model.safetensors`` hold the same tensors, bitwise."""
    a = load_file(first / "final" / "model.safetensors")
    b = load_file(second / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
