"""Augmentations on uint8 image tensors, and ImageNet normalisation applied per batch.

Per-sample geometry (random resized crop, flip, small rotation) runs on uint8 ``[C, H, W]``
tensors in the loader workers, which is cheap at cache resolution. Conversion to float,
replication of one channel to three and ImageNet normalisation run once per *batch*
(:class:`BatchNormalize`), on the training device.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(
    size: int,
    crop_scale: tuple[float, float] = (0.7, 1.0),
    hflip: bool = True,
    rotation_deg: float = 5.0,
) -> v2.Transform:
    """Random resized crop to ``size``, optional horizontal flip and small rotation."""
    steps: list[v2.Transform] = [v2.RandomResizedCrop(size, scale=crop_scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if rotation_deg > 0:
        steps.append(v2.RandomRotation(rotation_deg))
    return v2.Compose(steps)


def eval_transform(size: int) -> v2.Transform:
    """Resize the shorter side to ``size`` and centre-crop (deterministic)."""
    return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])


class BatchNormalize(nn.Module):
    """uint8 ``[B, 1|3, H, W]`` -> float ``[B, 3, H, W]`` with ImageNet mean and std.

    One channel is replicated to three, as ImageNet-pretrained stems expect.
    """

    def __init__(self, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, -1, 1, 1) * 255),
                             persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalise a uint8 batch."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) * self.inv_std
