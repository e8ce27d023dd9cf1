"""``dist-ft bench trainer``: ``dist-ft train`` vs the tutorial loop, under DDP, ZeRO-1/2/3 and
FSDP2.

Three loops train the recipe's model at its batch size, image size and processes, on the same
synthetic twin, with the tutorial's choices (:data:`MATCHED`: Adam, constant lr, flip only,
no clipping) so that they do the same arithmetic:

- ``dist_ft``: ``dist-ft train`` as a user runs it (one full-model stage, one epoch, so
  neither engine rebuilds nor evaluation fall inside the measured windows);
- ``tutorial``: :mod:`dist_ft.bench.tutorial_loop`, written without dist-ft's code
  (per-sample PIL + torchvision transforms, Adam's defaults, ``accelerator.prepare``);
- ``step_loop``: :mod:`dist_ft.bench.step_loop`, the tutorial's step fed by dist-ft's data
  path: ``dist_ft / step_loop`` is the step's share, ``step_loop / tutorial`` the data's.

For each backend, runs alternate (dist-ft, tutorial, step loop, dist-ft, ...) so machine noise
hits all alike; each run's rate counts the steps after warm-up, the ratio is reported per pair
(min/median/max) with the CPU steal of each run. Start-up (launch to first step) is measured
for every loop, with the trainer's own set-up phases; one more ``dist-ft train`` run per
backend goes through a three-stage plan and times each engine rebuild.

FSDP2 has no tutorial loop: the tutorial's ``accelerator.prepare`` would need Accelerate's FSDP
plugin, which does not engage on CPU (it would train DDP there). Under ``fsdp`` the suite
runs dist-ft and the step loop (which shards as PyTorch's FSDP2 tutorial does); its dist-ft
rate is compared with every other backend's dist-ft rate of the same run (``vs_backends``,
also reported for the others).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path
from typing import Any

from dist_ft.bench.throughput import (
    BenchError,
    bench_recipe,
    prepare_runs,
    run_dist_ft,
    run_loop,
)
from dist_ft.config.schema import Recipe
from dist_ft.train.runtime import has_cuda, with_global_batch

# What the tutorial does, imposed on the recipe for every loop (the user's overrides win).
MATCHED = ["optim.name=adam", "optim.weight_decay=0", "optim.groups=[]",
           "optim.layer_decay=null", "schedule.name=constant", "schedule.warmup_steps=0",
           "data.augment.crop_scale=[1.0,1.0]", "data.augment.ratio=[1.0,1.0]",
           "data.augment.rotation_deg=0", "data.augment.hflip=true",
           "trainer.grad_clip_norm=null", "trainer.grad_accum_steps=1", "trainer.precision='no'"]
BACKENDS = {"ddp": ["trainer.backend=ddp"],
            "zero1": ["trainer.backend=deepspeed", "trainer.zero_stage=1"],
            "zero2": ["trainer.backend=deepspeed", "trainer.zero_stage=2"],
            "zero3": ["trainer.backend=deepspeed", "trainer.zero_stage=3"],
            "fsdp": ["trainer.backend=fsdp"]}
LOOPS = ("dist_ft", "tutorial", "step_loop")
NO_TUTORIAL = ("fsdp",)  # backends the tutorial loop cannot run (see the module docstring)


def loops_of(backend: str) -> tuple[str, ...]:
    """The loops :func:`bench_trainer` runs under ``backend`` (:data:`LOOPS`, less the
    tutorial's where it has none)."""
    return tuple(k for k in LOOPS if not (k == "tutorial" and backend in NO_TUTORIAL))


def _tutorial_args(recipe: Recipe, processes: int, steps: int, every: int) -> list[str]:
    """The tutorial loop's command line for the recipe's model, data and sizes."""
    data = recipe.data
    if data.format != "chestxray14" or data.root is None or data.cache is not None:
        raise BenchError("bench trainer's tutorial loop reads a ChestX-ray14-layout folder of "
                         f"PNGs; the recipe has data.format={data.format}, "
                         f"data.cache={data.cache}: use --data DIR (a synthetic twin)")
    per_process = with_global_batch(recipe, processes).data.batch_size
    stage = recipe.trainer.zero_stage if recipe.trainer.backend == "deepspeed" else 0
    return ["--root", str(data.root), "--model", recipe.model.name,
            "--num-classes", str(recipe.model.num_classes), "--image-size", str(data.image_size),
            "--batch-size", str(per_process), "--lr", str(recipe.optim.lr),
            "--workers", str(data.num_workers), "--zero-stage", str(stage),
            "--seed", str(recipe.trainer.seed), "--steps", str(steps), "--every", str(every)]


def _staged_plan(steps: int) -> list[dict[str, Any]]:
    """Head, then the last two blocks, then everything: two engine rebuilds in one run."""
    return [{"name": "head", "start_step": 0, "include": ["head"]},
            {"name": "top", "start_step": steps // 3, "include": ["head", {"last_blocks": 2}]},
            {"name": "full", "start_step": 2 * steps // 3, "include": ["all"]}]


def _median_rate(runs: list[dict[str, Any]]) -> float:
    return statistics.median(r["samples_per_s"] for r in runs)


def _summary(runs: dict[str, list[dict[str, Any]]],
             variants: dict[str, list[str]]) -> dict[str, Any]:
    """One backend's figures from its runs (rates, ratios, start-up); the ratios to the
    tutorial are None where it did not run (:data:`NO_TUTORIAL`)."""
    ours, step = _median_rate(runs["dist_ft"]), _median_rate(runs["step_loop"])
    theirs = _median_rate(runs["tutorial"]) if "tutorial" in runs else None
    pairs = [a["samples_per_s"] / b["samples_per_s"]
             for a, b in zip(runs["dist_ft"], runs.get("tutorial", []), strict=True)] \
        if theirs else []
    phases = sorted({k for r in runs["dist_ft"] for k in r["setup_s"]})
    return {
        "dist_ft_samples_per_s": ours, "tutorial_samples_per_s": theirs,
        "step_loop_samples_per_s": step,
        "ratio": ours / theirs if theirs else None, "ratio_min": min(pairs, default=None),
        "ratio_median": statistics.median(pairs) if pairs else None,
        "ratio_max": max(pairs, default=None), "pair_ratios": pairs,
        "step_ratio": ours / step, "data_ratio": step / theirs if theirs else None,
        "startup_s": {k: statistics.median(r["startup_s"] for r in runs[k]) for k in runs},
        "setup_s": {k: statistics.median(r["setup_s"].get(k, 0.0) for r in runs["dist_ft"])
                    for k in phases},
        "variants": {k: {"overrides": v, "samples_per_s": _median_rate(runs[k]),
                         "ratio": _median_rate(runs[k]) / theirs if theirs else None}
                     for k, v in variants.items()},
        "runs": runs,
    }


def bench_trainer(recipe: str | Path, data: Path | None, overrides: list[str] | None = None,
                  processes: int = 2, steps: int = 45, warmup: int = 5, every: int = 5,
                  repeats: int = 3, backends: tuple[str, ...] = ("ddp", "zero2"),
                  variants: dict[str, list[str]] | None = None,
                  stage_changes: bool = True) -> dict[str, Any]:
    """Measure samples/s of the three loops per backend, alternating, ``repeats`` runs each.

    Args:
        recipe: the recipe (its model, batch, image size, workers and lr are used; its
            optimizer, schedule and augmentation become the tutorial's, :data:`MATCHED`).
        data: folder for the synthetic twin the runs read (made once at the recipe's
            ``data.load_size``, reused); ``None`` keeps the recipe's ``data.root``.
        overrides: extra ``KEY=VALUE`` recipe overrides (applied after :data:`MATCHED`,
            before each backend's own, :data:`BACKENDS`, which set the backend per row).
        processes: processes per run (one per GPU where there are GPUs).
        steps, warmup, every: optimizer steps per run, steps left out, window length.
        repeats: runs of each loop per backend.
        backends: names in :data:`BACKENDS`.
        variants: more ``dist-ft train`` loops, by name, each with its own extra overrides
            (an A/B of an option, measured side by side with the others).
        stage_changes: also time the engine rebuilds of a three-stage run per backend.

    Returns:
        ``ratio`` (the smallest backend's dist-ft / tutorial ratio of medians; None if no
        backend has a tutorial loop) and per backend (``backends``) rates, ratios, start-up,
        set-up phases, stage entries, every run, and ``vs_backends``: its dist-ft rate over
        each other backend's in this run.
    """
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise BenchError(f"unknown backend(s) {unknown}: choose from {', '.join(BACKENDS)}")
    variants = dict(variants or {})
    taken = [k for k in variants if k in LOOPS]
    if taken:
        raise BenchError(f"--variant names {taken} are the suite's own loops: choose others")
    stage_changes = stage_changes and steps >= 3  # three stages need three distinct steps
    base = [*MATCHED, *(overrides or [])]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        b: {k: [] for k in (*loops_of(b), *variants)} for b in backends}
    probes: dict[str, Recipe] = {}
    settings: dict[str, list[str]] = {}
    for b in backends:
        probes[b], settings[b] = prepare_runs(recipe, [*base, *BACKENDS[b]], data, steps, every,
                                              processes)
    stages: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="dist-ft-bench-") as tmp:
        for i in range(repeats):
            for b in backends:
                for kind in runs[b]:
                    out = Path(tmp) / f"{b}-{kind}{i}"
                    rec, path = bench_recipe(recipe, [*settings[b], *variants.get(kind, [])],
                                             out, steps, every)
                    if kind == "tutorial":
                        run = run_loop("dist_ft.bench.tutorial_loop",
                                       _tutorial_args(rec, processes, steps, every), out,
                                       processes, warmup)
                    elif kind == "step_loop":
                        run = run_loop("dist_ft.bench.step_loop",
                                       [str(path), "--steps", str(steps), "--every", str(every)],
                                       out, processes, warmup)
                    else:
                        run = run_dist_ft(rec, path, processes, warmup)
                    runs[b][kind].append(run)
        if stage_changes:
            for b in backends:
                out = Path(tmp) / f"{b}-stages"
                rec, path = bench_recipe(recipe, settings[b], out, steps, every,
                                         _staged_plan(steps))
                stages[b] = run_dist_ft(rec, path, processes, warmup)["stage_entries"]
    per_backend = {b: {**_summary(runs[b], variants), "stage_entries": stages.get(b, [])}
                   for b in backends}
    for b, res in per_backend.items():  # the same machine, recipe and time: rates compare
        res["vs_backends"] = {o: res["dist_ft_samples_per_s"] / r["dist_ft_samples_per_s"]
                              for o, r in per_backend.items() if o != b}
    probe = probes[backends[0]]
    ratios = {b: r["ratio"] for b, r in per_backend.items() if r["ratio"] is not None}
    return {
        "ratio": min(ratios.values(), default=None),
        "ratios": ratios,
        "backends": per_backend,
        "recipe": str(recipe), "overrides": base, "model": probe.model.name,
        "batch_per_process": with_global_batch(probe, processes).data.batch_size,
        "image_size": probe.data.image_size, "processes": processes, "steps": steps,
        "warmup": warmup, "every": every, "repeats": repeats,
        "device": "cuda" if has_cuda() else "cpu",
    }


_LOOP_NAMES = {"dist_ft": "dist-ft train", "tutorial": "tutorial loop (PIL + torchvision, Adam)",
               "step_loop": "tutorial step on dist-ft's data path"}


def format_table(r: dict[str, Any]) -> str:
    """A markdown table of the figures, one block per backend."""
    rows = [f"trainer vs the tutorial loop: {r['model']} {r['image_size']}px, batch "
            f"{r['batch_per_process']} x {r['processes']} processes, {r['device']}; steps "
            f"{r['warmup'] + 1}-{r['steps']} of each run, {r['repeats']} alternating runs each",
            "", "| backend | loop | samples/s median | min-max | start-up s |",
            "|---|---|---:|---:|---:|"]
    for b, res in r["backends"].items():
        for kind, runs in res["runs"].items():
            rates = [x["samples_per_s"] for x in runs]
            name = _LOOP_NAMES.get(kind) or \
                f"dist-ft train, {' '.join(res['variants'][kind]['overrides'])} ({kind})"
            rows.append(f"| {b} | {name} | {statistics.median(rates):.1f} | "
                        f"{min(rates):.1f}-{max(rates):.1f} | {res['startup_s'][kind]:.1f} |")
        if res["ratio"] is None:
            rows.append(f"| {b} | step (dist-ft / step loop); no tutorial loop | "
                        f"{res['step_ratio']:.3f} | | |")
        else:
            rows.append(f"| {b} | **ratio dist-ft / tutorial** | **{res['ratio']:.3f}** | per "
                        f"pair {res['ratio_min']:.3f}-{res['ratio_max']:.3f} | |")
            rows.append(f"| {b} | step (dist-ft / step loop) , data (step loop / tutorial) | "
                        f"{res['step_ratio']:.3f}, {res['data_ratio']:.3f} | | |")
        if res["vs_backends"]:
            rows.append(f"| {b} | dist-ft vs dist-ft under "
                        + ", ".join(res["vs_backends"]) + " (this run) | "
                        + ", ".join(f"{v:.3f}" for v in res["vs_backends"].values()) + " | | |")
    rows.append("")
    for b, res in r["backends"].items():
        setup = ", ".join(f"{k} {v:.2f}" for k, v in res["setup_s"].items())
        rows.append(f"- {b}: dist-ft set-up {sum(res['setup_s'].values()):.1f} s ({setup})")
        rebuilds = [e for e in res["stage_entries"] if e.get("rebuilt")]
        if rebuilds:
            what = "new optimizer, same sharded model" if b == "fsdp" else "engine rebuilds"
            rows.append(f"- {b}: stage changes ({what}) "
                        + ", ".join(f"stage {e['stage']} at step {e['step']}: {e['seconds']:.2f} s"
                                    for e in rebuilds))
    steal = [x.get("cpu_steal", 0.0) for res in r["backends"].values()
             for runs in res["runs"].values() for x in runs]
    if max(steal, default=0.0) > 0.02:
        rows.append(f"\nCPU steal (hypervisor) during the runs: up to {max(steal):.0%}; "
                    "per run in the JSON (`cpu_steal`): runs with more measured a busy host")
    return "\n".join(rows)
