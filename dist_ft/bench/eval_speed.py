"""``dist-ft bench eval``: images/s of ``dist-ft eval`` vs a plain scoring loop, and the bootstrap.

Both sides run as a user runs them, each a fresh Python process on the same weights and
images: ``dist-ft eval RUN --split SPLIT`` (the whole command: start-up, sharded scoring,
the statistics, plots, the record), and :data:`PLAIN_LOOP`, an independent script a user
would write (torchvision model, PIL decoding, a DataLoader, sigmoid) sharing no dist-ft code.
Runs alternate (dist-ft, plain, dist-ft, ...) and the best of each is kept. Reported:

- the **scoring** rate of each (images / seconds of its loop, start-up excluded) and their
  ratio, which is what dist-ft's evaluation loop costs (target >= 0.95);
- the **end-to-end** rate of each (images / wall seconds of the process), where dist-ft also
  pays for the report (bootstrap CIs, subgroups, plots);
- the bootstrap's time for 1,000 resamples of 25,596 x 14 (ChestX-ray14's test split).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from dist_ft.bench.throughput import ensure_synthetic
from dist_ft.config import load_recipe
from dist_ft.config.load import recipe_to_dict
from dist_ft.data.datasets import build_dataset

# The plain loop: what a user writes without dist-ft. argv: spec.json; prints one JSON line.
PLAIN_LOOP = r'''
import json, sys, time
start = time.perf_counter()
import numpy as np, torch, torchvision
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Dataset

spec = json.load(open(sys.argv[1]))
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

class Images(Dataset):
    def __init__(self, paths, size):
        self.paths, self.size = paths, size
    def __len__(self):
        return len(self.paths)
    def __getitem__(self, i):
        image = Image.open(self.paths[i]).convert("L").resize((self.size, self.size),
                                                              Image.BILINEAR)
        return torch.from_numpy(np.array(image)).unsqueeze(0)

model = torchvision.models.get_model(spec["model"], weights=None,
                                     num_classes=spec["num_classes"])
model.load_state_dict(load_file(spec["weights"]))
model = model.to(device).eval()
mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
loader = DataLoader(Images(spec["paths"], spec["load_size"]), batch_size=spec["batch_size"],
                    num_workers=spec["workers"], pin_memory=device.type == "cuda")
scores = []
loop_start = time.perf_counter()
with torch.inference_mode():
    for images in loader:
        x = images.to(device, non_blocking=True).float().expand(-1, 3, -1, -1) / 255
        if x.shape[-1] != spec["image_size"]:
            x = torch.nn.functional.interpolate(x, size=(spec["image_size"],) * 2,
                                                mode="bilinear", antialias=True)
        scores.append(torch.sigmoid(model((x - mean) / std)).float().cpu())
loop_s = time.perf_counter() - loop_start
print(json.dumps({"images": int(sum(len(s) for s in scores)), "loop_s": loop_s,
                  "process_s": time.perf_counter() - start}))
'''


def _run(argv: list[str], env: dict[str, str], timeout: float = 1800) -> tuple[str, float]:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} ... failed ({result.returncode}): "
                           f"{result.stderr[-2000:]}")
    return result.stdout, wall


def prepare_run(recipe: str | Path, overrides: list[str], data: Path, images: int,
                work: Path) -> tuple[Path, Any]:
    """A synthetic twin of ``images`` images at the recipe's load size and a run folder with
    random weights of the recipe's model (``final/model.safetensors``)."""
    from safetensors.torch import save_file

    from dist_ft.data.datasets import load_size
    from dist_ft.models.factory import build_model
    from dist_ft.rundir import RunDir

    probe = load_recipe(recipe, overrides)
    ensure_synthetic(data, images, load_size(probe.data))
    resolved = load_recipe(recipe, [*overrides, f"data.root={data}", "data.cache=null",
                                    f"output_dir={work / 'run'}", "model.pretrained=none"])
    run = RunDir(work / "run")
    run.final.mkdir(parents=True, exist_ok=True)
    run.recipe.write_text(yaml.safe_dump(recipe_to_dict(resolved), sort_keys=False))
    torch.manual_seed(0)
    model = build_model(resolved.model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(run.final_weights))
    return run.root, resolved


def bench_eval(recipe: str | Path, data: Path, overrides: list[str] | None = None,
               images: int = 600, split: str = "val", repeats: int = 2,
               resamples: int = 1000, work: Path | None = None,
               bootstrap: bool = True) -> dict[str, Any]:
    """Time ``dist-ft eval`` against the plain loop on the same weights and images.

    Args:
        recipe: the recipe whose model, input size, batch size and loader workers are used.
        data: folder of the synthetic twin (made once, reused).
        overrides: recipe overrides (e.g. ``model.name=densenet121``).
        images: images of the whole twin (the split scored is a share of them).
        split: the split scored (``val``: no second split is scored for operating points).
        repeats: runs of each side, alternating; the best of each is reported.
        resamples: ``dist-ft eval --resamples`` (1000: what a user gets by default).
        work: folder for the run folder and reports (default: beside ``data``).
        bootstrap: also time the bootstrap on ChestX-ray14's test-split size.

    Returns:
        The figures (see :func:`format_table`).
    """
    work = Path(work or Path(data).parent / "bench_eval")
    work.mkdir(parents=True, exist_ok=True)
    run, resolved = prepare_run(recipe, list(overrides or []), Path(data), images, work)
    dataset = build_dataset(resolved.data, split)
    spec = {"paths": [str(p) for p in dataset.paths], "model": resolved.model.name,
            "num_classes": resolved.model.num_classes, "weights": str(run / "final" /
                                                                      "model.safetensors"),
            "load_size": dataset.load_size, "image_size": resolved.data.image_size,
            "batch_size": resolved.data.batch_size, "workers": resolved.data.num_workers}
    (work / "plain.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    dist_ft_argv = [sys.executable, "-m", "dist_ft", "eval", str(run), "--split", split,
                    "--resamples", str(resamples), "--out", str(work / "report"), "--json"]
    plain_argv = [sys.executable, "-c", PLAIN_LOOP, str(work / "plain.json")]
    runs: dict[str, list[dict[str, float]]] = {"dist_ft": [], "plain": []}
    for _ in range(repeats):
        out, wall = _run(dist_ft_argv, env)
        report = json.loads(out)
        runs["dist_ft"].append({"wall_s": wall, "loop_s": report["scoring_seconds"],
                                "images": report["images"]})
        out, wall = _run(plain_argv, env)
        plain = json.loads(out)
        runs["plain"].append({"wall_s": wall, "loop_s": plain["loop_s"],
                              "images": plain["images"]})
    n = len(dataset)
    for side in runs.values():
        if any(r["images"] != n for r in side):
            raise RuntimeError(f"a side scored {[r['images'] for r in side]} images, not {n}")
    best = {k: {"loop_s": min(r["loop_s"] for r in v), "wall_s": min(r["wall_s"] for r in v)}
            for k, v in runs.items()}
    result: dict[str, Any] = {
        "recipe": str(recipe), "overrides": list(overrides or []),
        "model": resolved.model.name, "image_size": resolved.data.image_size,
        "batch_size": resolved.data.batch_size, "workers": resolved.data.num_workers,
        "device": "cuda" if torch.cuda.is_available() else "cpu", "split": split,
        "images": n, "resamples": resamples, "repeats": repeats, "runs": runs,
        "dist_ft_scoring_images_per_s": n / best["dist_ft"]["loop_s"],
        "plain_scoring_images_per_s": n / best["plain"]["loop_s"],
        "dist_ft_end_to_end_images_per_s": n / best["dist_ft"]["wall_s"],
        "plain_end_to_end_images_per_s": n / best["plain"]["wall_s"],
    }
    result["scoring_ratio"] = (result["dist_ft_scoring_images_per_s"]
                               / result["plain_scoring_images_per_s"])
    result["end_to_end_ratio"] = (result["dist_ft_end_to_end_images_per_s"]
                                  / result["plain_end_to_end_images_per_s"])
    if bootstrap:
        from dist_ft.bench.evaluation import bootstrap_timing

        result["bootstrap"] = bootstrap_timing(images=25_596, classes=14, resamples=1000)
    return result


def format_table(r: dict[str, Any]) -> str:
    """The figures as markdown."""
    lines = [
        f"dist-ft eval vs a plain loop: {r['model']} at {r['image_size']} px, batch "
        f"{r['batch_size']}, {r['workers']} loader workers, {r['device']}, {r['images']} "
        f"{r['split']} images, --resamples {r['resamples']} (best of {r['repeats']} "
        "alternating runs)",
        "",
        "| | dist-ft eval | plain loop | ratio |",
        "|---|---:|---:|---:|",
        f"| scoring images/s (the loop) | {r['dist_ft_scoring_images_per_s']:.1f} | "
        f"{r['plain_scoring_images_per_s']:.1f} | **{r['scoring_ratio']:.2f}** |",
        f"| end-to-end images/s (process wall; dist-ft also writes the report) | "
        f"{r['dist_ft_end_to_end_images_per_s']:.1f} | "
        f"{r['plain_end_to_end_images_per_s']:.1f} | {r['end_to_end_ratio']:.2f} |",
    ]
    boot = r.get("bootstrap")
    if boot:
        lines += ["", f"bootstrap (AUROC and AUPRC CIs, by patient): {boot['resamples']:,} "
                  f"resamples of {boot['images']:,} images ({boot['patients']:,} patients) x "
                  f"{boot['classes']} findings in {boot['seconds']:.2f} s"]
    return "\n".join(lines)
