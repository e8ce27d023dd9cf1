"""What the loop reads: this rank's share of each split, and batched transforms on the device.

Training batches are augmented on the training device, in batches, with this rank's own
generator (saved in each checkpoint, so a resume continues the same random stream);
evaluation batches are only resized. Both are normalized.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_ft.config.schema import DataConfig
from dist_ft.data.datasets import build_dataset, collate
from dist_ft.data.sampler import ShardedSampler
from dist_ft.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BatchAugment,
    BatchNormalize,
    BatchResize,
)
from dist_ft.models.preprocessing import InputConfig


@dataclass
class TrainingInputs:
    """The splits, their samplers and loaders, and the batch transforms of one rank."""

    train_set: Any  # a Dataset with classes, multilabel and targets
    val_set: Any
    train_sampler: ShardedSampler
    train_loader: DataLoader
    val_loader: DataLoader
    augment: BatchAugment
    resize: BatchResize
    normalize: BatchNormalize
    generator: torch.Generator

    def train_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Augmented, normalized training images (on the images' device)."""
        # = normalize(augment(images)), normalising each CPU chunk of the warp while in cache.
        return self.augment(images, self.generator, self.normalize)

    def eval_batch(self, images: torch.Tensor) -> torch.Tensor:
        """Resized, normalized evaluation images."""
        return self.normalize(self.resize(images))

    def split_digest(self) -> str:
        """A digest of the images (by id: the file name for ChestX-ray14, the path below the
        root where names repeat, as CheXpert's ``view1_frontal.jpg``) and labels of both
        splits, in order."""
        digest = hashlib.sha256()
        for dataset in (self.train_set, self.val_set):
            digest.update("\n".join(map(str, dataset.sample_info["image"])).encode())
            digest.update(np.ascontiguousarray(dataset.targets).tobytes())
            digest.update(b"\0")
        return "sha256:" + digest.hexdigest()


def build_inputs(cfg: DataConfig, seed: int, rank: int, world: int, device: torch.device,
                 bad_image_log: Path, prep: InputConfig | None = None) -> TrainingInputs:
    """This rank's inputs: training order fixed by (seed, epoch), every validation image
    once across ranks, bad images recorded in ``bad_image_log`` (``data.on_bad_image``),
    normalised and resampled as ``prep`` says (default: torchvision's ImageNet preprocessing;
    :func:`dist_ft.models.preprocessing.input_config`)."""
    prep = prep or InputConfig(IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    train_set, val_set = build_dataset(cfg, "train"), build_dataset(cfg, "val")
    for dataset in (train_set, val_set):
        if hasattr(dataset, "bad_image_log"):  # images read from files, skippable
            dataset.bad_image_log = bad_image_log
    train_sampler = ShardedSampler(len(train_set), rank, world, seed=seed)
    val_sampler = ShardedSampler(len(val_set), rank, world, shuffle=False, pad=False)
    # collate: default_collate, except that a cache's batch, read whole by
    # CachedImages.__getitems__ (one memmap read per batch), is passed through as it is.
    loader_args = {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers,
                   "pin_memory": device.type == "cuda", "persistent_workers": cfg.num_workers > 0,
                   "collate_fn": collate}
    aug = cfg.augment
    return TrainingInputs(
        train_set=train_set, val_set=val_set, train_sampler=train_sampler,
        train_loader=DataLoader(train_set, sampler=train_sampler, **loader_args),
        val_loader=DataLoader(val_set, sampler=val_sampler, **loader_args),
        augment=BatchAugment(cfg.image_size, aug.crop_scale, aug.ratio, hflip=aug.hflip,
                             rotation_deg=aug.rotation_deg, mode=prep.interpolation),
        resize=BatchResize(cfg.image_size, prep.interpolation),
        normalize=BatchNormalize(prep.mean, prep.std).to(device),
        generator=torch.Generator().manual_seed(seed * 1000 + rank))
