"""The monitored validation metric: the one rule for "better" that model selection, the
plateau schedule and early stopping share.

``trainer.monitor`` names a metric as TensorBoard logs it (``val/loss``, ``val/auroc_mean``,
``val/accuracy``, ``val/f1_macro``, ``val_auroc/<finding>``); its direction is ``min`` for a
loss and ``max`` otherwise unless ``trainer.monitor_mode`` says. Two notions of improvement:
a *new best* is any strictly better value (it replaces ``OUTPUT_DIR/best/``); a *gain* beats
the best by more than ``schedule.plateau_threshold`` (relative or absolute, as torch's
``ReduceLROnPlateau``), and only gains reset the patience of the plateau schedule and of early
stopping, so noise-level wiggles do not postpone them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

# Logged tag -> the key of the validation metrics dict (evaluate_exact's output).
TAGS = {"val/loss": "val_loss", "val/auroc_mean": "auroc_mean", "val/accuracy": "accuracy",
        "val/f1_macro": "f1_macro"}
PER_CLASS = "val_auroc/"


class MonitorError(ValueError):
    """The monitored metric is not one this run's validation produces."""


def resolve_monitor(name: str, mode: str, multilabel: bool,
                    classes: list[str]) -> tuple[str, Literal["min", "max"]]:
    """The concrete metric name and direction for a recipe's ``monitor``/``monitor_mode``.

    ``auto`` is ``val/auroc_mean`` for multi-label data and ``val/accuracy`` otherwise.

    Raises:
        MonitorError: the metric does not exist for this data (accuracy on multi-label data,
            an unknown finding), naming the ones that do.
    """
    if name == "auto":
        name = "val/auroc_mean" if multilabel else "val/accuracy"
    produced = (["val/loss", "val/auroc_mean"] + [PER_CLASS + c for c in classes]
                if multilabel else ["val/loss", "val/accuracy", "val/f1_macro"])
    if name not in produced:
        shown = produced if len(produced) <= 6 else [*produced[:3], f"{PER_CLASS}<finding>"]
        raise MonitorError(
            f"trainer.monitor: {name!r} is not logged for this "
            f"{'multi' if multilabel else 'single'}-label data; choose one of "
            f"{', '.join(shown)}")
    direction = mode if mode != "auto" else ("min" if name == "val/loss" else "max")
    return name, direction  # type: ignore[return-value]


def metric_value(metrics: dict[str, Any], name: str) -> float:
    """The value of the logged metric ``name`` in a validation metrics dict (NaN if undefined)."""
    if name.startswith(PER_CLASS):
        return float(metrics.get("auroc", {}).get(name[len(PER_CLASS):], math.nan))
    return float(metrics.get(TAGS[name], math.nan))


@dataclass
class Monitor:
    """The best value of the monitored metric so far, and evaluations since the last gain.

    Attributes:
        name: the logged metric name.
        mode: ``min`` or ``max``.
        threshold: the margin a gain must exceed.
        threshold_mode: ``rel`` (a fraction of the best) or ``abs``.
        best: best value so far (None before the first evaluation).
        best_epoch: epochs completed when ``best`` was reached.
        best_step: optimizer step of ``best``.
        gain_best: the value patience counts against (the last *gain*, not every new best).
        evals_without_gain: evaluations since the last gain.
    """

    name: str
    mode: Literal["min", "max"]
    threshold: float = 1e-4
    threshold_mode: Literal["rel", "abs"] = "rel"
    best: float | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    gain_best: float | None = None
    evals_without_gain: int = 0

    def _better(self, value: float, than: float | None, margin: float) -> bool:
        if math.isnan(value):
            return False
        if than is None:
            return True
        sign = 1.0 if self.mode == "max" else -1.0
        return sign * (value - than) > margin

    def _margin(self, reference: float) -> float:
        return self.threshold * abs(reference) if self.threshold_mode == "rel" else self.threshold

    def update(self, metrics: dict[str, Any], epoch: int, step: int) -> tuple[bool, bool]:
        """Feed one evaluation's metrics.

        Returns:
            ``(new_best, gain)``: whether the value is strictly the best so far (select this
            model), and whether it beats the last gain by more than the threshold (reset the
            patience of the schedule and of early stopping).
        """
        value = metric_value(metrics, self.name)
        new_best = self._better(value, self.best, 0.0)
        if new_best:
            self.best, self.best_epoch, self.best_step = value, epoch, step
        gain = self._better(value, self.gain_best,
                            0.0 if self.gain_best is None else self._margin(self.gain_best))
        if gain:
            self.gain_best, self.evals_without_gain = value, 0
        else:
            self.evals_without_gain += 1
        return new_best, gain

    def selected(self) -> dict[str, Any]:
        """What ``best/`` holds: the metric, its direction, value, epoch and step."""
        return {"monitor": self.name, "mode": self.mode, "value": self.best,
                "epoch": self.best_epoch, "step": self.best_step}

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state (the configuration too, to detect a changed monitor)."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore :meth:`state_dict`.

        Returns:
            False when the checkpoint monitored another metric or direction (a resume that
            accepted a changed ``trainer.monitor``): nothing is restored, the best so far of
            another metric means nothing for this one, so the next evaluation starts the
            selection anew (and replaces ``best/``).
        """
        if state.get("name") != self.name or state.get("mode") != self.mode:
            return False
        for key in ("best", "best_epoch", "best_step", "gain_best", "evals_without_gain"):
            setattr(self, key, state.get(key))
        self.evals_without_gain = int(self.evals_without_gain or 0)
        return True
