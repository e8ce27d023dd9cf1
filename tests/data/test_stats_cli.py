"""``dist-ft data stats`` on the real metadata and the synthetic twin."""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from dist_ft.data.findings import FINDINGS
from tests.conftest import REAL_CXR14, CliResult, lists_by_patient
from tests.data.test_metadata import COUNTS_2017


def test_stats_on_the_real_uncompressed_2017_file(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    with gzip.open(REAL_CXR14 / "Data_Entry_2017.csv.gz", "rb") as src, \
            open(tmp_path / "Data_Entry_2017.csv", "wb") as dst:
        shutil.copyfileobj(src, dst)
    result = run_cli("data", "stats", str(tmp_path), "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["images"] == 112_120 and doc["patients"] == 30_805
    assert doc["labels"] == {**dict(zip(FINDINGS, COUNTS_2017, strict=True)), "No Finding": 60412}
    assert doc["patient_overlap"] == 0
    assert sum(doc["splits"].values()) == 112_120 and set(doc["splits"]) == {"train", "val", "test"}
    assert doc["missing_images"] == 112_120  # metadata alone: no image folders here
    table = run_cli("data", "stats", str(tmp_path))
    assert "112,120 images" in table.out and "patient overlap between splits: 0" in table.out


def test_stats_on_the_synthetic_twin(
    run_cli: Callable[..., CliResult], tiny_cxr14: Path
) -> None:
    doc = json.loads(run_cli("data", "stats", str(tiny_cxr14), "--json").out)
    assert doc["images"] == 40 and doc["missing_images"] == 0
    assert doc["split_source"] == "train_val_list.txt, test_list.txt"
    assert doc["patient_overlap"] == 0
    (next(tiny_cxr14.glob("images_*/images/*.png"))).unlink()
    assert json.loads(run_cli("data", "stats", str(tiny_cxr14), "--json").out)[
        "missing_images"] == 1


def test_stats_errors_name_the_problem(run_cli: Callable[..., CliResult], tmp_path: Path) -> None:
    result = run_cli("data", "stats", str(tmp_path))
    assert result.code == 1 and "no ChestX-ray14 metadata file" in result.err
    result = run_cli("data", "stats", str(tmp_path), "--val-fraction", "0.9",
                     "--test-fraction", "0.2")
    assert result.code == 2 and "--val-fraction + --test-fraction" in result.err


def _write_lists(root: Path, lists: dict[str, list[str]]) -> list[str]:
    """``--split-file`` flags for ``lists`` written as ``root/lists/ROLE.txt``."""
    (root / "lists").mkdir(exist_ok=True)
    for role, names in lists.items():
        (root / "lists" / f"{role}.txt").write_text("\n".join(names) + "\n")
    return [f"--split-file={role}={root / 'lists' / f'{role}.txt'}" for role in lists]


def test_stats_with_split_files_reports_the_listed_splits(
    run_cli: Callable[..., CliResult], tmp_path: Path
) -> None:
    from dist_ft.data.synth import write_synthetic

    rows = write_synthetic(tmp_path / "data", images=24, size=32, seed=5)
    lists = lists_by_patient(rows)
    flags = _write_lists(tmp_path, lists)
    result = run_cli("data", "stats", str(tmp_path / "data"), "--json", *flags)
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["splits"] == {role: len(names) for role, names in lists.items()}
    assert doc["excluded"] == 24 - sum(len(names) for names in lists.values()) > 0
    assert doc["patient_overlap"] == 0
    assert doc["split_files"] == {role: str(tmp_path / "lists" / f"{role}.txt")
                                  for role in lists}
    assert doc["split_source"].startswith("split files: train=")
    # Without the flags, the release's own test_list.txt decides: other counts.
    plain = json.loads(run_cli("data", "stats", str(tmp_path / "data"), "--json").out)
    assert plain["splits"] != doc["splits"] and plain["split_files"] is None
    # Lists that put one patient's images in two splits: reported, not refused.
    twice = next(p for p in sorted({r.patient for r in rows})
                 if sum(r.patient == p for r in rows) >= 2)
    images = [r.image for r in rows if r.patient == twice]
    others = [r.image for r in rows if r.patient != twice]
    flags = _write_lists(tmp_path, {"train_val": others + images[:1], "test": images[1:]})
    table = run_cli("data", "stats", str(tmp_path / "data"), *flags)
    assert table.code == 0, table.err
    assert "patient overlap between splits: 1" in table.out
    assert "split files: train_val=" in " ".join(table.out.split())
