"""``dist-ft bench data``: both pipelines and prepare measured, and the model next to the loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_ft.data.cache import prepare_cache
from dist_ft.data.synth import write_synthetic


def test_data_suite_puts_the_models_rate_beside_the_loaders(run_cli, write_recipe,
                                                             tmp_path: Path) -> None:
    root = tmp_path / "png"
    write_synthetic(root, images=48, size=64, seed=0)
    prepare_cache(root, tmp_path / "cache", size=48, shard_size=16, workers=1, progress=False)
    recipe = write_recipe({"model": {"name": "resnet18", "pretrained": "none", "num_classes": 14},
                           "data": {"root": str(root), "image_size": 32, "batch_size": 4},
                           "output_dir": str(tmp_path / "run")})
    result = run_cli("bench", "data", str(root), "--cache", str(tmp_path / "cache"),
                     "--images", "32", "--batch-size", "8", "--image-size", "32",
                     "--repeats", "1", "--recipe", str(recipe), "--model-steps", "1", "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert doc["images"] == 32 and doc["cache_size"] == 48
    assert doc["png_images_per_s"] > 0 and doc["cache_images_per_s"] > 0
    model = doc["model"]
    assert (model["name"], model["batch"], model["image_size"]) == ("resnet18", 4, 32)
    assert model["png_feeds"] == pytest.approx(doc["png_images_per_s"] / model["images_per_s"])
    assert model["cache_feeds"] == pytest.approx(
        doc["cache_images_per_s"] / model["images_per_s"])
    table = run_cli("bench", "data", str(root), "--cache", str(tmp_path / "cache"),
                    "--images", "16", "--image-size", "32", "--repeats", "1", "--recipe", "none")
    assert table.code == 0 and "| cache (memmap) + batched augment |" in table.out
    assert "loader / model" not in table.out


def test_data_bench_breaks_the_pipeline_into_stages(tmp_path: Path) -> None:
    from dist_ft.bench.data import STAGES, bench_data, format_table

    root = tmp_path / "png"
    write_synthetic(root, images=24, size=48, seed=1)
    prepare_cache(root, tmp_path / "cache", size=40, shard_size=8, workers=1, progress=False)
    doc = bench_data(root, tmp_path / "cache", images=20, batch_size=8, image_size=32,
                     repeats=1)
    assert doc["device"] == "cpu" and doc["threads"] >= 1
    assert {"png_images_per_s", "cache_images_per_s", "ratio"} <= set(doc)
    for pipeline in ("cache", "png"):
        stages = doc["breakdown"][pipeline]
        assert list(stages) == [*STAGES, "total"]
        # Nothing is copied on CPU, and the table says so rather than showing a rate.
        assert stages["host_to_device"] == {"ms_per_batch": 0.0, "images_per_s": None,
                                            "note": "n/a (cpu)"}
        for stage in ("read", "collate", "augment", "total"):
            assert stages[stage]["ms_per_batch"] > 0 and stages[stage]["images_per_s"] > 0
        assert stages["total"]["ms_per_batch"] == pytest.approx(
            sum(stages[s]["ms_per_batch"] for s in STAGES))
    table = format_table(json.loads(json.dumps(doc)))
    assert "| read (dataset fetch) |" in table and "| augment + normalize |" in table
    assert "| host -> device copy | n/a (cpu) | - | n/a (cpu) | - |" in table
