"""``dist-ft bench trainer``: ``dist-ft train`` vs a hand-written Accelerate loop.

Same recipe for both (model, data, batch, backend, processes); one full-model stage and one
epoch so neither engine rebuilds nor evaluation fall inside the measured windows. Runs
alternate (dist-ft, baseline, dist-ft, ...) so machine noise hits both alike; each run's rate
counts the steps after warm-up, and the ratio is reported per pair (min/median/max).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from dist_ft.bench.throughput import (
    bench_recipe,
    prepare_runs,
    run_baseline,
    run_dist_ft,
)
from dist_ft.train.runtime import has_cuda


def bench_trainer(recipe: str | Path, data: Path | None, overrides: list[str] | None = None,
                  processes: int = 2, steps: int = 40, warmup: int = 10, every: int = 5,
                  repeats: int = 3,
                  variants: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Measure samples/s of both loops, alternating, ``repeats`` runs each.

    Args:
        recipe: the recipe (its model, batch, backend and augmentation are used).
        data: folder for the synthetic twin the runs read (made once at the recipe's
            ``data.load_size``, reused); ``None`` keeps the recipe's ``data.root``.
        overrides: extra ``KEY=VALUE`` recipe overrides.
        processes: processes per run (one per GPU where there are GPUs).
        steps, warmup, every: optimizer steps per run, steps left out, window length.
        repeats: runs of each loop.
        variants: more ``dist-ft train`` loops, by name, each with its own extra overrides
            (e.g. ``{"for_loop": ["optim.implementation=for_loop"]}``), alternating with the
            others: an A/B of an option, measured side by side.
    """
    probe, base = prepare_runs(recipe, list(overrides or []), data, steps, every, processes)
    loops = {"dist_ft": [], "baseline": [], **(variants or {})}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in loops}
    with tempfile.TemporaryDirectory(prefix="dist-ft-bench-") as tmp:
        for i in range(repeats):
            for kind, extra in loops.items():
                rec, path = bench_recipe(recipe, [*base, *extra], Path(tmp) / f"{kind}{i}",
                                         steps, every)
                run = (run_baseline(rec, path, processes, warmup, every) if kind == "baseline"
                       else run_dist_ft(rec, path, processes, warmup))
                runs[kind].append(run)
    ours = [r["samples_per_s"] for r in runs["dist_ft"]]
    theirs = [r["samples_per_s"] for r in runs["baseline"]]
    pairs = [a / b for a, b in zip(ours, theirs, strict=True)]
    return {
        "dist_ft_samples_per_s": statistics.median(ours),
        "baseline_samples_per_s": statistics.median(theirs),
        "ratio": statistics.median(ours) / statistics.median(theirs),
        "ratio_min": min(pairs), "ratio_median": statistics.median(pairs),
        "ratio_max": max(pairs), "pair_ratios": pairs,
        "runs": runs,
        "variants": {k: {"overrides": v, "samples_per_s": statistics.median(
            r["samples_per_s"] for r in runs[k]), "ratio": statistics.median(
            r["samples_per_s"] for r in runs[k]) / statistics.median(theirs)}
            for k, v in (variants or {}).items()},
        "recipe": str(recipe), "overrides": base, "model": probe.model.name,
        "backend": probe.trainer.backend, "zero_stage": probe.trainer.zero_stage,
        "batch_per_process": probe.data.batch_size, "image_size": probe.data.image_size,
        "processes": processes, "steps": steps, "warmup": warmup, "repeats": repeats,
        "device": "cuda" if has_cuda() else "cpu",
    }


def format_table(r: dict[str, Any]) -> str:
    """A markdown table of the figures."""
    backend = "DDP" if r["backend"] == "ddp" else f"DeepSpeed ZeRO-{r['zero_stage']}"
    rows = [
        f"trainer overhead: {r['model']} {r['image_size']}px, batch {r['batch_per_process']} x "
        f"{r['processes']} processes, {backend}, {r['device']}; steps {r['warmup'] + 1}-"
        f"{r['steps']} of each run, {r['repeats']} alternating runs each",
        "",
        "| loop | samples/s median | min-max |",
        "|---|---:|---:|",
    ]
    for key, name in (("dist_ft", "dist-ft train"), ("baseline", "hand-written Accelerate loop")):
        rates = [x["samples_per_s"] for x in r["runs"][key]]
        rows.append(f"| {name} | {statistics.median(rates):.1f} | "
                    f"{min(rates):.1f}-{max(rates):.1f} |")
    for key, variant in r.get("variants", {}).items():
        rates = [x["samples_per_s"] for x in r["runs"][key]]
        rows.append(f"| dist-ft train, {' '.join(variant['overrides'])} ({key}) | "
                    f"{variant['samples_per_s']:.1f} | {min(rates):.1f}-{max(rates):.1f} |")
    rows.append(f"| **ratio dist-ft / baseline** | **{r['ratio']:.3f}** | per pair "
                f"{r['ratio_min']:.3f} / {r['ratio_median']:.3f} / {r['ratio_max']:.3f} "
                "(min/median/max) |")
    steal = [x.get("cpu_steal", 0.0) for runs in r["runs"].values() for x in runs]
    if max(steal, default=0.0) > 0.02:
        rows.append(f"\nCPU steal (hypervisor) during the runs: up to {max(steal):.0%}; "
                    "per run in the JSON (`cpu_steal`): runs with more measured a busy host")
    return "\n".join(rows)
