"""Validation metrics, exact over the whole set (every sample once, gathered from all ranks)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def classification_metrics(scores: np.ndarray, targets: np.ndarray, multilabel: bool,
                           classes: list[str]) -> dict[str, Any]:
    """Per-class and mean AUROC (multi-label) or accuracy and macro F1 (single-label).

    ``scores`` are probabilities ``[N, C]``; classes without positives or negatives in the
    set have no AUROC and are left out of the mean (reported as NaN).
    """
    if multilabel:
        from torchmetrics.functional.classification import multilabel_auroc

        per_class = multilabel_auroc(torch.from_numpy(scores), torch.from_numpy(targets).int(),
                                     num_labels=len(classes), average=None, thresholds=None)
        values = per_class.tolist()
        defined = [
            v for v, t in zip(values, targets.T, strict=True) if 0 < t.sum() < len(t)
        ]
        auroc = {c: (v if 0 < t.sum() < len(t) else math.nan)
                 for c, v, t in zip(classes, values, targets.T, strict=True)}
        mean = float(np.mean(defined)) if defined else math.nan
        return {"auroc_mean": mean, "auroc": auroc, "score": mean}
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    s, t = torch.from_numpy(scores), torch.from_numpy(targets).long()
    acc = float(multiclass_accuracy(s, t, num_classes=len(classes), average="micro"))
    f1 = float(multiclass_f1_score(s, t, num_classes=len(classes), average="macro"))
    return {"accuracy": acc, "f1_macro": f1, "score": acc}
