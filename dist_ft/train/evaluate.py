"""Evaluate saved weights on a split: per-class table beside published figures, ROC curves."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
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
from dist_ft.models.weights import load_weights_strict
from dist_ft.rundir import write_json_atomic
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


class OutputPathError(ValueError):
    """An output would replace or land inside an input, or cannot be written there."""


def _same_file(a: Path, b: Path) -> bool:
    if a == b:
        return True
    try:  # hard links and bind mounts: different paths, one file
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def recipe_inputs(recipe: Recipe) -> tuple[dict[str, Path], dict[str, Path]]:
    """The files and folders a recipe's data section reads, by their recipe key."""
    files: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    if recipe.data.root:
        folders["data.root"] = Path(recipe.data.root)
    if recipe.data.cache:
        folders["data.cache"] = Path(recipe.data.cache)
    if recipe.data.csv is not None:
        files["data.csv.file"] = Path(recipe.data.csv.file)
    return files, folders


def check_outputs(outputs: Sequence[Path], files: dict[str, Path], folders: dict[str, Path],
                  option: str) -> None:
    """Refuse, before any work, outputs that would destroy an input or cannot be written.

    Args:
        outputs: every file the command will write.
        files: input files by role (``weights``, ``recipe``, ``data.csv.file`` ...).
        folders: input folders by role (``data.root``, ``data.cache``): nothing is written
            inside them.
        option: the command-line option that sets the outputs (named in the fix).

    Raises:
        OutputPathError: naming the output, the input and the fix.
    """
    for out in outputs:
        target = out.expanduser().resolve()
        for role, path in files.items():
            if _same_file(target, path.expanduser().resolve()):
                raise OutputPathError(
                    f"output {out} is the input {role} {path}: writing it would destroy what "
                    f"is read; pass another {option}")
        for role, path in folders.items():
            folder = path.expanduser().resolve()
            if target == folder or folder in target.parents:
                raise OutputPathError(
                    f"output {out} is inside the input folder {role} {path}: dist-ft never "
                    f"writes into its inputs; pass another {option}")
        if target.is_dir():
            raise OutputPathError(f"output {out} is a folder; pass a file path as {option}")
        existing = next(p for p in target.parents if p.exists())
        if not existing.is_dir():
            raise OutputPathError(f"cannot write {out}: {existing} is a file, not a folder; "
                                  f"pass another {option}")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write {out}: {existing} is not writable; "
                                  f"pass another {option}")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path``, renamed onto it when the block succeeds.

    A failure leaves ``path`` as it was (absent or the previous version), never half written.
    The temporary name keeps the suffix: exporters and plotters pick formats by it.
    """
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_trained(recipe: Recipe, weights: str | Path) -> torch.nn.Module:
    """The recipe's model with ``weights`` loaded strictly (eval mode).

    Raises:
        dist_ft.models.weights.WeightsError: a tensor missing, extra or of another shape.
    """
    model = build_model(ModelConfig(name=recipe.model.name, num_classes=recipe.model.num_classes))
    load_weights_strict(model, weights, name=recipe.model.name,
                        num_classes=recipe.model.num_classes)
    return model.eval()


def predict(recipe: Recipe, weights: str | Path, split: str,
            batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """Scores (probabilities) and targets of ``split`` for the model in ``weights``."""
    model = load_trained(recipe, weights)
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


def eval_outputs(out: str | Path, split: str) -> list[Path]:
    """The files ``evaluate_weights`` writes into ``out``."""
    out = Path(out)
    return [out / f"eval_{split}.json", out / f"eval_{split}.md", out / f"roc_{split}.png"]


def evaluate_weights(recipe: Recipe, weights: str | Path, split: str, out: str | Path,
                     protect: dict[str, Path] | None = None) -> dict[str, Any]:
    """Write ``eval_{split}.json``, ``eval_{split}.md`` and (multi-label) ``roc_{split}.png``.

    Each file is written atomically; the outputs are checked against the inputs (weights,
    data, and ``protect``, e.g. ``{"recipe": path}``) before anything is computed.

    Raises:
        OutputPathError: an output would replace or land inside an input.
        dist_ft.models.weights.WeightsError: the weights do not fit the recipe's model.
    """
    out, weights = Path(out), Path(weights)
    files, folders = recipe_inputs(recipe)
    files = {"weights": weights, **files, **(protect or {})}
    json_path, md_path, roc_path = eval_outputs(out, split)
    check_outputs([json_path, md_path, roc_path], files, folders, "--out")
    scores, targets, dataset = predict(recipe, weights, split)
    metrics = classification_metrics(scores, targets, dataset.multilabel, dataset.classes)
    metrics.update(split=split, images=len(scores), weights=str(weights))
    from dist_ft.jsonio import dumps

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(json_path, None, text=dumps(metrics))
    write_json_atomic(md_path, None, text=markdown_table(metrics, split, len(scores)))
    if dataset.multilabel:
        with atomic_output(roc_path) as tmp:
            plot_roc(scores, targets, dataset.classes, tmp)
    return metrics
