"""One model's scores on one split, with the columns the statistics need, checked once."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

META_COLUMNS = ("view", "sex", "age")


@dataclass(frozen=True)
class Scored:
    """One model's predictions on one split.

    Attributes:
        scores: ``[N, C]`` float probabilities in [0, 1].
        targets: ``[N, C]`` labels, 0 or 1 (float or int), or NaN where a label is unknown
            for that class (e.g. a CheXpert uncertain label with ``uncertain: ignore``): every
            per-class statistic leaves such an entry out for that class only.
        classes: the ``C`` class names, in column order.
        patients: ``[N]`` str, the bootstrap unit (the image id when no patient is known).
        images: ``[N]`` str image ids, unique.
        meta: optional ``[N]`` columns: ``view`` (str), ``sex`` (str), ``age`` (float, NaN
            unknown).

    Raises:
        ValueError: on any shape, value or name problem, naming the field and the fix.
    """

    scores: np.ndarray
    targets: np.ndarray
    classes: list[str]
    patients: np.ndarray
    images: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64)
        targets = np.asarray(self.targets)
        if scores.ndim != 2:
            raise ValueError(f"Scored.scores: expected shape [N, C], got {scores.shape}")
        n, c = scores.shape
        if targets.shape != (n, c):
            raise ValueError(f"Scored.targets: expected shape {(n, c)} like scores, "
                             f"got {targets.shape}")
        if len(self.classes) != c:
            raise ValueError(f"Scored.classes: {len(self.classes)} names for {c} score columns")
        if len(set(self.classes)) != c:
            dup = sorted({x for x in self.classes if list(self.classes).count(x) > 1})
            raise ValueError(f"Scored.classes: duplicate names {dup}")
        bad = np.argwhere(~np.isfinite(scores) | (scores < 0) | (scores > 1))
        if len(bad):
            i, k = bad[0]
            raise ValueError(
                f"Scored.scores: {len(bad)} values are not probabilities in [0, 1], first at "
                f"row {i} ({self.classes[k]}): {scores[i, k].item()!r}; apply a sigmoid to "
                "logits")
        try:
            targets_f = targets.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(f"Scored.targets: not numeric ({err}); use 0, 1 or NaN") from err
        bad = np.argwhere((targets_f != 0) & (targets_f != 1) & ~np.isnan(targets_f))
        if len(bad):
            i, k = bad[0]
            raise ValueError(f"Scored.targets: {len(bad)} values are not 0, 1 or NaN (unknown), "
                             f"first at row {i} ({self.classes[k]}): {targets[i, k].item()!r}; "
                             "map uncertain labels with data.chexpert.uncertain")
        patients = np.asarray(self.patients).astype(str)
        images = np.asarray(self.images).astype(str)
        for name, column in (("patients", patients), ("images", images)):
            if column.shape != (n,):
                raise ValueError(f"Scored.{name}: expected shape ({n},), one per score row, "
                                 f"got {column.shape}")
        uniq, counts = np.unique(images, return_counts=True)
        if len(uniq) != n:
            raise ValueError(f"Scored.images: {int((counts > 1).sum())} ids repeat, e.g. "
                             f"{uniq[counts > 1][0].item()!r}; each row must be a distinct "
                             "image")
        meta: dict[str, np.ndarray] = {}
        for key, column in dict(self.meta).items():
            if key not in META_COLUMNS:
                raise ValueError(f"Scored.meta: unknown column {key!r}; known: "
                                 f"{', '.join(META_COLUMNS)}")
            arr = np.asarray(column)
            if arr.shape != (n,):
                raise ValueError(f"Scored.meta[{key!r}]: expected shape ({n},), got {arr.shape}")
            if key == "age":
                try:
                    arr = arr.astype(np.float64)
                except ValueError as err:
                    raise ValueError(f"Scored.meta['age']: not numeric ({err}); use NaN for an "
                                     "unknown age") from err
            else:
                arr = arr.astype(object)
            meta[key] = arr
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "targets", targets_f)
        object.__setattr__(self, "classes", list(self.classes))
        object.__setattr__(self, "patients", patients)
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "meta", meta)

    @property
    def known(self) -> np.ndarray:
        """``[N, C]`` bool: True where the target is 0 or 1, False where it is unknown (NaN)."""
        return ~np.isnan(self.targets)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def take(self, rows: np.ndarray) -> Scored:
        """The rows ``rows`` (indices or a boolean mask) as a new ``Scored``."""
        return Scored(self.scores[rows], self.targets[rows], self.classes, self.patients[rows],
                      self.images[rows], {k: v[rows] for k, v in self.meta.items()})
