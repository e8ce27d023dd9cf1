"""Losses: BCE, BCE with pos_weight from label frequencies, focal, cross-entropy."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017), mean over elements."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25) -> None:
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of multi-label ``logits`` against 0/1 ``targets``."""
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        alpha_t = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        return (alpha_t * (1 - p_t) ** self.gamma * bce).mean()


def pos_weight_from(targets: np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """negatives / positives per class (clipped), from all training targets."""
    pos = targets.sum(0).astype(np.float64)
    neg = len(targets) - pos
    return torch.tensor(np.clip(neg / np.maximum(pos, 1), 1.0, max_weight), dtype=torch.float32)


def build_loss(name: str, multilabel: bool, targets: np.ndarray) -> nn.Module:
    """The loss a recipe names, checked against the dataset's kind of labels.

    Raises:
        ValueError: ``ce`` on multi-label data, or a multi-label loss on single-label data.
    """
    if name == "ce":
        if multilabel:
            raise ValueError("trainer.loss=ce needs single-label data; use bce, "
                             "bce_pos_weight or focal for multi-label")
        return nn.CrossEntropyLoss()
    if not multilabel:
        raise ValueError(f"trainer.loss={name} is for multi-label data; use ce here")
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "bce_pos_weight":
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight_from(targets))
    return FocalLoss()
