"""BatchAugment's own affine grid: torch's ``affine_grid`` up to float rounding, same draws."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dist_ft.data.transforms import BatchAugment, affine_grid


@pytest.mark.parametrize(("height", "width"), [(32, 32), (7, 12), (1, 5)])
def test_affine_grid_matches_torch(height: int, width: int) -> None:
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(height))
    want = F.affine_grid(theta, [5, 1, height, width], align_corners=False)
    got = affine_grid(theta, height, width)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert torch.allclose(got, want, atol=1e-6, rtol=0)


def _augment_with_torch_grid(aug: BatchAugment, images: torch.Tensor,
                             generator: torch.Generator) -> torch.Tensor:
    """BatchAugment.forward as it was written with ``F.affine_grid`` (the reference)."""
    b = images.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(b, generator=generator)

    area = uniform(*aug.crop_scale)
    log_ratio = uniform(math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    cx = uniform(-1, 1) * (1 - w)
    cy = uniform(-1, 1) * (1 - h)
    angle = uniform(-1, 1) * math.radians(aug.rotation_deg)
    flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([w * flip * cos, -h * sin, cx], dim=1),
                         torch.stack([w * flip * sin, h * cos, cy], dim=1)], dim=1)
    grid = F.affine_grid(theta, [b, images.shape[1], aug.size, aug.size], align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def test_augment_draws_and_output_are_those_of_torchs_affine_grid() -> None:
    images = torch.randint(0, 256, (6, 1, 48, 48), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    aug = BatchAugment(40, crop_scale=(0.5, 1.0), rotation_deg=10)
    mine, ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for _ in range(3):  # the stream stays in step batch after batch (resume relies on it)
        got, want = aug(images, mine), _augment_with_torch_grid(aug, images, ref)
        assert torch.equal(mine.get_state(), ref.get_state())
        # Grid coordinates differ by float rounding only: far below one grey level.
        assert torch.allclose(got, want, atol=0.05, rtol=0)


def test_cpu_chunks_give_the_whole_batch_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from dist_ft.data import transforms

    images = torch.randint(0, 256, (7, 1, 48, 48), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    aug = BatchAugment(40, crop_scale=(0.5, 1.0), rotation_deg=10)
    whole = aug(images, torch.Generator().manual_seed(3))  # one chunk at this size
    assert transforms._cpu_chunk(images.shape, 40) >= 7
    assert transforms._cpu_chunk(torch.Size([32, 1, 256, 256]), 224) == 4
    monkeypatch.setattr(transforms, "_CPU_CHUNK_BYTES", 3 * 4 * (48 * 48 + 3 * 40 * 40))
    assert transforms._cpu_chunk(images.shape, 40) == 3  # chunks of 3, 3 and 1
    chunked = aug(images, torch.Generator().manual_seed(3))
    assert chunked.shape == whole.shape and torch.equal(chunked, whole)
    ref = _augment_with_torch_grid(aug, images, torch.Generator().manual_seed(3))
    assert torch.allclose(chunked, ref, atol=0.05, rtol=0)


@pytest.mark.parametrize("chunk_bytes", [None, 2 * 4 * (48 * 48 + 3 * 40 * 40)])
def test_normalizing_inside_the_augment_gives_the_same_values(
        monkeypatch: pytest.MonkeyPatch, chunk_bytes: int | None) -> None:
    from dist_ft.data import transforms

    if chunk_bytes is not None:
        monkeypatch.setattr(transforms, "_CPU_CHUNK_BYTES", chunk_bytes)
    images = torch.randint(0, 256, (5, 1, 48, 48), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(2))
    aug, normalize = BatchAugment(40), transforms.BatchNormalize()
    want = normalize(aug(images, torch.Generator().manual_seed(4)))
    got = aug(images, torch.Generator().manual_seed(4), normalize)
    assert got.shape == (5, 3, 40, 40) and torch.equal(got, want)


def test_cpu_chunks_never_hold_fewer_samples_than_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """grid_sample's CPU kernel parallelises over the batch only: a chunk smaller than the
    thread count would leave threads idle (RGB 512 -> 448 made chunks of one sample)."""
    from dist_ft.data import transforms

    sizes: list[int] = []
    warp = transforms._warp

    def recording(images: torch.Tensor, theta: torch.Tensor, size: int,
                  mode: str = "bilinear") -> torch.Tensor:
        sizes.append(len(images))
        return warp(images, theta, size, mode)

    monkeypatch.setattr(transforms, "_warp", recording)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 6)
    images = torch.randint(0, 255, (12, 3, 512, 512), dtype=torch.uint8)
    BatchAugment(448)(images, torch.Generator().manual_seed(0))
    assert sizes == [6, 6]
