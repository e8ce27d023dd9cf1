"""Evaluate saved weights on a split: exact sharded scoring, the clinical report, a use record.

Scoring runs in one process or in every process of ``accelerate launch`` / torchrun / ``srun``
(gloo on CPU, NCCL with one GPU per process): each rank scores its share of the split (the
sampler's ``pad=False`` order, no duplicates), the scores are gathered with their dataset
indices and put back in dataset order, so every image is scored exactly once whatever the
number of processes. Only the main process computes the statistics
(:mod:`dist_ft.evaluation`), writes the files and appends the run's evaluation record.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from dist_ft.config.schema import DataConfig, ModelConfig, Recipe
from dist_ft.data.datasets import build_dataset
from dist_ft.data.findings import FINDINGS
from dist_ft.data.sampler import ShardedSampler
from dist_ft.data.transforms import BatchNormalize, BatchResize
from dist_ft.models.factory import build_model
from dist_ft.models.weights import load_weights_strict
from dist_ft.rundir import METRICS, read_json, write_json_atomic
from dist_ft.train.consistency import gather_objects
from dist_ft.train.metrics import classification_metrics
from dist_ft.train.runtime import ensure_process_group_env, has_cuda

# Findings named differently by other labellers (CheXpert, MIMIC-CXR) -> ChestX-ray14's name.
CLASS_ALIASES = {"pleural effusion": "effusion", "pleural_effusion": "effusion"}


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
    return data_inputs(recipe.data)


def data_inputs(data: DataConfig) -> tuple[dict[str, Path], dict[str, Path]]:
    """The files and folders a ``data`` section reads, by their recipe key."""
    files: dict[str, Path] = {}
    folders: dict[str, Path] = {}
    if data.root:
        folders["data.root"] = Path(data.root)
    if data.cache:
        folders["data.cache"] = Path(data.cache)
    if data.csv is not None:
        files["data.csv.file"] = Path(data.csv.file)
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
                  num_workers: int, procs: EvalProcesses) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets of every sample of ``dataset``, each scored exactly once.

    Rank ``r`` scores samples ``r, r + world, ...``; the parts are all-gathered with their
    indices and reordered, so the result is in dataset order on every rank.

    Raises:
        RuntimeError: the gathered indices do not cover the dataset exactly once.
    """
    sampler = ShardedSampler(len(dataset), procs.rank, procs.world, shuffle=False, pad=False)
    cuda = procs.device.type == "cuda"
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=cuda)
    resize, normalize = BatchResize(image_size), BatchNormalize().to(procs.device)
    scores, targets = [], []
    with torch.inference_mode():
        for images, target in loader:
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
    key = name.strip().lower().replace("-", " ")
    key = CLASS_ALIASES.get(key, key)
    return key.replace(" ", "_")


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


def score_split(model: torch.nn.Module, model_classes: Sequence[str], data: DataConfig,
                split: str, image_size: int, procs: EvalProcesses,
                batch_size: int | None = None) -> tuple[SplitScores, ClassMatch]:
    """Score ``split`` of ``data`` with ``model``; keep the columns of the shared classes.

    Raises:
        ValueError: the model and the data share no class.
    """
    dataset = build_dataset(data, split)
    classes = list(dataset.classes)
    match = (match_classes(model_classes, classes) if dataset.multilabel else
             ClassMatch(list(range(len(classes))), list(range(len(classes))), classes))
    start = time.perf_counter()
    scores, targets = score_dataset(model, dataset, image_size, batch_size or data.batch_size,
                                    data.num_workers, procs)
    seconds = max(gather_objects(time.perf_counter() - start))
    if dataset.multilabel and not match.identity:
        scores, targets = scores[:, match.model_index], targets[:, match.data_index]
    # NaN targets (data.chexpert.uncertain=ignore) stay: the statistics leave them out per
    # finding and count them (dist_ft.evaluation).
    return SplitScores(scores, targets, match.shared, dataset.multilabel, sample_info(dataset),
                       seconds), match


# ---------------------------------------------------------------------------- record
def sha256_file(path: str | Path) -> str:
    """``sha256:<hex>`` of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def read_evaluations(path: str | Path) -> list[dict[str, Any]]:
    """The entries of an evaluation record (one JSON object a line; damaged lines skipped)."""
    import json

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash: the others still count
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


def append_evaluation(path: str | Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` as one JSON line (one ``write`` in append mode: never interleaved)."""
    from dist_ft.jsonio import dumps

    line = dumps(entry, indent=None) + "\n"
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())


def earlier_test_uses(entries: Sequence[dict[str, Any]]) -> str | None:
    """A sentence on earlier evaluations of the test split (None if there were none)."""
    earlier = [e for e in entries if e.get("split") == "test"]
    if not earlier:
        return None
    times = ", ".join(f"{e.get('time', '?')} ({e.get('weights', '?')})" for e in earlier[-5:])
    more = " (last 5 shown)" if len(earlier) > 5 else ""
    plural = "time" if len(earlier) == 1 else "times"
    return f"test split evaluated {len(earlier)} {plural} before{more}: {times}"


# ---------------------------------------------------------------------------- report
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
        """Weights at ``path`` with epoch/step from the ``metrics.json`` beside it."""
        path = Path(path)
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
    model = load_trained(weights.recipe, weights.path).to(procs.device)
    return lambda split: score_split(model, req.model_classes, req.data, split,
                                     weights.recipe.data.image_size, procs, req.batch_size)


def _evaluate(req: EvalRequest, procs: EvalProcesses) -> dict[str, Any] | None:
    score = _scorer(req.weights, req, procs)
    test, match = score(req.split)
    val = other = None
    if test.multilabel and req.use_val and req.split == "test":
        val, _ = score("val")
    if test.multilabel and req.compare is not None:
        other, _ = _scorer(req.compare, req, procs)(req.split)
    if not procs.is_main:
        return None
    history = earlier_test_uses(read_evaluations(req.record)) if req.split == "test" else None
    if test.multilabel:
        report = _multilabel_report(req, test, val, other, procs.device)
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


def model_classes(recipe: Recipe) -> list[str]:
    """The names of the model's outputs: the classes of the data it was trained on.

    Raises:
        ValueError: the recipe's ``model.num_classes`` differs from its data's class count.
    """
    from dist_ft.data.datasets import class_names

    names = list(class_names(recipe.data))
    if len(names) != recipe.model.num_classes:
        raise ValueError(
            f"the recipe's model.num_classes is {recipe.model.num_classes} but its data "
            f"({recipe.data.format}) has {len(names)} classes ({', '.join(names[:5])}...): "
            "pass the --config of the run that trained the weights")
    return names
