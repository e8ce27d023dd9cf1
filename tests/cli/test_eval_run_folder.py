"""``dist-ft eval``/``export`` on run folders: weights choice, the report, the record, compare,
external data, single-label data. One run folder (random resnet18 weights, 32 px synthetic
twin) is shared by the module; each command runs in-process."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file
from torchmetrics.functional.classification import binary_auroc
from torchvision.models import get_model

from dist_ft.cli.eval import resolve_weights
from dist_ft.cli.main import main
from dist_ft.config import ConfigError, load_recipe
from dist_ft.data.findings import FINDINGS
from dist_ft.train.eval_record import earlier_test_uses, read_evaluations
from dist_ft.train.scoring import EvalProcesses, load_trained, match_classes, score_split
from tests.conftest import CONFIGS, CliResult

RESAMPLES = "20"
REPORT_FILES = ["eval_test.json", "eval_test.md", "reliability_test.png", "roc_test.png",
                "scores_test.npz"]


def cli(*args: str) -> CliResult:
    """``dist-ft ARGS`` in-process (usable from module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
    return CliResult(code, out.getvalue(), err.getvalue())


def save_weights(path: Path, seed: int, name: str = "resnet18", num_classes: int = 14,
                 metrics: dict | None = None) -> Path:
    """Random weights of a torchvision model (and a metrics.json beside them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    save_file(get_model(name, weights=None, num_classes=num_classes).state_dict(), str(path))
    if metrics is not None:
        path.with_name("metrics.json").write_text(json.dumps(metrics))
    return path


def make_run(root: Path, data: Path, recipe: dict | None = None) -> Path:
    """A run folder as the trainer leaves it: recipe.yaml, best/ (epoch 2) and final/."""
    if recipe is None:
        recipe = yaml.safe_load((CONFIGS / "chestxray14_smoke.yaml").read_text())
        recipe["data"].update(root=str(data), image_size=32, load_size=32)
    root.mkdir(parents=True)
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    classes = recipe["model"].get("num_classes", 14)
    save_weights(root / "best" / "model.safetensors", 0, num_classes=classes, metrics={
        "auroc_mean": 0.6, "selected_by": {"monitor": "val/loss", "epoch": 2, "step": 20}})
    save_weights(root / "final" / "model.safetensors", 1, num_classes=classes,
                 metrics={"auroc_mean": 0.5, "epoch": 4, "step": 40})
    return root


@pytest.fixture(scope="module")
def twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dist_ft.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("twin")
    write_synthetic(root, images=160, size=32, seed=0)
    return root


@pytest.fixture(scope="module")
def run(twin: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "cxr", twin)


@pytest.fixture(scope="module")
def first_test_eval(run: Path) -> CliResult:
    """The run's first evaluation of the test split (best weights, val operating points)."""
    return cli("eval", str(run), "--split", "test", "--resamples", RESAMPLES, "--json")


# ----------------------------------------------------------------- which weights
def test_resolve_weights_prefers_best_then_final(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "recipe.yaml").write_text("{}")
    (run / "final" / "model.safetensors").write_bytes(b"x")
    taken = resolve_weights(run)
    assert (taken.path, taken.kind) == (run / "final" / "model.safetensors", "final")
    assert "has no best/ weights" in taken.note and "took final/" in taken.note
    with pytest.raises(ConfigError, match=r"no best weights .* pass --weights final"):
        resolve_weights(run, "best")
    (run / "best").mkdir()
    (run / "best" / "model.safetensors").write_bytes(b"y")
    taken = resolve_weights(run)
    assert (taken.path, taken.kind, taken.note) == (run / "best" / "model.safetensors", "best",
                                                    None)
    assert resolve_weights(run, "final").kind == "final"
    as_file = resolve_weights(run / "final" / "model.safetensors")
    assert (as_file.kind, as_file.run) == ("final", run)
    with pytest.raises(ConfigError, match="chooses within a run folder"):
        resolve_weights(run / "final" / "model.safetensors", "best")
    with pytest.raises(ConfigError, match="not a finished run folder"):
        resolve_weights(tmp_path)
    # A file in some best/ beside no recipe.yaml is a loose file: nothing is written above it.
    loose = tmp_path / "downloads" / "best" / "model.safetensors"
    loose.parent.mkdir(parents=True)
    loose.write_bytes(b"z")
    (tmp_path / "downloads" / "logs").mkdir()
    assert (resolve_weights(loose).kind, resolve_weights(loose).run) == ("file", None)


# ----------------------------------------------------------------- the report
def test_eval_of_a_run_folder_takes_best_and_writes_the_report(
    run: Path, first_test_eval: CliResult
) -> None:
    result = first_test_eval
    assert result.code == 0, result.err
    weights = run / "best" / "model.safetensors"
    assert f"best weights {weights} (epoch 2, step 20)" in result.err
    report = json.loads(result.out)
    assert (report["weights_kind"], report["epoch"], report["step"]) == ("best", 2, 20)
    assert report["split"] == "test" and report["images"] > 0 and report["processes"] == 1
    auroc = report["classes"]["Effusion"]
    assert auroc["auroc_ci"][0] <= auroc["auroc"] <= auroc["auroc_ci"][1]
    assert "operating_points" in report  # chosen on val, applied to test
    assert sorted(p.name for p in (run / "best").glob("*_test*")) == REPORT_FILES
    markdown = (run / "best" / "eval_test.md").read_text()
    assert f"model: best weights {weights}" in markdown
    assert "CheXNet 2017" in markdown and "random 70/10/20" in markdown  # splits stated
    saved = np.load(run / "best" / "scores_test.npz")
    assert saved["scores"].shape == (report["images"], 14)
    assert len(set(saved["images"].tolist())) == report["images"]


def test_every_eval_is_recorded_and_test_reuse_is_reported(
    run: Path, first_test_eval: CliResult
) -> None:
    assert first_test_eval.code == 0
    weights = run / "best" / "model.safetensors"
    before = read_evaluations(run / "evaluations.jsonl")
    first = before[0]  # the module's first eval: of the test split
    assert first["split"] == "test" and first["weights"] == str(weights)
    assert first["weights_sha256"] == "sha256:" + hashlib.sha256(weights.read_bytes()).hexdigest()
    assert {"time", "images", "host", "user"} <= set(first)
    assert "evaluated" not in first_test_eval.err  # the first use says nothing

    again = cli("eval", str(run), "--split", "test", "--no-val", "--resamples", RESAMPLES,
                "--out", str(run / "again"), "--json")
    assert again.code == 0, again.err
    uses = [e for e in before if e["split"] == "test"]
    times = "time" if len(uses) == 1 else "times"
    note = f"test split evaluated {len(uses)} {times} before: {first['time']} ({weights})"
    assert note in again.err
    assert json.loads(again.out)["test_split_history"].startswith(note)
    assert "operating_points" not in json.loads(again.out)  # --no-val
    assert note in (run / "again" / "eval_test.md").read_text()
    assert len(read_evaluations(run / "evaluations.jsonl")) == len(before) + 1


def test_earlier_test_uses_counts_only_the_test_split() -> None:
    entries = [{"split": "val", "time": "t0"}, {"split": "test", "time": "t1", "weights": "w"},
               {"split": "test", "time": "t2", "weights": "w"}]
    assert earlier_test_uses(entries) == "test split evaluated 2 times before: t1 (w), t2 (w)"
    assert earlier_test_uses(entries[:1]) is None


def test_weights_final_and_val_split(run: Path, tmp_path: Path) -> None:
    result = cli("eval", str(run), "--weights", "final", "--resamples", RESAMPLES,
                 "--out", str(tmp_path), "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert (report["weights_kind"], report["epoch"], report["step"]) == ("final", 4, 40)
    assert report["split"] == "val" and report["test_split_history"] is None
    assert f"final weights {run / 'final' / 'model.safetensors'}" in result.err
    assert cli("eval", str(run), "--no-val").code == 2  # --no-val is for --split test


def test_compare_scores_the_other_model_on_the_same_images(
    run: Path, first_test_eval: CliResult, tmp_path: Path
) -> None:
    other = run / "final" / "model.safetensors"
    result = cli("eval", str(run), "--split", "test", "--no-val", "--compare", str(other),
                 "--resamples", RESAMPLES, "--out", str(tmp_path), "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    best = json.loads(first_test_eval.out)
    # The other model's AUROC, scored directly on the same split.
    recipe = load_recipe(run / "recipe.yaml")
    model = load_trained(recipe, other)
    scores, _ = score_split(model, list(FINDINGS), recipe.data, "test", 32,
                            EvalProcesses(0, 1, torch.device("cpu")))
    k = FINDINGS.index("Effusion")
    expected = float(binary_auroc(torch.from_numpy(scores.scores[:, k]),
                                  torch.from_numpy(scores.targets[:, k]).int()))
    diff = report["comparison"]["classes"]["Effusion"]
    assert diff["auroc_a"] == pytest.approx(best["classes"]["Effusion"]["auroc"])
    assert diff["auroc_b"] == pytest.approx(expected, abs=1e-6)
    assert diff["difference"] == pytest.approx(diff["auroc_a"] - diff["auroc_b"])
    assert report["compare_weights"] == str(other)
    assert f"compared with: final weights {other}" in (tmp_path / "eval_test.md").read_text()


def test_localize_scores_heatmaps_against_the_twins_boxes(run: Path, tmp_path: Path) -> None:
    result = cli("eval", str(run), "--split", "test", "--no-val", "--resamples", RESAMPLES,
                 "--localize", "--out", str(tmp_path), "--json")
    assert result.code == 0, result.err
    loc = json.loads(result.out)["localization"]
    assert loc["overall"]["boxes"] > 0 and 0 <= loc["overall"]["hit_rate"] <= 1
    assert loc["boxes_file"].endswith("BBox_List_2017.csv")
    # resnet18 at 32 px: one layer4 cell per 32 px, the twin's boxes about 7 px: said.
    assert loc["map_cell_px"] == 32 and loc["median_box_px"] < 32
    text = (tmp_path / "eval_test.md").read_text()
    assert "### Localization (test images" in text and "The map is coarser than the boxes" in text
    missing = cli("eval", str(run), "--split", "test", "--localize", str(tmp_path / "no.csv"),
                  "--out", str(tmp_path))
    assert missing.code == 2 and f"--localize {tmp_path / 'no.csv'}: no such file" in missing.err


# ----------------------------------------------------------------- other data
def test_class_matching_by_name() -> None:
    match = match_classes(["Atelectasis", "Effusion", "Hernia"],
                          ["Pleural Effusion", "fracture", "atelectasis"])
    assert match.shared == ["Pleural Effusion", "atelectasis"]
    assert (match.model_index, match.data_index) == ([1, 0], [0, 2])
    assert (match.model_only, match.data_only) == (["Hernia"], ["fracture"])
    with pytest.raises(ValueError, match="share no finding"):
        match_classes(["Hernia"], ["Fracture"])


def test_external_data_scores_shared_findings_only(
    run: Path, twin: Path, first_test_eval: CliResult, tmp_path: Path
) -> None:
    """The twin's test images as a CSV data set with other names and an extra finding: the
    shared findings' scores are the very columns of the ChestX-ray14 evaluation."""
    best = np.load(run / "best" / "scores_test.npz")
    classes = list(best["classes"])
    paths = {p.name: p for p in twin.rglob("*.png")}
    targets = best["targets"]
    rows = ["path,Pleural Effusion,Cardiomegaly,Fracture,split"]
    for image, t in zip(best["images"], targets, strict=True):
        rows.append(f"{paths[image]},{int(t[classes.index('Effusion')])},"
                    f"{int(t[classes.index('Cardiomegaly')])},0,test")
    rows.append(f"{paths[best['images'][0]]},1,0,0,val")  # the val split must not be empty
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    other = {"model": {"name": "resnet18", "num_classes": 3},
             "data": {"format": "csv", "image_size": 32, "load_size": 32, "num_workers": 0,
                      "csv": {"file": str(tmp_path / "labels.csv"), "split_column": "split",
                              "label_columns": ["Pleural Effusion", "Cardiomegaly",
                                                "Fracture"]}},
             "output_dir": str(tmp_path / "unused")}
    (tmp_path / "external.yaml").write_text(yaml.safe_dump(other))
    result = cli("eval", str(run), "--split", "test", "--no-val", "--resamples", RESAMPLES,
                 "--data-config", str(tmp_path / "external.yaml"), "--out",
                 str(tmp_path / "out"), "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["classes_scored"] == ["Pleural Effusion", "Cardiomegaly"]
    assert report["classes_dropped"]["data_only"] == ["Fracture"]
    assert len(report["classes_dropped"]["model_only"]) == 12
    assert "dropped: model only" in (tmp_path / "out" / "eval_test.md").read_text()
    external = np.load(tmp_path / "out" / "scores_test.npz")
    columns = [classes.index("Effusion"), classes.index("Cardiomegaly")]
    np.testing.assert_allclose(external["scores"], best["scores"][:, columns], atol=1e-6)


def test_single_label_data_keeps_accuracy_and_f1(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "val", "test"):
        for label in ("cat", "dog"):
            folder = tmp_path / "folder" / split / label
            folder.mkdir(parents=True)
            for k in range(3):
                pixels = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")
    recipe = {"model": {"name": "resnet18", "num_classes": 2},
              "data": {"format": "imagefolder", "root": str(tmp_path / "folder"),
                       "image_size": 32, "load_size": 32, "batch_size": 4,
                       "num_workers": 0},
              "output_dir": str(tmp_path / "run")}
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    save_weights(run / "final" / "model.safetensors", 0, num_classes=2)
    result = cli("eval", str(run), "--split", "test", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["images"] == 6 and 0 <= report["accuracy"] <= 1 and "f1_macro" in report
    assert "has no best/ weights" in result.err
    assert sorted(p.name for p in (run / "final").glob("*_test*")) == [
        "eval_test.json", "eval_test.md", "scores_test.npz"]
    assert "| accuracy |" in (run / "final" / "eval_test.md").read_text()


# ----------------------------------------------------------------- export
def test_export_of_a_run_folder_takes_best(run: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.pt"
    result = cli("export", str(run), "--format", "torchscript", "--out", str(out), "--json")
    assert result.code == 0, result.err
    assert f"exported best weights {run / 'best' / 'model.safetensors'} (epoch 2, step 20)" \
        in result.err
    assert json.loads(result.out)["weights_kind"] == "best" and out.stat().st_size > 1000
    result = cli("export", str(run), "--weights", "last", "--format", "torchscript")
    assert result.code == 2 and "invalid choice: 'last'" in result.err


def test_external_validation_on_chexpert_with_ignored_uncertain_labels(
        run: Path, tmp_path: Path) -> None:
    """A ChestX-ray14 model validated on a CheXpert release (real layout) mapped to
    ChestX-ray14 names, uncertain labels ignored: every shared finding scored, unknown labels
    counted and left out of that finding only."""
    from tests.data.test_chexpert import _write_release

    root = tmp_path / "chexpert"
    _write_release(root, train_patients=16)
    external = {"model": {"name": "resnet18", "num_classes": 7},
                "data": {"format": "chexpert", "root": str(root), "image_size": 32,
                         "load_size": 32, "num_workers": 0, "labels_as": "chestxray14",
                         "chexpert": {"uncertain": "ignore"}},
                "output_dir": str(tmp_path / "unused")}
    (tmp_path / "chexpert.yaml").write_text(yaml.safe_dump(external))
    result = cli("eval", str(run), "--split", "test", "--resamples", RESAMPLES,
                 "--data-config", str(tmp_path / "chexpert.yaml"), "--out",
                 str(tmp_path / "out"), "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["classes_scored"] == ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema",
                                        "Effusion", "Pneumonia", "Pneumothorax"]
    test = build_dataset_for(tmp_path / "chexpert.yaml", "test")
    for name in ("Cardiomegaly", "Edema", "Effusion"):
        column = test.classes.index(name)
        known = ~np.isnan(test.targets[:, column])
        row = report["classes"][name]
        assert row["unknown"] == int((~known).sum()) > 0
        assert row["positives"] + row["negatives"] == int(known.sum())


def build_dataset_for(recipe: Path, split: str) -> Any:
    """The dataset of one split of a recipe file."""
    from dist_ft.data.datasets import build_dataset

    return build_dataset(load_recipe(recipe).data, split)
