"""``dist-ft bench scaling``: samples/s of ``dist-ft train`` as the number of processes grows.

Locally, each size runs under ``accelerate launch`` on this machine (CPU processes here, one
process per GPU on a GPU machine). With ``--submit`` each size is one ``dist-ft submit
--nodes N --gpus-per-node G --wait`` job, so the same suite measures several nodes through
Slurm. Either way every run trains the same one-stage, one-epoch bench recipe at a fixed
per-process batch (weak scaling), sizes alternate run by run, and the rate is read from the
run's own ``train/samples_per_s`` windows after warm-up.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dist_ft.bench.throughput import (
    BenchError,
    bench_recipe,
    dist_ft_windows,
    prepare_runs,
    rate_after,
    run_dist_ft,
)
from dist_ft.config.schema import backend_label
from dist_ft.train.runtime import has_cuda


def _submit_run(recipe_path: Path, run_dir: Path, nodes: int, gpus_per_node: int,
                submit_args: list[str], warmup: int, batch: int) -> dict[str, Any]:
    """One ``dist-ft submit ... --wait`` job; its rate from the run's TensorBoard windows."""
    argv = [sys.executable, "-m", "dist_ft", "submit", str(recipe_path), "--nodes", str(nodes),
            "--gpus-per-node", str(gpus_per_node), "--wait", *submit_args]
    log = run_dir.with_suffix(".submit.log")
    with open(log, "w") as fh:
        done = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} exited {done.returncode}:\n"
                         f"{log.read_text(errors='replace')[-3000:]}")
    world = nodes * max(1, gpus_per_node)
    return {**rate_after(dist_ft_windows(run_dir, batch, world), warmup), "world_size": world}


def bench_scaling(recipe: str | Path, data: Path | None, overrides: list[str] | None = None,
                  processes: tuple[int, ...] = (1, 2), nodes: tuple[int, ...] = (),
                  gpus_per_node: int = 0, submit_args: list[str] | None = None,
                  steps: int = 40, warmup: int = 10, every: int = 5,
                  repeats: int = 2, work: Path | None = None) -> dict[str, Any]:
    """Samples/s per size; speed-up and efficiency against the smallest size.

    Args:
        recipe, data, overrides: as for :func:`dist_ft.bench.trainer.bench_trainer`.
        processes: local process counts (ignored when ``nodes`` is given).
        nodes: node counts, each submitted with ``dist-ft submit`` (Slurm, or
            ``--cluster local`` in ``submit_args``); needs ``data`` and ``work`` on a
            filesystem every node sees.
        gpus_per_node: processes per node for ``nodes`` (0: one CPU process per node).
        submit_args: extra ``dist-ft submit`` flags (``--partition``, ``--time`` ...).
        steps, warmup, every, repeats: as for the trainer suite.
        work: where run folders go (a temporary folder if None; give a shared one for Slurm).
    """
    sizes = ([n * max(1, gpus_per_node) for n in nodes] if nodes else list(processes))
    probe, base = prepare_runs(recipe, list(overrides or []), data, steps, every, max(sizes))
    batch = probe.data.batch_size
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in sizes}
    with tempfile.TemporaryDirectory(prefix="dist-ft-bench-scaling-", dir=work) as tmp:
        for i in range(repeats):
            for j, size in enumerate(sizes):
                run_dir = Path(tmp) / f"w{size}-{i}"
                rec, path = bench_recipe(recipe, base, run_dir, steps, every)
                if nodes:
                    run = _submit_run(path, run_dir, nodes[j], gpus_per_node,
                                      list(submit_args or []), warmup, batch)
                else:
                    run = {**run_dist_ft(rec, path, size, warmup), "world_size": size}
                runs[size].append(run)
    smallest = sizes[0]
    rows = []
    for size in sizes:
        rate = statistics.median(r["samples_per_s"] for r in runs[size])
        rows.append({"world_size": size, "samples_per_s": rate,
                     "min": min(r["samples_per_s"] for r in runs[size]),
                     "max": max(r["samples_per_s"] for r in runs[size])})
    base_rate = rows[0]["samples_per_s"]
    for row in rows:
        row["speedup"] = row["samples_per_s"] / base_rate
        row["efficiency"] = row["speedup"] / (row["world_size"] / smallest)
    return {"rows": rows, "runs": {str(k): v for k, v in runs.items()},
            "mode": "submit" if nodes else "local", "nodes": list(nodes),
            "gpus_per_node": gpus_per_node, "model": probe.model.name,
            "backend": probe.trainer.backend, "zero_stage": probe.trainer.zero_stage,
            "batch_per_process": batch, "image_size": probe.data.image_size,
            "steps": steps, "warmup": warmup, "repeats": repeats,
            "device": "cuda" if has_cuda() or gpus_per_node else "cpu"}


def format_table(r: dict[str, Any]) -> str:
    """A markdown table of the figures."""
    backend = backend_label(r["backend"], r.get("zero_stage"))
    where = (f"{', '.join(map(str, r['nodes']))} node(s) x {max(1, r['gpus_per_node'])} via "
             "dist-ft submit" if r["mode"] == "submit" else "local processes")
    lines = [f"scaling: {r['model']} {r['image_size']}px, batch {r['batch_per_process']} per "
             f"process, {backend}, {r['device']}, {where}; steps {r['warmup'] + 1}-{r['steps']}, "
             f"median of {r['repeats']} alternating runs", "",
             "| processes | samples/s (min-max) | speed-up | efficiency |",
             "|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['world_size']} | {row['samples_per_s']:.1f} "
                     f"({row['min']:.1f}-{row['max']:.1f}) | {row['speedup']:.2f}x | "
                     f"{row['efficiency']:.0%} |")
    steal = [x.get("cpu_steal", 0.0) for runs in r["runs"].values() for x in runs]
    if max(steal, default=0.0) > 0.02:
        lines.append(f"\nCPU steal (hypervisor) during the runs: up to {max(steal):.0%} "
                     "(`cpu_steal` per run in the JSON)")
    return "\n".join(lines)
