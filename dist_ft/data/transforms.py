"""Augmentation and normalisation, applied to whole batches on the training device.

Datasets yield square uint8 ``[C, L, L]`` images at the *load size* (the cache's size, or
PNGs decoded and resized to it), so batches stack without per-sample work. Then, per batch:

- :class:`BatchAugment` (training): random resized crop, horizontal flip and small rotation,
  drawn per sample and applied together as one affine resampling (``grid_sample``) to the
  model's input size;
- :class:`BatchResize` (evaluation): antialiased resize to the input size;
- :class:`BatchNormalize`: float, one channel replicated to three, ImageNet mean and std.

One resampling per batch instead of three per image keeps the loader far from being the
bottleneck; with an explicit ``torch.Generator`` the draws are reproducible (resume).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_load_size(image_size: int) -> int:
    """The size images are loaded at for a given model input (256 for 224, as ImageNet)."""
    return round(image_size * 256 / 224)


class BatchAugment(nn.Module):
    """Random resized crop + flip + rotation for a batch, as one affine warp.

    Args:
        size: output side (the model's input size).
        crop_scale: range of the crop's area as a fraction of the image.
        ratio: range of the crop's aspect ratio.
        hflip: flip half of the samples horizontally.
        rotation_deg: rotate by an angle drawn uniformly in ``[-rotation_deg, rotation_deg]``.
    """

    def __init__(self, size: int, crop_scale: tuple[float, float] = (0.7, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 rotation_deg: float = 5.0) -> None:
        super().__init__()
        self.size, self.crop_scale, self.ratio = size, crop_scale, ratio
        self.hflip, self.rotation_deg = hflip, rotation_deg

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None
                ) -> torch.Tensor:
        """uint8 or float ``[B, C, H, W]`` -> float ``[B, C, size, size]`` (0..255 scale)."""
        b = images.shape[0]

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(b, generator=generator)

        area = uniform(*self.crop_scale)
        log_ratio = uniform(math.log(self.ratio[0]), math.log(self.ratio[1]))
        w = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)  # half-extent, in [-1, 1]
        h = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
        cx = uniform(-1, 1) * (1 - w)
        cy = uniform(-1, 1) * (1 - h)
        angle = uniform(-1, 1) * math.radians(self.rotation_deg)
        flip = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0) if self.hflip \
            else torch.ones(b)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([w * flip * cos, -h * sin, cx], dim=1),
            torch.stack([w * flip * sin, h * cos, cy], dim=1),
        ], dim=1).to(images.device)
        grid = F.affine_grid(theta, [b, images.shape[1], self.size, self.size],
                             align_corners=False)
        return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border",
                             align_corners=False)


class BatchResize(nn.Module):
    """Antialiased resize of a square batch to ``size`` (evaluation)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float ``[B, C, H, W]`` -> float ``[B, C, size, size]``."""
        x = images.float()
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True,
                             align_corners=False)


class BatchNormalize(nn.Module):
    """``[B, 1|3, H, W]`` on the 0..255 scale -> float ``[B, 3, H, W]`` ImageNet-normalised."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a batch; one channel is replicated to three."""
        x = images.float()
        # (x - mean) / std as one fused x * s + b; a 1-channel input broadcasts to 3 channels.
        shape = (x.shape[0], 3 if x.shape[1] == 1 else x.shape[1], *x.shape[2:])
        out = torch.empty(shape, dtype=torch.float32, device=x.device)
        return torch.addcmul(-self.mean * self.inv_std, x, self.inv_std, out=out)
