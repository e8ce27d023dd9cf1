"""A ZeRO checkpoint's name-keyed state (``portable/``): written, read back, checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_ft.train.checkpoint import (
    PORTABLE,
    CheckpointDamaged,
    PortableState,
    moments_from_tensors,
    moments_to_tensors,
    read_portable,
    save_portable,
    verify_checkpoint,
)


def _state() -> PortableState:
    g = torch.Generator().manual_seed(0)
    weights = {"layer4.0.conv1.weight": torch.randn(4, 3, 3, 3, generator=g),
               "fc.weight": torch.randn(14, 4, generator=g), "fc.bias": torch.zeros(14),
               "bn1.running_mean": torch.randn(4, generator=g)}
    moments = {n: {"exp_avg": torch.randn(v.shape, generator=g),
                   "exp_avg_sq": torch.rand(v.shape, generator=g)}
               for n, v in weights.items() if n.startswith("fc.")}
    return PortableState(weights, moments, [7, None])


def test_portable_state_round_trips_bitwise(tmp_path: Path) -> None:
    state = _state()
    save_portable(tmp_path / PORTABLE, state)
    back = read_portable(tmp_path)
    assert back.weights.keys() == state.weights.keys()
    assert all(torch.equal(back.weights[n], v) for n, v in state.weights.items())
    assert back.moments.keys() == state.moments.keys() == {"fc.weight", "fc.bias"}
    assert back.steps == [7, None]  # each group's count, as the optimizer kept it
    assert all(torch.equal(back.moments[n][k], v)
               for n, kv in state.moments.items() for k, v in kv.items())
    # Parameter names hold dots, never the separator of the flat form.
    assert moments_from_tensors(moments_to_tensors(state.moments)).keys() == state.moments.keys()


def test_a_checkpoint_without_it_names_why(tmp_path: Path) -> None:
    with pytest.raises(CheckpointDamaged, match="portable: damaged checkpoint file \\(missing: "
                                                "this ZeRO checkpoint holds only DeepSpeed's"):
        read_portable(tmp_path)


def test_verify_names_a_truncated_portable_file(tmp_path: Path) -> None:
    save_portable(tmp_path / PORTABLE, _state())
    (tmp_path / "trainer_state.json").write_text("{}")
    verify_checkpoint(tmp_path)
    file = tmp_path / PORTABLE / "optimizer.safetensors"
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(CheckpointDamaged, match=r"optimizer\.safetensors.*truncated"):
        verify_checkpoint(tmp_path)
