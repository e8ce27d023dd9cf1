"""Losses: BCE, BCE with pos_weight from label frequencies, focal, cross-entropy.

Multi-label targets may hold NaN: an uncertain label ignored by policy (CheXpert U-Ignore,
``data.chexpert.uncertain: ignore``). When the training targets have any, the loss is the mean
over the labelled entries only (:class:`MaskedLoss`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class FocalLoss(nn.Module):
    """Sigmoid focal loss (Lin et al. 2017), mean over elements (``reduction="none"``: each)."""

    def __init__(self, gamma: float = 2.0, alpha: float = 0.25, reduction: str = "mean") -> None:
        super().__init__()
        self.gamma, self.alpha, self.reduction = gamma, alpha, reduction

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of multi-label ``logits`` against 0/1 ``targets``."""
        bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        p = torch.sigmoid(logits)
        p_t = p * targets + (1 - p) * (1 - targets)
        alpha_t = self.alpha * targets + (1 - self.alpha) * (1 - targets)
        loss = alpha_t * (1 - p_t) ** self.gamma * bce
        return loss if self.reduction == "none" else loss.mean()


class MaskedLoss(nn.Module):
    """An element-wise multi-label loss averaged over the entries whose target is not NaN.

    Args:
        elementwise: a loss built with ``reduction="none"``.
    """

    def __init__(self, elementwise: nn.Module) -> None:
        super().__init__()
        self.elementwise = elementwise

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss over the labelled entries (0 with none, still connected to ``logits``)."""
        known = ~torch.isnan(targets)
        loss = self.elementwise(logits, torch.where(known, targets, torch.zeros_like(targets)))
        # where (not multiplication) so an ignored entry's inf/NaN cannot leak into the sum.
        total = torch.where(known, loss, torch.zeros_like(loss)).sum()
        return total / known.sum().clamp_min(1)


def pos_weight_from(targets: np.ndarray, max_weight: float = 100.0) -> torch.Tensor:
    """negatives / positives per class (clipped), from all training targets (NaN: unknown,
    counted in neither)."""
    targets = np.asarray(targets, dtype=np.float64)
    pos = np.nansum(targets, 0)
    neg = (~np.isnan(targets)).sum(0) - pos
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
    if np.isnan(np.asarray(targets, dtype=np.float32)).any():  # uncertain labels ignored
        if name == "focal":
            return MaskedLoss(FocalLoss(reduction="none"))
        weight = pos_weight_from(targets) if name == "bce_pos_weight" else None
        return MaskedLoss(nn.BCEWithLogitsLoss(pos_weight=weight, reduction="none"))
    if name == "bce":
        return nn.BCEWithLogitsLoss()
    if name == "bce_pos_weight":
        return nn.BCEWithLogitsLoss(pos_weight=pos_weight_from(targets))
    return FocalLoss()
