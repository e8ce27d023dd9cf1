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
    set have no AUROC and are left out of the mean (reported as NaN). A NaN target (an
    uncertain label under ``data.chexpert.uncertain: ignore``) is left out of its class.
    """
    if multilabel:
        from torchmetrics.functional.classification import multilabel_auroc

        known = ~np.isnan(targets)
        coded = np.where(known, targets, -1).astype(np.int64)  # -1: torchmetrics' ignore_index
        per_class = multilabel_auroc(torch.from_numpy(scores), torch.from_numpy(coded),
                                     num_labels=len(classes), average=None, thresholds=None,
                                     ignore_index=-1)
        values = per_class.tolist()
        positives, known_count = (coded == 1).sum(0), known.sum(0)
        defined_mask = (positives > 0) & (positives < known_count)
        defined = [v for v, ok in zip(values, defined_mask, strict=True) if ok]
        auroc = {c: (v if ok else math.nan)
                 for c, v, ok in zip(classes, values, defined_mask, strict=True)}
        mean = float(np.mean(defined)) if defined else math.nan
        return {"auroc_mean": mean, "auroc": auroc, "score": mean}
    from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score

    s, t = torch.from_numpy(scores), torch.from_numpy(targets).long()
    acc = float(multiclass_accuracy(s, t, num_classes=len(classes), average="micro"))
    f1 = float(multiclass_f1_score(s, t, num_classes=len(classes), average="macro"))
    return {"accuracy": acc, "f1_macro": f1, "score": acc}


def score_text(metrics: dict[str, Any]) -> str:
    """The headline score of :func:`classification_metrics` output, named as what it is:
    ``mean AUROC 0.8123`` (multi-label) or ``accuracy 0.9100`` (single-label)."""
    if "auroc_mean" in metrics:
        return f"mean AUROC {metrics['auroc_mean']:.4f}"
    return f"accuracy {metrics['accuracy']:.4f}"
