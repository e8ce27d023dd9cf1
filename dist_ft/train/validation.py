"""Exact evaluation under sharding: every validation image is scored once, across all ranks.

Each rank scores its share (the sampler's ``pad=False`` order, no padded duplicates); the
scores are gathered and the metrics computed once on the whole split. Ranks that run out of
batches first keep forwarding a filler batch, because ZeRO-3 forwards are collective.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from dist_ft.train import engine
from dist_ft.train.consistency import gather_objects
from dist_ft.train.metrics import classification_metrics


def evaluate_exact(accelerator: Any, model: Any, loader: Any, dataset: Any,
                   preprocess: Callable[[torch.Tensor], torch.Tensor],
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   ) -> dict[str, Any]:
    """Metrics, ``val_loss`` and ``val_samples`` over the whole split (a collective call).

    BatchNorm statistics are averaged across ranks first (DeepSpeed), so every rank
    evaluates the same model.
    """
    engine.average_bn_stats(accelerator, model)
    model.eval()
    rounds = max(gather_objects(len(loader)))  # keep ranks in lockstep (ZeRO-3)
    scores, targets, loss_sum = [], [], 0.0
    iterator = iter(loader)
    filler = dataset[0][0].unsqueeze(0)  # for ranks that run out of batches first
    with torch.no_grad():
        for _ in range(rounds):
            batch = next(iterator, None)
            images = filler if batch is None else batch[0]
            logits = model(preprocess(images.to(accelerator.device)))
            if batch is None:
                continue
            target = batch[1].to(accelerator.device)
            loss_sum += float(loss_fn(logits, target)) * len(images)
            probs = torch.sigmoid(logits) if dataset.multilabel else logits.softmax(-1)
            scores.append(probs.float().cpu().numpy())
            targets.append(target.cpu().numpy())
    parts = gather_objects((np.concatenate(scores) if scores else None,
                            np.concatenate(targets) if targets else None, loss_sum))
    all_scores = np.concatenate([s for s, _, _ in parts if s is not None])
    all_targets = np.concatenate([t for _, t, _ in parts if t is not None])
    metrics = classification_metrics(all_scores, all_targets, dataset.multilabel,
                                     dataset.classes)
    metrics["val_loss"] = sum(x for _, _, x in parts) / len(all_scores)
    metrics["val_samples"] = len(all_scores)
    return metrics
