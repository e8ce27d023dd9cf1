"""Evaluate saved weights on a split: per-class table beside published figures, ROC curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_ft.config.schema import ModelConfig, Recipe
from dist_ft.data.datasets import build_dataset
from dist_ft.data.findings import FINDINGS
from dist_ft.data.transforms import BatchNormalize, BatchResize
from dist_ft.models.factory import build_model
from dist_ft.train.metrics import classification_metrics

# Per-class AUROC on ChestX-ray14 as published (CheXNet paper, Rajpurkar et al. 2017, Table 1).
# Both used their own splits, not the official test list: a reference, not a like-for-like.
PUBLISHED: dict[str, dict[str, float]] = {
    "Wang et al. 2017": {
        "Atelectasis": 0.716, "Cardiomegaly": 0.807, "Consolidation": 0.708, "Edema": 0.835,
        "Effusion": 0.784, "Emphysema": 0.815, "Fibrosis": 0.769, "Hernia": 0.767,
        "Infiltration": 0.609, "Mass": 0.706, "Nodule": 0.671, "Pleural_Thickening": 0.708,
        "Pneumonia": 0.633, "Pneumothorax": 0.806,
    },
    "CheXNet 2017": {
        "Atelectasis": 0.8094, "Cardiomegaly": 0.9248, "Consolidation": 0.7901,
        "Edema": 0.8878, "Effusion": 0.8638, "Emphysema": 0.9371, "Fibrosis": 0.8047,
        "Hernia": 0.9164, "Infiltration": 0.7345, "Mass": 0.8676, "Nodule": 0.7802,
        "Pleural_Thickening": 0.8062, "Pneumonia": 0.7680, "Pneumothorax": 0.8887,
    },
}


def predict(recipe: Recipe, weights: str | Path, split: str,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """Scores (probabilities) and targets of ``split`` for the model in ``weights``."""
    model = build_model(ModelConfig(name=recipe.model.name, num_classes=recipe.model.num_classes,
                                    pretrained=str(weights))).eval()
    dataset = build_dataset(recipe.data, split)
    loader = DataLoader(dataset, batch_size=batch_size or recipe.data.batch_size,
                        num_workers=recipe.data.num_workers)
    resize, normalize = BatchResize(recipe.data.image_size), BatchNormalize()
    scores, targets = [], []
    with torch.no_grad():
        for images, target in loader:
            logits = model(normalize(resize(images)))
            probs = torch.sigmoid(logits) if dataset.multilabel else logits.softmax(-1)
            scores.append(probs.numpy())
            targets.append(target.numpy())
    return np.concatenate(scores), np.concatenate(targets), dataset


def markdown_table(metrics: dict[str, Any], split: str, count: int) -> str:
    """Per-class AUROC beside the published ChestX-ray14 figures (when the classes match)."""
    if "auroc" not in metrics:
        return (f"| metric ({split}, {count} images) | value |\n|---|---:|\n"
                f"| accuracy | {metrics['accuracy']:.4f} |\n"
                f"| macro F1 | {metrics['f1_macro']:.4f} |\n")
    refs = PUBLISHED if list(metrics["auroc"]) == list(FINDINGS) else {}
    head = f"| finding | AUROC ({split}, {count} images) |" + "".join(f" {r} |" for r in refs)
    lines = [head, "|---|---:|" + "---:|" * len(refs)]

    def fmt(v: float) -> str:
        return "n/a" if math.isnan(v) else f"{v:.4f}"

    for name, value in metrics["auroc"].items():
        lines.append(f"| {name} | {fmt(value)} |" + "".join(f" {r[name]:.4f} |"
                                                             for r in refs.values()))
    means = "".join(f" **{np.mean(list(r.values())):.4f}** |" for r in refs.values())
    lines.append(f"| **mean** | **{fmt(metrics['auroc_mean'])}** |" + means)
    return "\n".join(lines) + "\n"


def plot_roc(scores: np.ndarray, targets: np.ndarray, classes: list[str], path: Path) -> None:
    """ROC curves of every class with positives and negatives, one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchmetrics.functional.classification import binary_roc

    fig, ax = plt.subplots(figsize=(7, 7))
    for k, name in enumerate(classes):
        t = targets[:, k]
        if 0 < t.sum() < len(t):
            fpr, tpr, _ = binary_roc(torch.from_numpy(scores[:, k]), torch.from_numpy(t).int())
            ax.plot(fpr.numpy(), tpr.numpy(), lw=1.2, label=name)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate_weights(recipe: Recipe, weights: str | Path, split: str,
                     out: str | Path) -> dict[str, Any]:
    """Write ``eval_{split}.json``, ``eval_{split}.md`` and (multi-label) ``roc_{split}.png``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    scores, targets, dataset = predict(recipe, weights, split)
    metrics = classification_metrics(scores, targets, dataset.multilabel, dataset.classes)
    metrics.update(split=split, images=len(scores), weights=str(weights))
    from dist_ft.jsonio import dumps

    (out / f"eval_{split}.json").write_text(dumps(metrics))
    (out / f"eval_{split}.md").write_text(markdown_table(metrics, split, len(scores)))
    if dataset.multilabel:
        plot_roc(scores, targets, dataset.classes, out / f"roc_{split}.png")
    return metrics
