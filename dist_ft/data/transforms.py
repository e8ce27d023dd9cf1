"""Augmentation and normalisation, applied to whole batches on the training device.

Datasets yield square uint8 ``[C, L, L]`` images at the *load size* (the cache's size, or
PNGs decoded and resized to it), so batches stack without per-sample work. Then, per batch:

- :class:`BatchAugment` (training): random resized crop, horizontal flip and small rotation,
  drawn per sample and applied together as one affine resampling (``grid_sample``) to the
  model's input size;
- :class:`BatchResize` (evaluation): antialiased resize to the input size;
- :class:`BatchNormalize`: float, one channel replicated to three, the model's mean and std
  (ImageNet's by default).

Mean, std and the resampling mode come from ``dist_ft.models.preprocessing.input_config``
(the recipe's ``data.mean``/``std``/``interpolation``, else the model's own) as plain values.

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
        mode: resampling, ``bilinear`` or ``bicubic`` (the model's, see ``data.interpolation``).
    """

    def __init__(self, size: int, crop_scale: tuple[float, float] = (0.7, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: bool = True,
                 rotation_deg: float = 5.0, mode: str = "bilinear") -> None:
        super().__init__()
        self.size, self.crop_scale, self.ratio = size, crop_scale, ratio
        self.hflip, self.rotation_deg, self.mode = hflip, rotation_deg, mode

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None,
                normalize: BatchNormalize | None = None) -> torch.Tensor:
        """uint8 or float ``[B, C, H, W]`` -> float ``[B, C, size, size]`` (0..255 scale).

        With ``normalize``, returns ``normalize(self(images, generator))`` (the same values),
        normalising each CPU chunk while it is still in cache.
        """
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
        # grid_sample's CPU kernel splits its work over the batch only: a chunk never holds
        # fewer samples than there are threads.
        step = b if images.device.type != "cpu" else max(_cpu_chunk(images.shape, self.size),
                                                         torch.get_num_threads())
        if step >= b:
            warped = _warp(images, theta, self.size, self.mode)
            return warped if normalize is None else normalize(warped)
        # On CPU, a few samples at a time: each chunk's float copy, grid and output stay in
        # cache instead of streaming ~30 MB per batch of 32 through memory (per-sample math,
        # so the result is bit-identical to one call on the whole batch).
        channels = images.shape[1] if normalize is None else normalize.channels(images.shape[1])
        out = torch.empty((b, channels, self.size, self.size), dtype=torch.float32,
                          device=images.device)
        for start in range(0, b, step):
            part = slice(start, start + step)
            warped = _warp(images[part], theta[part], self.size, self.mode)
            if normalize is None:
                out[part] = warped
            else:
                normalize(warped, out=out[part])
        return out


# Bytes of float input, grid and output that one CPU chunk of BatchAugment may touch.
_CPU_CHUNK_BYTES = 4 << 20


def _cpu_chunk(shape: torch.Size, size: int) -> int:
    """Samples per chunk for ``[B, C, H, W]`` inputs warped to ``size``: 4 at 1x256 -> 224."""
    channels, height, width = shape[1:]
    per_sample = 4 * (channels * height * width + (2 + channels) * size * size)
    return max(1, _CPU_CHUNK_BYTES // per_sample)


def _warp(images: torch.Tensor, theta: torch.Tensor, size: int,
          mode: str = "bilinear") -> torch.Tensor:
    grid = affine_grid(theta, size, size)
    return F.grid_sample(images.float(), grid, mode=mode, padding_mode="border",
                         align_corners=False)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, C, height, width], align_corners=False)``, up to rounding.

    Computed as two ``[B, H, W]`` planes (x and y), each one broadcast sum of a per-column
    and a per-row term, returned as a ``[B, H, W, 2]`` view: affine_grid's
    ``[B, H*W, 3] @ [B, 3, 2]`` batched matmul (a poor shape for BLAS) took longer on CPU
    than the resampling itself, and an add whose innermost dimension is the 2 coordinates
    does not vectorise. ``grid_sample`` reads the view as it is.
    """
    # Pixel centres in [-1, 1], exactly as affine_grid spaces them (align_corners=False).
    xs = torch.linspace(-1, 1, width, device=theta.device) * (width - 1) / width
    ys = torch.linspace(-1, 1, height, device=theta.device) * (height - 1) / height
    # grid[b, i, j, k] = theta[b, k, 0] * xs[j] + (theta[b, k, 1] * ys[i] + theta[b, k, 2])
    along_x = theta[:, :, 0, None] * xs  # [B, 2, W]
    along_y = theta[:, :, 1, None] * ys + theta[:, :, 2, None]  # [B, 2, H]
    return (along_x[:, :, None, :] + along_y[:, :, :, None]).permute(0, 2, 3, 1)


class BatchResize(nn.Module):
    """Antialiased resize of a square batch to ``size`` (evaluation); ``mode`` is
    ``bilinear`` or ``bicubic``."""

    def __init__(self, size: int, mode: str = "bilinear") -> None:
        super().__init__()
        self.size, self.mode = size, mode

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or float ``[B, C, H, W]`` -> float ``[B, C, size, size]``."""
        x = images.float()
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode=self.mode, antialias=True,
                             align_corners=False)


class BatchNormalize(nn.Module):
    """``[B, 1|3, H, W]`` on the 0..255 scale -> float ``[B, 3, H, W]`` ImageNet-normalised."""

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255),
                             persistent=False)

    @staticmethod
    def channels(channels: int) -> int:
        """Output channels for inputs of ``channels``: one is replicated to three."""
        return 3 if channels == 1 else channels

    def forward(self, images: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Normalise a batch (into ``out`` when given); one channel is replicated to three."""
        x = images.float()
        # (x - mean) / std as one fused x * s + b; a 1-channel input broadcasts to 3 channels.
        if out is None:
            shape = (x.shape[0], self.channels(x.shape[1]), *x.shape[2:])
            out = torch.empty(shape, dtype=torch.float32, device=x.device)
        return torch.addcmul(-self.mean * self.inv_std, x, self.inv_std, out=out)
