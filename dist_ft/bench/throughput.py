"""Training throughput: launch runs on K processes and read their samples/s the same way.

A *window* is ``(last step, images, seconds)``: consecutive windows cover the training loop's
time without gaps (``dist-ft train`` logs ``train/samples_per_s`` per window, the baseline loop
writes its windows to JSON). The rate after warm-up is total images / total seconds of the
windows that end after ``warmup`` steps, so a slow window weighs by its duration.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from dist_ft.config import load_recipe
from dist_ft.config.load import recipe_to_dict, validate_recipe
from dist_ft.config.schema import Recipe
from dist_ft.rundir import RunDir
from dist_ft.train.runtime import with_global_batch


class BenchError(RuntimeError):
    """A benchmark run failed; the message holds the command and the end of its output."""


def launch_command(processes: int, module_args: list[str]) -> list[str]:
    """``accelerate launch`` of ``python -m MODULE ARGS`` on ``processes`` local processes.

    More than one goes through Accelerate's torchrun path (``--multi_gpu``: gloo on CPU, NCCL
    on GPUs; the recipe's backend is chosen in-process); one process runs under torchrun
    directly (Accelerate refuses ``--multi_gpu`` with one process), so both loops get the
    same launcher environment at every size.
    """
    if processes == 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "1", "-m", *module_args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
            "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "-m", *module_args]


def cpu_jiffies() -> tuple[int, int]:
    """(steal, total) CPU time of this machine so far (Linux ``/proc/stat``; zeros elsewhere).

    Steal is time the hypervisor gave this VM's CPUs to someone else: a run during which it
    is high measured a busy host, not the code.
    """
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Share of CPU time stolen between two :func:`cpu_jiffies` readings."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def run_logged(argv: list[str], log: Path, timeout: float = 900) -> dict[str, float]:
    """Run ``argv`` with its output in ``log``: its wall seconds, the CPU steal meanwhile, and
    when it was launched (``launched_at``, Unix time: start-up ends when its loop begins).

    Raises:
        BenchError: the command failed (the message holds the end of its output).
    """
    env = {k: v for k, v in os.environ.items() if k not in
           ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("PYTHONUNBUFFERED", "1")
    start, before, launched_at = time.perf_counter(), cpu_jiffies(), time.time()
    with open(log, "w") as fh:
        done = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, check=False)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}; end of {log}:\n{tail}")
    return {"wall_s": time.perf_counter() - start, "cpu_steal": steal_share(before, cpu_jiffies()),
            "launched_at": launched_at}


def rate_after(windows: list[tuple[int, float, float]], warmup: int) -> dict[str, Any]:
    """Samples/s over the windows ending after ``warmup`` steps, and their per-window spread."""
    kept = [(s, n, t) for s, n, t in windows if s > warmup and t > 0]
    if not kept:
        raise BenchError(f"no logged window ends after warm-up step {warmup}: {windows}")
    first = max([s for s, _, _ in windows if s <= warmup], default=0)
    per_window = sorted(n / t for _, n, t in kept)
    return {"samples_per_s": sum(n for _, n, _ in kept) / sum(t for _, _, t in kept),
            "measured_steps": kept[-1][0] - first,
            "window_min": per_window[0], "window_max": per_window[-1]}


def dist_ft_windows(run_dir: Path, batch: int, world: int) -> list[tuple[int, float, float]]:
    """Windows of a ``dist-ft train`` run from its ``train/samples_per_s`` (first epoch)."""
    from dist_ft.logs.events import read_run

    series = read_run(RunDir(run_dir).tb).series.get("train/samples_per_s")
    if series is None:
        raise BenchError(f"{run_dir}/tb has no train/samples_per_s")
    windows, previous = [], 0
    for step, rate in zip(series.steps.tolist(), series.values.tolist(), strict=True):
        images = (step - previous) * batch * world
        windows.append((step, float(images), images / rate if rate > 0 else math.inf))
        previous = step
    return windows


def bench_recipe_data(path: str | Path, overrides: list[str], out: Path, steps: int,
                      every: int, stages: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The recipe a throughput run trains: one full-model stage, one epoch, no checkpoints.

    A single stage keeps engine rebuilds out of the measured windows (their cost is a
    stage-boundary cost, logged separately by the trainer; ``stages`` replaces the plan to
    measure it); one epoch keeps evaluation out.
    """
    data = recipe_to_dict(load_recipe(path, overrides))
    data["plan"]["stages"] = stages or [{"name": "full", "start_step": 0, "include": ["all"]}]
    data["trainer"].update(max_steps=steps, epochs=1, checkpoint_every_steps=None)
    data["logging"].update(every_steps=every, per_rank=False)
    data["output_dir"] = str(out)
    return data


def probe_recipe(path: str | Path, overrides: list[str], steps: int, every: int) -> Recipe:
    """The bench recipe, validated, without writing anything (to read its sizes)."""
    return validate_recipe(bench_recipe_data(path, overrides, Path("probe"), steps, every))


def bench_recipe(path: str | Path, overrides: list[str], out: Path, steps: int,
                 every: int, stages: list[dict[str, Any]] | None = None) -> tuple[Recipe, Path]:
    """Write the bench recipe (:func:`bench_recipe_data`) beside ``out``; validated + path."""
    data = bench_recipe_data(path, overrides, out, steps, every, stages)
    recipe_path = out.with_suffix(".yaml")
    recipe_path.parent.mkdir(parents=True, exist_ok=True)
    recipe_path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_recipe(recipe_path), recipe_path


def ensure_synthetic(root: Path, images: int, size: int) -> Path:
    """A synthetic ChestX-ray14 twin of at least ``images`` images at ``size`` px (made once)."""
    from dist_ft.data.synth import write_synthetic

    marker = root / ".bench-synth.json"
    if marker.is_file():
        made = json.loads(marker.read_text())
        if made["size"] == size and made["images"] >= images:
            return root
    write_synthetic(root, images=images, size=size, workers=min(2, os.cpu_count() or 1))
    marker.write_text(json.dumps({"images": images, "size": size}))
    return root


def images_needed(steps: int, batch: int, world: int) -> int:
    """Synthetic images whose train split holds ``steps`` steps in one epoch.

    The twin keeps 80% of patients for train+val and the recipes hold out 20% of that for
    validation: about 64% of the images train; 10% margin for the patient-level splits.
    """
    return math.ceil(steps * batch * world / 0.64 * 1.1)


def run_dist_ft(recipe: Recipe, recipe_path: Path, processes: int, warmup: int) -> dict[str, Any]:
    """One ``dist-ft train`` run on ``processes`` processes: its rate after warm-up, its
    start-up (launch to first step) with the trainer's own set-up phases, its stage entries."""
    out = Path(recipe.output_dir)
    timing = run_logged(launch_command(processes, ["dist_ft", "train", str(recipe_path)]),
                        out.with_suffix(".log"))
    windows = dist_ft_windows(out, recipe.data.batch_size, processes)
    status = json.loads(RunDir(out).status.read_text())
    return {**rate_after(windows, warmup), **timing,
            "startup_s": status["train_started_at"] - timing["launched_at"],
            "setup_s": status.get("setup_s", {}), "stage_entries": status.get("stage_entries", [])}


def run_loop(module: str, args: list[str], out: Path, processes: int,
             warmup: int) -> dict[str, Any]:
    """One run of a hand-written loop (``python -m MODULE ARGS --out FILE``, e.g.
    :mod:`dist_ft.bench.tutorial_loop`): its rate after warm-up and its start-up."""
    out.mkdir(parents=True, exist_ok=True)
    result = out / "loop.json"
    timing = run_logged(launch_command(processes, [module, *args, "--out", str(result)]),
                        out.with_suffix(".log"))
    doc = json.loads(result.read_text())
    windows = [(int(s), n, t) for s, n, t in doc["windows"]]
    return {**rate_after(windows, warmup), **timing,
            "startup_s": doc["loop_started_at"] - timing["launched_at"]}


def prepare_runs(recipe: str | Path, overrides: list[str], data: Path | None, steps: int,
                 every: int, world: int) -> tuple[Recipe, list[str]]:
    """The probe recipe and the overrides every run gets: with ``data``, a synthetic twin
    big enough for ``steps`` steps of one epoch at ``world`` processes (made once)."""
    base = list(overrides)
    probe = probe_recipe(recipe, base, steps, every)
    if data is not None:
        size = probe.data.load_size or probe.data.image_size
        batch = with_global_batch(probe, world).data.batch_size
        ensure_synthetic(data, images_needed(steps, batch, world), size)
        base.append(f"data.root={data.resolve()}")
    return probe, base
