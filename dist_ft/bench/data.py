"""``dist-ft bench data``: the input pipeline from PNGs vs from the cache, and ``prepare``.

Both pipelines read the same images with the same training transforms, batch size and
number of loader workers; runs alternate (PNG, cache, PNG, cache...) and the median of each
is reported, so machine noise hits both alike.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dist_ft.data.cache import CacheReader, prepare_cache
from dist_ft.data.datasets import CachedImages, LabelledImages
from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import find_images
from dist_ft.data.transforms import BatchAugment, BatchNormalize


def _images_per_s(dataset: Any, batch_size: int, workers: int, augment: BatchAugment) -> float:
    """Loader + batched augmentation + normalisation: all the pipeline does before the model."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    normalize = BatchNormalize()
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    seen = 0
    for images, _ in loader:
        normalize(augment(images, generator))
        seen += len(images)
    return seen / (time.perf_counter() - start)


def bench_data(
    root: str | Path,
    cache: str | Path,
    images: int = 256,
    batch_size: int = 32,
    workers: int = 0,
    image_size: int = 224,
    repeats: int = 3,
    recipe: str | Path | None = None,
    model_steps: int = 3,
) -> dict[str, Any]:
    """Measure images/s of both pipelines and of ``prepare`` against a bare PIL loop.

    With ``recipe``, also the images/s its model trains at (one process, the recipe's batch
    size and input size, on CUDA where present), to tell whether one loader process feeds one
    training process.

    Args:
        root: ChestX-ray14-layout folder with the PNGs.
        cache: a cache of ``root`` made by ``dist-ft data prepare``.
        images: how many images (the first ones of the cache's valid rows) each run reads.
        batch_size, workers, image_size: loader settings shared by both pipelines.
        repeats: alternating runs per pipeline.
        recipe: a recipe whose model to time; model_steps: its timed steps.
    """
    reader = CacheReader(cache)
    rows = reader.rows()[:images]
    found = find_images(root)
    names = [str(n) for n in reader.images[rows]]
    missing = [n for n in names if n not in found]
    if missing:
        raise FileNotFoundError(f"{len(missing)} cached images are not under {root}, "
                                f"first {missing[0]!r}")
    paths = [found[n] for n in names]
    augment = BatchAugment(image_size)
    # Same images, same load size (the cache's), same batched augmentation.
    png = LabelledImages(paths, reader.labels[rows], list(FINDINGS), True, 1, reader.size)
    cached = CachedImages(reader, rows)

    png_runs, cache_runs = [], []
    _images_per_s(cached, batch_size, workers, augment)  # warm the page cache
    for _ in range(repeats):
        png_runs.append(_images_per_s(png, batch_size, workers, augment))
        cache_runs.append(_images_per_s(cached, batch_size, workers, augment))

    # prepare (one worker: decode, resize, write shard, checksum) vs a bare PIL loop.
    size = reader.size
    prepare_runs, pil_runs = [], []
    subset = paths[: min(len(paths), 128)]
    for _ in range(repeats):
        start = time.perf_counter()
        for p in subset:
            with Image.open(p) as img:
                np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR,
                                                   reducing_gap=3.0))
        pil_runs.append(len(subset) / (time.perf_counter() - start))
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "src"
            _mirror(root, src, [Path(p) for p in subset])
            start = time.perf_counter()
            prepare_cache(src, Path(tmp) / "cache", size=size, shard_size=64, workers=1,
                          progress=False)
            prepare_runs.append(len(subset) / (time.perf_counter() - start))

    png_s, cache_s = statistics.median(png_runs), statistics.median(cache_runs)
    prep_s, pil_s = statistics.median(prepare_runs), statistics.median(pil_runs)
    model = None
    if recipe is not None:
        from dist_ft.bench.freeze import measure
        from dist_ft.config import load_recipe

        cfg = load_recipe(recipe)
        step = measure(cfg.model.name, "full", cfg.data.batch_size, cfg.data.image_size,
                       model_steps)
        rate = cfg.data.batch_size / step["step_s"]
        model = {"recipe": str(recipe), "name": cfg.model.name, "batch": cfg.data.batch_size,
                 "image_size": cfg.data.image_size, "device": step["device"],
                 "images_per_s": rate, "png_feeds": png_s / rate, "cache_feeds": cache_s / rate}
    return {
        "model": model,
        "png_images_per_s": png_s,
        "cache_images_per_s": cache_s,
        "ratio": cache_s / png_s,
        "prepare_images_per_s_per_worker": prep_s,
        "pil_loop_images_per_s": pil_s,
        "prepare_vs_pil": prep_s / pil_s,
        "runs": {"png": png_runs, "cache": cache_runs, "prepare": prepare_runs, "pil": pil_runs},
        "images": len(rows),
        "prepare_images": len(subset),
        "source_size": list(Image.open(paths[0]).size),
        "cache_size": size,
        "image_size": image_size,
        "batch_size": batch_size,
        "workers": workers,
    }


def _mirror(root: str | Path, dst: Path, paths: list[Path]) -> None:
    """A ChestX-ray14 folder holding just ``paths`` (symlinked) and their metadata rows."""
    import csv

    from dist_ft.data.metadata import find_metadata

    (dst / "images").mkdir(parents=True)
    for p in paths:
        (dst / "images" / p.name).symlink_to(p.resolve())
    keep = {p.name for p in paths}
    meta = find_metadata(root)
    import gzip

    opener = gzip.open if meta.suffix == ".gz" else open
    with opener(meta, "rt", newline="") as fh:
        rows = list(csv.reader(fh))
    with open(dst / "Data_Entry_2017.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(rows[0])
        writer.writerows(r for r in rows[1:] if r and r[0] in keep)


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the figures."""
    r = result
    return "\n".join([
        f"input pipeline: {r['images']} images {r['source_size'][0]}px PNG vs "
        f"{r['cache_size']}px cache -> {r['image_size']}px, batch {r['batch_size']}, "
        f"{r['workers']} loader workers (median of {len(r['runs']['png'])} alternating runs)",
        "",
        "| pipeline | images/s |",
        "|---|---:|",
        f"| PNG decode + resize + batched augment | {r['png_images_per_s']:.1f} |",
        f"| cache (memmap) + batched augment | {r['cache_images_per_s']:.1f} |",
        f"| **ratio cache / PNG** | **{r['ratio']:.1f}x** |",
        f"| prepare, 1 worker ({r['prepare_images']} images) | "
        f"{r['prepare_images_per_s_per_worker']:.1f} |",
        f"| bare PIL decode + resize loop | {r['pil_loop_images_per_s']:.1f} |",
        f"| **prepare / PIL loop** | **{r['prepare_vs_pil']:.0%}** |",
        *_model_rows(r.get("model")),
    ])


def _model_rows(model: dict[str, Any] | None) -> list[str]:
    if model is None:
        return []
    return [
        f"| {model['name']} training, batch {model['batch']} at {model['image_size']}px "
        f"({model['device']}, 1 process) | {model['images_per_s']:.1f} |",
        f"| **PNG loader / model** (>= 1: the loader keeps up) | **{model['png_feeds']:.2f}** |",
        f"| **cache loader / model** | **{model['cache_feeds']:.2f}** |",
    ]
