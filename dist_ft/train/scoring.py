"""Scoring: a trained model's probabilities on a data split, each image scored exactly once.

This module owns loading the trained model (:func:`load_trained`, :func:`model_classes`), the
processes that score (:func:`start_processes`: one plain process, or every process of
``accelerate launch`` / torchrun / ``srun``, gloo on CPU, NCCL with one GPU per process), and
the sharded scoring itself: each rank scores its share of the split (the sampler's
``pad=False`` order, no duplicates), the scores are gathered with their dataset indices and put
back in dataset order, so every image is scored exactly once whatever the number of processes
(:func:`score_dataset`). :func:`score_split` keeps the columns of the classes the model and the
data share, matched by name (:func:`match_classes`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_ft.config.schema import DataConfig, ModelConfig, Recipe
from dist_ft.console import progress
from dist_ft.data.datasets import build_dataset, class_names, collate
from dist_ft.data.label_map import CHESTXRAY14_TO_CHEXPERT
from dist_ft.data.sampler import ShardedSampler
from dist_ft.data.transforms import IMAGENET_MEAN, IMAGENET_STD, BatchNormalize, BatchResize
from dist_ft.models.factory import build_model
from dist_ft.models.preprocessing import InputConfig
from dist_ft.models.weights import load_weights_strict
from dist_ft.train.consistency import gather_objects
from dist_ft.train.runtime import ensure_process_group_env, has_cuda


def _alias_key(name: str) -> str:
    return name.strip().lower().replace("-", " ").replace("_", " ")


# Findings named differently by other labellers (CheXpert, MIMIC-CXR) -> ChestX-ray14's name,
# from the data layer's one mapping table.
CLASS_ALIASES = {_alias_key(other): _alias_key(ours)
                 for ours, other in CHESTXRAY14_TO_CHEXPERT.items() if other != ours}


def load_trained(recipe: Recipe, weights: str | Path) -> torch.nn.Module:
    """The recipe's model with ``weights`` loaded strictly (eval mode).

    Raises:
        dist_ft.models.weights.WeightsError: a tensor missing, extra or of another shape.
    """
    model = build_model(ModelConfig(name=recipe.model.name, num_classes=recipe.model.num_classes))
    load_weights_strict(model, weights, name=recipe.model.name,
                        num_classes=recipe.model.num_classes)
    return model.eval()


def model_classes(recipe: Recipe) -> list[str]:
    """The names of the model's outputs: the classes of the data it was trained on.

    Raises:
        ValueError: the recipe's ``model.num_classes`` differs from its data's class count.
    """
    names = list(class_names(recipe.data))
    if len(names) != recipe.model.num_classes:
        raise ValueError(
            f"the recipe's model.num_classes is {recipe.model.num_classes} but its data "
            f"({recipe.data.format}) has {len(names)} classes ({', '.join(names[:5])}...): "
            "pass the --config of the run that trained the weights")
    return names


# ---------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class EvalProcesses:
    """Where this process scores: its rank among ``world`` processes and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this process writes and prints."""
        return self.rank == 0


def launched_world(env: dict[str, str] | os._Environ[str]) -> int:
    """The number of processes a launcher started (1 for a plain process).

    ``accelerate launch``/torchrun set ``WORLD_SIZE``; a task of an ``srun`` step has
    ``SLURM_STEP_NUM_TASKS`` (read through :func:`dist_ft.cluster.slurm_process_group_env`).
    """
    from dist_ft.cluster import slurm_process_group_env

    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    slurm = slurm_process_group_env(env)
    return int(slurm["WORLD_SIZE"]) if slurm else 1


def start_processes(timeout_min: float = 30) -> EvalProcesses:
    """This process's place: a process group when launched as several, else none.

    Under a launcher the Accelerator starts the group (gloo on CPU, NCCL on CUDA, one GPU per
    process); evaluation never uses DeepSpeed, so a launcher's DeepSpeed settings are
    dropped. A plain process starts no group and scores on the GPU when there is one.
    """
    cuda = has_cuda()
    if launched_world(os.environ) <= 1:
        return EvalProcesses(0, 1, torch.device("cuda" if cuda else "cpu"))
    ensure_process_group_env()
    os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)  # full weights on every rank: no ZeRO
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    # Without CUDA, Accelerate makes a multi-process run distributed (gloo) only with cpu=True.
    accelerator = Accelerator(cpu=not cuda, kwargs_handlers=[InitProcessGroupKwargs(
        backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_min))])
    return EvalProcesses(accelerator.process_index, accelerator.num_processes,
                         accelerator.device)


def stop_processes() -> None:
    """Leave the process group (if any). No barrier: the scores are gathered by then, and
    the other ranks need not wait while the main process writes the report."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------- scoring
@dataclass
class SplitScores:
    """One model's probabilities on one split, in dataset order.

    Attributes:
        scores: ``[N, C]`` probabilities (sigmoid for multi-label, softmax otherwise).
        targets: ``[N, C]`` multi-hot or ``[N]`` class indices.
        classes: the dataset's class names (the model's columns already matched to them).
        multilabel: whether the targets are multi-hot.
        info: the dataset's ``sample_info`` columns (``image``, ``patient`` ...).
        seconds: wall time of the scoring loop (slowest rank).
    """

    scores: np.ndarray
    targets: np.ndarray
    classes: list[str]
    multilabel: bool
    info: dict[str, np.ndarray]
    seconds: float = 0.0


def sample_info(dataset: Any) -> dict[str, np.ndarray]:
    """The dataset's per-sample ``image``/``patient``/``view``/``sex``/``age`` columns."""
    return {k: np.asarray(v) for k, v in dataset.sample_info.items()}


def score_dataset(model: torch.nn.Module, dataset: Any, image_size: int, batch_size: int,
                  num_workers: int, procs: EvalProcesses, desc: str = "score",
                  prep: InputConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets of every sample of ``dataset``, each scored exactly once.

    Rank ``r`` scores samples ``r, r + world, ...``; the parts are all-gathered with their
    indices and reordered, so the result is in dataset order on every rank. The main process
    shows its share's progress as ``desc`` (:func:`dist_ft.console.progress`).

    Raises:
        RuntimeError: the gathered indices do not cover the dataset exactly once.
    """
    sampler = ShardedSampler(len(dataset), procs.rank, procs.world, shuffle=False, pad=False)
    cuda = procs.device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=cuda, collate_fn=collate)
    # The preprocessing the model was trained with (default: torchvision's ImageNet one).
    prep = prep or InputConfig(IMAGENET_MEAN, IMAGENET_STD, "bilinear")
    resize = BatchResize(image_size, prep.interpolation)
    normalize = BatchNormalize(prep.mean, prep.std).to(procs.device)
    scores, targets = [], []
    with torch.inference_mode():
        for images, target in progress(loader, desc=desc, unit="batch", enabled=procs.is_main):
            images = images.to(procs.device, non_blocking=True)
            logits = model(normalize(resize(images)))
            probs = torch.sigmoid(logits) if dataset.multilabel else logits.softmax(-1)
            scores.append(probs.float().cpu().numpy())
            targets.append(target.numpy())
    mine = (sampler.indices(), np.concatenate(scores) if scores else None,
            np.concatenate(targets) if targets else None)
    parts = [p for p in gather_objects(mine) if p[1] is not None]
    if not parts:
        raise RuntimeError("the split has no images to score")
    index = np.concatenate([p[0] for p in parts])
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(len(dataset))):
        raise RuntimeError(f"the ranks scored {len(index)} samples ({len(np.unique(index))} "
                           f"distinct) of a split of {len(dataset)}: the sharding is broken")
    return (np.concatenate([p[1] for p in parts])[order],
            np.concatenate([p[2] for p in parts])[order])


@dataclass(frozen=True)
class ClassMatch:
    """Which model outputs score which dataset classes (matched by name).

    Attributes:
        model_index: the model column of each shared class.
        data_index: the dataset column of each shared class.
        shared: the shared classes, by the dataset's names, in dataset order.
        model_only: model classes the dataset does not label (dropped).
        data_only: dataset classes the model does not predict (dropped).
    """

    model_index: list[int]
    data_index: list[int]
    shared: list[str]
    model_only: list[str] = field(default_factory=list)
    data_only: list[str] = field(default_factory=list)

    @property
    def identity(self) -> bool:
        """Whether nothing is dropped or reordered."""
        return (not self.model_only and not self.data_only
                and self.model_index == self.data_index == list(range(len(self.shared))))


def _class_key(name: str) -> str:
    key = _alias_key(name)
    return CLASS_ALIASES.get(key, key)


def match_classes(model_classes: Sequence[str], data_classes: Sequence[str]) -> ClassMatch:
    """Match the model's outputs to the dataset's classes by name.

    Names match case-insensitively, with spaces, ``-`` and ``_`` alike, and
    :data:`CLASS_ALIASES` (``Pleural Effusion`` is ChestX-ray14's ``Effusion``).

    Raises:
        ValueError: no class is shared, naming both lists.
    """
    by_key = {_class_key(c): k for k, c in enumerate(model_classes)}
    pairs = [(by_key[_class_key(c)], j) for j, c in enumerate(data_classes)
             if _class_key(c) in by_key]
    if not pairs:
        raise ValueError(f"the model's classes ({', '.join(model_classes)}) share no finding "
                         f"with the data's ({', '.join(data_classes)}): evaluate on data "
                         "labelled for what the model predicts")
    model_used = {m for m, _ in pairs}
    data_used = {j for _, j in pairs}
    return ClassMatch(
        model_index=[m for m, _ in pairs], data_index=[j for _, j in pairs],
        shared=[data_classes[j] for _, j in pairs],
        model_only=[c for k, c in enumerate(model_classes) if k not in model_used],
        data_only=[c for j, c in enumerate(data_classes) if j not in data_used])


class EmptySplitError(ValueError):
    """A split to score has no images."""


def score_split(model: torch.nn.Module, model_classes: Sequence[str], data: DataConfig,
                split: str, image_size: int, procs: EvalProcesses,
                batch_size: int | None = None,
                prep: InputConfig | None = None) -> tuple[SplitScores, ClassMatch]:
    """Score ``split`` of ``data`` with ``model``; keep the columns of the shared classes.

    Raises:
        ValueError: the model and the data share no class.
        EmptySplitError: the split has no images (every rank alike: before any collective).
    """
    dataset = build_dataset(data, split)
    if len(dataset) == 0:
        raise EmptySplitError(
            f"the {split} split of {data.format} data at {data.cache or data.root} has no "
            f"images (data.val_fraction, data.test_fraction, data.split_files?)")
    classes = list(dataset.classes)
    match = (match_classes(model_classes, classes) if dataset.multilabel else
             ClassMatch(list(range(len(classes))), list(range(len(classes))), classes))
    start = time.perf_counter()
    scores, targets = score_dataset(model, dataset, image_size, batch_size or data.batch_size,
                                    data.num_workers, procs, desc=f"eval {split}", prep=prep)
    seconds = max(gather_objects(time.perf_counter() - start))
    if dataset.multilabel and not match.identity:
        scores, targets = scores[:, match.model_index], targets[:, match.data_index]
    # NaN targets (data.chexpert.uncertain=ignore) stay: the statistics leave them out per
    # finding and count them (dist_ft.evaluation).
    return SplitScores(scores, targets, match.shared, dataset.multilabel, sample_info(dataset),
                       seconds), match
