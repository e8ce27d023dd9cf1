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
from dist_ft.data.datasets import CachedImages, LabelledImages, collate
from dist_ft.data.findings import FINDINGS
from dist_ft.data.images import find_images
from dist_ft.data.transforms import BatchAugment, BatchNormalize


def _device() -> torch.device:
    """Where training would augment: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_s(dataset: Any, batch_size: int, workers: int, augment: BatchAugment,
                  device: torch.device | None = None) -> float:
    """Loader + batched augmentation + normalisation: all the pipeline does before the model.

    As in training: the loader collates with :func:`collate` (pinned on CUDA), the batch is
    copied to ``device`` and augmented there; the clock stops after a synchronize.
    """
    device = device or torch.device("cpu")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False,
                        collate_fn=collate, pin_memory=device.type == "cuda")
    normalize = BatchNormalize().to(device)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    seen = 0
    for images, _ in loader:
        augment(images.to(device, non_blocking=True), generator, normalize)
        seen += len(images)
    _sync(device)
    return seen / (time.perf_counter() - start)


STAGES = ("read", "collate", "host_to_device", "augment")


def _stage_seconds(dataset: Any, batch_size: int, augment: BatchAugment,
                   device: torch.device) -> dict[str, float]:
    """Seconds spent in each stage over one pass, in this process, batch by batch.

    ``read`` is what the loader's fetch does (``__getitems__`` where the dataset has it, else
    one ``__getitem__`` per sample), ``collate`` stacks the samples, ``host_to_device`` copies
    a pinned batch with ``non_blocking`` and waits for it (pinning, done by the loader's
    pin-memory thread, is not counted; 0 on CPU: nothing is copied), ``augment`` is
    :class:`BatchAugment` + :class:`BatchNormalize` on ``device``, synchronized.
    """
    normalize = BatchNormalize().to(device)
    generator = torch.Generator().manual_seed(0)
    batched = callable(getattr(dataset, "__getitems__", None))
    spent = dict.fromkeys(STAGES, 0.0)
    for first in range(0, len(dataset), batch_size):
        index = list(range(first, min(first + batch_size, len(dataset))))
        t0 = time.perf_counter()
        data = dataset.__getitems__(index) if batched else [dataset[i] for i in index]
        t1 = time.perf_counter()
        images, _ = collate(data)
        t2 = time.perf_counter()
        spent["read"] += t1 - t0
        spent["collate"] += t2 - t1
        if device.type == "cuda":  # on CPU nothing is copied: 0, not the clock's noise
            images = images.pin_memory()
            t3 = time.perf_counter()
            images = images.to(device, non_blocking=True)
            _sync(device)
            spent["host_to_device"] += time.perf_counter() - t3
        t4 = time.perf_counter()
        augment(images, generator, normalize)
        _sync(device)
        spent["augment"] += time.perf_counter() - t4
    return spent


def _breakdown(dataset: Any, batch_size: int, augment: BatchAugment, device: torch.device,
               passes: int) -> dict[str, dict[str, Any]]:
    """Per stage (median of ``passes``): ms per batch and the images/s it alone would allow."""
    runs = [_stage_seconds(dataset, batch_size, augment, device) for _ in range(passes)]
    batches = -(-len(dataset) // batch_size)
    out: dict[str, dict[str, Any]] = {}
    for stage in [*STAGES, "total"]:
        seconds = statistics.median(
            sum(r.values()) if stage == "total" else r[stage] for r in runs)
        entry: dict[str, Any] = {"ms_per_batch": 1e3 * seconds / batches,
                                 "images_per_s": len(dataset) / seconds if seconds else None}
        if stage == "host_to_device" and device.type != "cuda":
            entry["note"] = "n/a (cpu)"
        out[stage] = entry
    return out


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

    device = _device()
    png_runs, cache_runs = [], []
    _images_per_s(cached, batch_size, workers, augment, device)  # warm the page cache
    for _ in range(repeats):
        png_runs.append(_images_per_s(png, batch_size, workers, augment, device))
        cache_runs.append(_images_per_s(cached, batch_size, workers, augment, device))
    # Stage by stage, in this process: the cache's median of `repeats` passes; one PNG pass
    # (its decode dwarfs the rest, so noise does not matter).
    breakdown = {"cache": _breakdown(cached, batch_size, augment, device, repeats),
                 "png": _breakdown(png, batch_size, augment, device, 1)}

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
        "breakdown": breakdown,
        "device": str(device),
        "threads": torch.get_num_threads(),
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
        *_breakdown_rows(r),
    ])


_STAGE_NAMES = {"read": "read (dataset fetch)", "collate": "collate",
                "host_to_device": "host -> device copy", "augment": "augment + normalize",
                "total": "**sum of stages**"}


def _breakdown_rows(r: dict[str, Any]) -> list[str]:
    breakdown = r.get("breakdown")
    if not breakdown:
        return []

    def cells(entry: dict[str, Any]) -> str:
        if entry.get("note"):
            return f"{entry['note']} | -"
        rate = entry["images_per_s"]
        return f"{entry['ms_per_batch']:.2f} | {'-' if rate is None else f'{rate:,.0f}'}"

    return [
        "",
        f"stages, one after another in one process ({r.get('device', 'cpu')}, "
        f"{r.get('threads', '?')} torch threads), per batch of {r['batch_size']}; images/s is "
        "what that stage alone would allow:",
        "",
        "| stage | cache ms/batch | cache images/s | PNG ms/batch | PNG images/s |",
        "|---|---:|---:|---:|---:|",
        *(f"| {_STAGE_NAMES[stage]} | {cells(breakdown['cache'][stage])} | "
          f"{cells(breakdown['png'][stage])} |" for stage in _STAGE_NAMES),
    ]


def _model_rows(model: dict[str, Any] | None) -> list[str]:
    if model is None:
        return []
    return [
        f"| {model['name']} training, batch {model['batch']} at {model['image_size']}px "
        f"({model['device']}, 1 process) | {model['images_per_s']:.1f} |",
        f"| **PNG loader / model** (>= 1: the loader keeps up) | **{model['png_feeds']:.2f}** |",
        f"| **cache loader / model** | **{model['cache_feeds']:.2f}** |",
    ]
