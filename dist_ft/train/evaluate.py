"""Evaluate saved weights on a split: the report, from scoring to the written files.

:func:`evaluate` runs one ``dist-ft eval`` (an :class:`EvalRequest`): it checks the outputs
against the inputs (:mod:`dist_ft.train.output_safety`), scores the split in one or several
processes (:mod:`dist_ft.train.scoring`), and on the main process only computes the
statistics (:mod:`dist_ft.evaluation`), writes the report files and appends the run's
evaluation record (:mod:`dist_ft.train.eval_record`).
"""

from __future__ import annotations

import getpass
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dist_ft.config.schema import DataConfig, Recipe
from dist_ft.data.findings import FINDINGS
from dist_ft.rundir import METRICS, read_json, write_json_atomic
from dist_ft.train.eval_record import (
    append_evaluation,
    earlier_test_uses,
    read_evaluations,
    sha256_file,
)
from dist_ft.train.metrics import classification_metrics
from dist_ft.train.output_safety import atomic_output, check_outputs, data_inputs
from dist_ft.train.scoring import (
    ClassMatch,
    EmptySplitError,
    EvalProcesses,
    SplitScores,
    load_trained,
    score_split,
    start_processes,
    stop_processes,
)


@dataclass(frozen=True)
class Weights:
    """A weights file to evaluate and what is known of it.

    Attributes:
        path: the ``.safetensors`` file.
        recipe: the recipe whose ``model`` section builds the network (and whose data
            section names its classes and input size).
        kind: ``best``, ``final`` or ``file``.
        epoch, step: from the folder's ``metrics.json`` when present.
    """

    path: Path
    recipe: Recipe
    kind: str = "file"
    epoch: int | None = None
    step: int | None = None

    def describe(self) -> str:
        """``best weights runs/x/best/model.safetensors (epoch 3, step 120)``."""
        where = ", ".join(f"{k} {v}" for k, v in (("epoch", self.epoch), ("step", self.step))
                          if v is not None)
        label = {"best": "best weights", "final": "final weights"}.get(self.kind, "weights")
        return f"{label} {self.path}" + (f" ({where})" if where else "")

    @classmethod
    def from_file(cls, path: str | Path, recipe: Recipe, kind: str = "file") -> Weights:
        """Weights at ``path`` with the epoch and step they were written at: from their own
        safetensors header (dist-ft writes them there), else the ``metrics.json`` beside."""
        path = Path(path)
        source: dict[str, Any] = {}
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                header = fh.metadata() or {}
            if "epoch" in header and "step" in header:
                source = {k: int(header[k]) for k in ("epoch", "step")
                          if header[k].isdigit()}
        except Exception:  # not a safetensors file: strict loading names the problem later
            pass
        if not source:
            metrics = read_json(path.with_name(METRICS))
            metrics = metrics if isinstance(metrics, dict) else {}
            selected = metrics.get("selected_by")  # best/: what model selection recorded
            source = selected if isinstance(selected, dict) else metrics
        epoch, step = source.get("epoch"), source.get("step")
        return cls(path, recipe, kind, epoch if isinstance(epoch, int) else None,
                   step if isinstance(step, int) else None)


@dataclass(frozen=True)
class EvalRequest:
    """Everything one ``dist-ft eval`` does.

    Attributes:
        weights: the model to evaluate.
        data: the data to evaluate on (the training recipe's, or another data set's).
        split: ``train``, ``val`` or ``test``.
        out: folder of the report files.
        model_classes: the names of the model's outputs, in order.
        record: the evaluation record to append to (``RunDir.evaluations``).
        compare: a second model scored on the same images (paired comparison).
        use_val: with ``split=test``, choose operating points on the val split.
        resamples, seed, sensitivity, bins: the statistics' settings.
        sections: further report sections, computed by the main process after the
            statistics (multi-label data): each adds its results to the report dict and
            returns its markdown (``dist-ft eval --localize`` adds localization this way).
        protect: further input files no output may replace (``{"recipe": path}``).
        batch_size: scoring batch (default ``data.batch_size``).
    """

    weights: Weights
    data: DataConfig
    split: str
    out: Path
    model_classes: list[str]
    record: Path
    compare: Weights | None = None
    use_val: bool = True
    resamples: int = 1000
    seed: int = 0
    sensitivity: float = 0.9
    bins: int = 10
    sections: Sequence[Callable[[EvalRequest, dict[str, Any], torch.device], str]] = ()
    protect: dict[str, Path] = field(default_factory=dict)
    batch_size: int | None = None


def eval_outputs(out: str | Path, split: str, multilabel: bool = True) -> list[Path]:
    """The files :func:`evaluate` writes into ``out`` (plots for multi-label data only)."""
    out = Path(out)
    files = [out / f"eval_{split}.json", out / f"eval_{split}.md", out / f"scores_{split}.npz"]
    if multilabel:
        files += [out / f"roc_{split}.png", out / f"reliability_{split}.png"]
    return files


def to_scored(scores: SplitScores) -> Any:
    """The :class:`dist_ft.evaluation.scored.Scored` of one model's split scores."""
    from dist_ft.evaluation.scored import META_COLUMNS, Scored

    info = scores.info
    return Scored(scores.scores, scores.targets, scores.classes,
                  patients=info["patient"], images=info["image"],
                  meta={k: info[k] for k in META_COLUMNS if k in info})


def single_label_table(metrics: dict[str, Any], split: str, count: int) -> str:
    """Accuracy and macro F1 of single-label (ImageFolder) data as a markdown table."""
    return (f"| metric ({split}, {count} images) | value |\n|---|---:|\n"
            f"| accuracy | {metrics['accuracy']:.4f} |\n"
            f"| macro F1 | {metrics['f1_macro']:.4f} |\n")


def _references(classes: Sequence[str]) -> dict[str, Any] | None:
    """Published ChestX-ray14 figures, when every class is a ChestX-ray14 finding."""
    if not set(classes) <= set(FINDINGS):
        return None
    from dist_ft.evaluation.references import REFERENCES

    return REFERENCES


def _save_scores(path: Path, scores: SplitScores) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, images=scores.info["image"].astype(str), scores=scores.scores,
                 targets=scores.targets, classes=np.array(scores.classes))


def _header(req: EvalRequest, scores: SplitScores, match: ClassMatch, history: str | None,
            procs: EvalProcesses) -> list[str]:
    lines = [f"# Evaluation: {req.split} split, {len(scores.scores)} images", "",
             f"- model: {req.weights.describe()}",
             f"- data: {req.data.format} at {req.data.root or req.data.cache or '-'}",
             f"- scored by {procs.world} process(es) on {procs.device.type} in "
             f"{scores.seconds:.1f} s ({len(scores.scores) / max(scores.seconds, 1e-9):.1f} "
             "images/s)"]
    if match.model_only or match.data_only:
        lines.append(f"- scored on the {len(match.shared)} findings model and data share; "
                     f"dropped: model only {', '.join(match.model_only) or '-'}; data only "
                     f"{', '.join(match.data_only) or '-'}")
    if req.compare is not None:
        lines.append(f"- compared with: {req.compare.describe()}")
    if history:
        lines.append(f"- {history}")
    return [*lines, ""]


def evaluate(req: EvalRequest) -> dict[str, Any] | None:
    """Score, analyze and write the report; the main process returns it, others None.

    Writes ``eval_{split}.json`` (the full report), ``eval_{split}.md``,
    ``scores_{split}.npz`` (per-image probabilities), and for multi-label data
    ``roc_{split}.png`` and ``reliability_{split}.png``; appends one line to ``req.record``.
    Every output is checked against the inputs before any work and written atomically.

    Raises:
        OutputPathError: an output would replace or land inside an input.
        dist_ft.models.weights.WeightsError: the weights do not fit the recipe's model.
        ValueError: the model and the data share no class.
    """
    files, folders = data_inputs(req.data)
    files = {"weights": req.weights.path, **files, **req.protect}
    if req.compare is not None:
        files["compare weights"] = req.compare.path
    outputs = [*eval_outputs(req.out, req.split), req.record]
    check_outputs(outputs, files, folders, "--out")
    procs = start_processes()
    try:
        return _evaluate(req, procs)
    finally:
        stop_processes()


def _scorer(weights: Weights, req: EvalRequest, procs: EvalProcesses
            ) -> Callable[[str], tuple[SplitScores, ClassMatch]]:
    """Load ``weights`` once; the returned function scores a split of ``req.data`` with it."""
    from dist_ft.models.preprocessing import input_config

    model = load_trained(weights.recipe, weights.path).to(procs.device)
    prep = input_config(weights.recipe.model, weights.recipe.data)  # as trained
    return lambda split: score_split(model, req.model_classes, req.data, split,
                                     weights.recipe.data.image_size, procs, req.batch_size,
                                     prep=prep)


def _evaluate(req: EvalRequest, procs: EvalProcesses) -> dict[str, Any] | None:
    score = _scorer(req.weights, req, procs)
    test, match = score(req.split)
    val = other = None
    val_missing = None
    if test.multilabel and req.use_val and req.split == "test":
        try:
            val, _ = score("val")
        except EmptySplitError as exc:  # only the operating points need it
            val_missing = f"no operating points: {exc}"
    if test.multilabel and req.compare is not None:
        other, _ = _scorer(req.compare, req, procs)(req.split)
    if not procs.is_main:
        return None
    history = earlier_test_uses(read_evaluations(req.record)) if req.split == "test" else None
    if test.multilabel:
        report = _multilabel_report(req, test, val, other, procs.device)
        if val_missing is not None:
            report["notes"].append(val_missing)
            report["markdown"] += f"\n- {val_missing}\n"
    else:
        report = classification_metrics(test.scores, test.targets, False, test.classes)
        report["markdown"] = single_label_table(report, req.split, len(test.scores))
    body = report.pop("markdown")
    report.update(
        split=req.split, images=len(test.scores), multilabel=test.multilabel,
        weights=str(req.weights.path),
        weights_kind=req.weights.kind, epoch=req.weights.epoch, step=req.weights.step,
        classes_scored=match.shared, classes_dropped={"model_only": match.model_only,
                                                      "data_only": match.data_only},
        processes=procs.world, device=procs.device.type,
        scoring_seconds=test.seconds,
        images_per_s=len(test.scores) / max(test.seconds, 1e-9),
        test_split_history=history)
    if req.compare is not None:
        report["compare_weights"] = str(req.compare.path)
    _write(req, report, body, test, match, history, procs)
    append_evaluation(req.record, {
        "time": datetime.now(UTC).isoformat(timespec="seconds"), "split": req.split,
        "weights": str(req.weights.path), "weights_sha256": sha256_file(req.weights.path),
        "weights_kind": req.weights.kind, "epoch": req.weights.epoch, "step": req.weights.step,
        "images": len(test.scores), "data": str(req.data.root or req.data.cache or ""),
        "out": str(req.out), "host": socket.gethostname(), "user": _user()})
    return report


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry (containers)
        return str(os.getuid())


def _multilabel_report(req: EvalRequest, test: SplitScores, val: SplitScores | None,
                       other: SplitScores | None, device: torch.device) -> dict[str, Any]:
    from dist_ft.evaluation.report import analyze, render_markdown

    report = analyze(to_scored(test), to_scored(val) if val is not None else None,
                     to_scored(other) if other is not None else None,
                     resamples=req.resamples, seed=req.seed, sensitivity=req.sensitivity,
                     bins=req.bins, split=req.split)
    markdown = render_markdown(report, references=_references(test.classes))
    for section in req.sections:
        markdown += "\n" + section(req, report, device)
    report["markdown"] = markdown
    return report


def _write(req: EvalRequest, report: dict[str, Any], body: str, test: SplitScores,
           match: ClassMatch, history: str | None, procs: EvalProcesses) -> None:
    from dist_ft.jsonio import dumps

    paths = eval_outputs(req.out, req.split, test.multilabel)
    req.out.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(_header(req, test, match, history, procs)) + body
    write_json_atomic(paths[0], None, text=dumps(report))
    write_json_atomic(paths[1], None, text=markdown)
    _save_scores(paths[2], test)
    if test.multilabel:
        from dist_ft.evaluation.plots import plot_reliability, plot_roc

        scored = to_scored(test)
        with atomic_output(paths[3]) as tmp:
            plot_roc(scored, tmp)
        with atomic_output(paths[4]) as tmp:
            plot_reliability(report, tmp)
