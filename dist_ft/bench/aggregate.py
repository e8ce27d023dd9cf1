"""``dist-ft bench aggregate``: the command as users run it, next to tbparse and EventAccumulator.

The data: ``runs`` run folders x ``tags`` tags x ``steps`` steps, one ``add_scalar`` call of
torch's ``SummaryWriter`` per point, as a training loop writes them; made once into a data folder
and reused while its manifest records the same shape. Each repeat then runs, in this order and
each in a fresh process, on the same files:

- ``dist-ft aggregate DATA --out OUT`` with its default outputs (a new OUT every time);
- a tbparse script: ``SummaryReader(DATA, extra_columns={"dir_name"}).scalars``, nothing else;
- a TensorBoard script: ``EventAccumulator(folder, size_guidance={"scalars": 0}).Reload()`` per
  run folder, then every tag's ``Scalars``.

Wall time is the whole process, interpreter start-up and imports included. Peak RSS is the
kernel's ``ru_maxrss`` of the process (from ``wait4``: its largest process, waited-for children
included), and the RSS summed over its process tree, sampled, for readers with worker processes.
The baselines import nothing of dist-ft; each prints its point count, which must equal dist-ft's
``points_read``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from dist_ft.bench.suites import AGGREGATE_RUNS, AGGREGATE_STEPS, AGGREGATE_TAGS

log = logging.getLogger(__name__)
MANIFEST = "bench_aggregate.json"
WRITER = "torch.utils.tensorboard.SummaryWriter"
SAMPLE_S = 0.1  # process-tree RSS sampling period
# Below this many points the files are written in this process: each worker's torch import
# (seconds) would cost more than the parallel writing saves.
POOL_FROM = 200_000
MISSING_TBPARSE = "not installed: pip install -e '.[bench]' (or pip install tbparse)"

# The baselines, written as a user would: no dist_ft import, the data folder as argv[1], and
# the point count printed last so that the bench can check that all three read the same.
TBPARSE_SCRIPT = """\
import sys
from tbparse import SummaryReader
df = SummaryReader(sys.argv[1], extra_columns={"dir_name"}).scalars
print(len(df))
"""
EVENT_ACCUMULATOR_SCRIPT = """\
import sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
points = 0
for folder in sorted({p.parent for p in Path(sys.argv[1]).rglob("*tfevents*")}):
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    accumulator.Reload()
    for tag in accumulator.Tags()["scalars"]:
        points += len(accumulator.Scalars(tag))
print(points)
"""
# Runs the command given after the report path and writes its wall time and peak RSS there.
# A small process of its own: a child's ru_maxrss counts the memory of the process that
# started it (vfork/exec keeps the high-water mark), so the bench itself (torch imported to
# write the data) must not be that process; the wrapper's own few MiB are the floor.
WRAPPER = """\
import json, os, subprocess, sys, time
started = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not RUSAGE_CHILDREN's sum
seconds = time.perf_counter() - started
child.returncode = code = os.waitstatus_to_exitcode(status)
with open(sys.argv[1], "w") as report:
    json.dump({"seconds": seconds, "code": code, "maxrss": usage.ru_maxrss}, report)
"""
LABELS = {
    "dist_ft": "`dist-ft aggregate DATA --out OUT{args}`{note}",
    "tbparse": 'tbparse{v}: `SummaryReader(DATA, extra_columns={{"dir_name"}}).scalars`',
    "event_accumulator": "TensorBoard{v} `EventAccumulator`: `Reload()` per run folder, "
                         "`Scalars(tag)` per tag",
}


def _write_run(folder: str, tags: int, steps: int, seed: tuple[int, int]) -> None:
    """One run folder: an ``add_scalar`` call per point, step by step, as training logs."""
    from torch.utils.tensorboard import SummaryWriter

    values = np.random.default_rng(seed).normal(size=(steps, tags)).astype(np.float32).tolist()
    names = [f"train/metric_{k}" for k in range(tags)]
    writer = SummaryWriter(folder)
    try:
        for step, row in enumerate(values):
            for name, value in zip(names, row, strict=True):
                writer.add_scalar(name, value, step)
    finally:
        writer.close()


def make_event_files(root: Path, runs: int = AGGREGATE_RUNS, tags: int = AGGREGATE_TAGS,
                     steps: int = AGGREGATE_STEPS, seed: int = 0,
                     workers: int | None = None) -> int:
    """Write ``root/run{i}/`` (``i`` zero-padded) with torch's SummaryWriter: ``tags`` scalars
    ``train/metric_{k}`` at each of ``steps`` steps; returns the point count. Large data is
    written by ``workers`` processes (default: one per CPU), one run folder each."""
    width = len(str(runs - 1))
    jobs = [(str(root / f"run{i:0{width}d}"), tags, steps, (seed, i)) for i in range(runs)]
    workers = min(runs, workers or os.cpu_count() or 1)
    if workers == 1 or runs * tags * steps < POOL_FROM:
        for job in jobs:
            _write_run(*job)
    else:  # spawn: a fresh interpreter, whatever the parent has imported or started
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_write_run, *zip(*jobs, strict=True)))
    return runs * tags * steps


def prepare_data(data: Path, runs: int, tags: int, steps: int) -> dict[str, Any]:
    """The event files in ``data``: reused when its manifest records this shape, else made.
    A folder that holds anything but this bench's data is refused, never written into."""
    shape = {"runs": runs, "tags": tags, "steps": steps, "seed": 0, "writer": WRITER}
    path = data / MANIFEST
    if path.is_file():
        try:
            old = json.loads(path.read_text())
            files = [data / f for f in old["files"]]
            folders = list(old["folders"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a bench manifest ({exc}); delete it or choose "
                             "another --data") from exc
        if {k: old.get(k) for k in shape} == shape and files and all(
                f.is_file() for f in files):
            return old
        # Another shape (or files gone): remove that bench's run folders, and only those.
        for name in folders:
            if isinstance(name, str) and re.fullmatch(r"run\d+", name):
                shutil.rmtree(data / name, ignore_errors=True)
        path.unlink()
    if data.exists() and (not data.is_dir() or any(data.iterdir())):
        raise ValueError(f"--data {data}: holds files but no {MANIFEST}; the bench makes its "
                         "event files in an empty or new folder")
    data.mkdir(parents=True, exist_ok=True)
    log.info("writing %s points with %s into %s (once: reused while the shape is the same)",
             f"{runs * tags * steps:,}", WRITER, data)
    started = time.perf_counter()
    make_event_files(data, runs, tags, steps)
    events = sorted(p for p in data.rglob("*tfevents*") if p.is_file())
    manifest = {
        **shape, "points": runs * tags * steps,
        "folders": sorted({p.parent.name for p in events}),
        "files": [str(p.relative_to(data)) for p in events],
        "bytes": sum(p.stat().st_size for p in events),
        "made_s": round(time.perf_counter() - started, 1),
    }
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def measure(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run ``cmd`` as a fresh process under :data:`WRAPPER`, its output in ``log`` (.out/.err):
    wall seconds, exit code, stdout, stderr, peak RSS of its largest process (``ru_maxrss``)
    and of its whole process tree (summed, sampled every ``SAMPLE_S``; at least the former)."""
    import psutil

    tree_peak = 0
    done = threading.Event()

    def sample(wrapper: int) -> None:
        nonlocal tree_peak
        try:
            parent = psutil.Process(wrapper)
            while not done.is_set():
                total = 0
                for proc in parent.children(recursive=True):  # the command and its workers
                    # ended (or a zombie) between listing and reading: nothing to add
                    with contextlib.suppress(psutil.Error):
                        total += proc.memory_info().rss
                tree_peak = max(tree_peak, total)
                done.wait(SAMPLE_S)
        except psutil.Error:  # the wrapper has ended
            return

    out_path, err_path = log.with_suffix(".out"), log.with_suffix(".err")
    report = log.with_suffix(".json")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, str(report), *cmd],
                                   stdout=out, stderr=err)
        sampler = threading.Thread(target=sample, args=(wrapper.pid,), daemon=True)
        sampler.start()
        wrapper.wait()
        done.set()
        sampler.join()
    stderr = err_path.read_text(errors="replace")
    if not report.is_file():
        raise RuntimeError(f"the timing wrapper of {cmd[:3]} exited {wrapper.returncode} "
                           f"without a report: {stderr[-1500:].strip()}")
    timed = json.loads(report.read_text())
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak = timed["maxrss"] * unit
    return {"seconds": timed["seconds"], "code": timed["code"], "stdout": out_path.read_text(),
            "stderr": stderr, "peak_rss_mib": peak / 2**20,
            "tree_rss_mib": max(tree_peak, peak) / 2**20}


def _dist_ft_points(out: Path, stdout: str) -> int | None:
    """``points_read`` from OUT/summary.json, else from the command's summary line."""
    try:
        return int(json.loads((out / "summary.json").read_text())["points_read"])
    except (OSError, ValueError, KeyError, TypeError):
        found = re.search(r"([\d,]+) points from", stdout)
        return int(found.group(1).replace(",", "")) if found else None


def _last_int(stdout: str) -> int | None:
    lines = stdout.strip().splitlines()
    return int(lines[-1]) if lines and lines[-1].strip().isdigit() else None


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def bench_aggregate(data: Path, runs: int = AGGREGATE_RUNS, tags: int = AGGREGATE_TAGS,
                    steps: int = AGGREGATE_STEPS, repeats: int = 3,
                    aggregate_args: Sequence[str] = (), work: Path | None = None
                    ) -> dict[str, Any]:
    """Make (or reuse) the event files in ``data``, then time ``dist-ft aggregate`` (with
    ``aggregate_args``), tbparse and EventAccumulator, alternating, each in a fresh process;
    each dist-ft output goes to a new folder under ``work`` (default: a temporary folder)."""
    if min(runs, tags, steps, repeats) < 1:
        raise ValueError("--runs, --tags, --steps and --repeats must each be at least 1")
    data = data.resolve()
    if work is not None:
        work = work.resolve()
        if work == data or data in work.parents:
            raise ValueError(f"--work {work}: lies in --data {data}, which dist-ft aggregate "
                             "refuses as its output place")
        work.mkdir(parents=True, exist_ok=True)
    manifest = prepare_data(data, runs, tags, steps)
    expected = manifest["points"]
    versions = {name: _version(name) for name in ("dist-ft", "tbparse", "tensorboard", "torch")}
    versions["python"] = sys.version.split()[0]
    python = [sys.executable]
    commands: dict[str, Callable[[Path], list[str]]] = {
        "dist_ft": lambda out: [*python, "-m", "dist_ft", "aggregate", str(data), "--out",
                                str(out), *aggregate_args],
        "tbparse": lambda out: [*python, "-c", TBPARSE_SCRIPT, str(data)],
        "event_accumulator": lambda out: [*python, "-c", EVENT_ACCUMULATOR_SCRIPT, str(data)],
    }
    skipped = {} if find_spec("tbparse") else {"tbparse": MISSING_TBPARSE}
    runs_of: dict[str, list[dict[str, Any]]] = {name: [] for name in commands if
                                                 name not in skipped}
    with tempfile.TemporaryDirectory(prefix="dist-ft-bench-aggregate-", dir=work) as scratch:
        for repeat in range(repeats):
            for name, done in runs_of.items():  # alternating: one of each per repeat
                out = Path(scratch) / f"{name}-{repeat}"
                cmd = commands[name](out)
                result = measure(cmd, Path(scratch) / f"{name}-{repeat}.log")
                if result["code"] != 0:
                    shown = (f"dist-ft aggregate {' '.join(cmd[4:])}" if name == "dist_ft"
                             else f"the {name} script on {data}")
                    raise RuntimeError(f"{shown} exited {result['code']}: "
                                       f"{result['stderr'][-1500:].strip()}")
                result["points"] = (_dist_ft_points(out, result["stdout"]) if name == "dist_ft"
                                    else _last_int(result["stdout"]))
                shutil.rmtree(out, ignore_errors=True)  # a 12,000,000-row CSV: not kept
                log.info("repeat %d/%d: %s %.2f s, %s points, peak RSS %.0f MiB", repeat + 1,
                         repeats, name, result["seconds"], result["points"],
                         result["peak_rss_mib"])
                done.append(result)
    ours = [r["seconds"] for r in runs_of["dist_ft"]]
    readers: dict[str, Any] = {}
    for name, done in runs_of.items():
        seconds = [r["seconds"] for r in done]
        readers[name] = {
            "seconds": _spread(seconds), "seconds_each": seconds,
            "points": [r["points"] for r in done],
            "peak_rss_mib": max(r["peak_rss_mib"] for r in done),
            "tree_rss_mib": max(r["tree_rss_mib"] for r in done),
            # > 1: dist-ft is that many times faster (median against median; and per repeat).
            "ratio": statistics.median(seconds) / statistics.median(ours),
            "ratio_range": [min(t / o for t, o in zip(seconds, ours, strict=True)),
                            max(t / o for t, o in zip(seconds, ours, strict=True))],
        }
    readers.update({name: {"skipped": why} for name, why in skipped.items()})
    counts = {p for r in readers.values() for p in r.get("points", [])}
    return {
        "points": expected, "runs": runs, "tags": tags, "steps": steps, "repeats": repeats,
        "data": str(data), "writer": WRITER, "files_mib": round(manifest["bytes"] / 2**20, 1),
        "aggregate_args": list(aggregate_args), "points_agree": counts == {expected},
        "rss_sample_s": SAMPLE_S, "versions": versions,
        "scripts": {"tbparse": TBPARSE_SCRIPT, "event_accumulator": EVENT_ACCUMULATOR_SCRIPT},
        "readers": readers,
    }


def _faster(ratio: float) -> str:
    return f"{ratio:.1f}x faster than" if ratio >= 1 else f"{1 / ratio:.1f}x slower than"


def format_table(result: dict[str, Any]) -> str:
    """The result as a markdown table, with the conditions above and the notes below it."""
    readers, versions = result["readers"], result["versions"]
    args = "".join(f" {shlex.quote(a)}" for a in result["aggregate_args"])
    labels = {
        "dist_ft": LABELS["dist_ft"].format(args=args,
                                            note="" if args else " (default outputs)"),
        "tbparse": LABELS["tbparse"].format(v=f" {versions['tbparse']}"
                                            if versions["tbparse"] else ""),
        "event_accumulator": LABELS["event_accumulator"].format(
            v=f" {versions['tensorboard']}" if versions["tensorboard"] else ""),
    }
    lines = [
        f"{result['points']:,} scalar points: {result['runs']} run folders x {result['tags']} "
        f"tags x {result['steps']:,} steps, written by torch's SummaryWriter "
        f"({result['files_mib']} MiB of event files)",
        f"{result['repeats']} repeat(s), alternating, each command a fresh process (wall time "
        "with start-up)", "",
        "| command | seconds: median (min-max) | its time / dist-ft's | points read | "
        "peak RSS MiB | tree RSS MiB |", "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in labels.items():
        r = readers[name]
        if "skipped" in r:
            lines.append(f"| {label} | skipped: {r['skipped']} | | | | |")
            continue
        s, (lo, hi) = r["seconds"], r["ratio_range"]
        ratio = "1" if name == "dist_ft" else f"{r['ratio']:.1f}x ({lo:.1f}-{hi:.1f})"
        points = ", ".join(f"{p:,}" if p is not None else "?" for p in sorted(
            set(r["points"]), key=lambda p: -1 if p is None else p))
        lines.append(f"| {label} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) | "
                     f"{ratio} | {points} | {r['peak_rss_mib']:,.0f} | "
                     f"{r['tree_rss_mib']:,.0f} |")
    lines.append("")
    versus = [f"{_faster(readers[n]['ratio'])} {short}" for n, short in
              (("tbparse", "tbparse"), ("event_accumulator", "EventAccumulator"))
              if "ratio" in readers[n]]
    if versus:
        lines.append(f"**dist-ft aggregate is {' and '.join(versus)}** (median times).")
    if result["points_agree"]:
        lines.append(f"Every run of every command read the same {result['points']:,} points.")
    else:
        lines.append(f"**The point counts differ** (expected {result['points']:,}): the "
                     "commands did not read the same data; the times are not comparable.")
    lines.append(f"Peak RSS: the largest process (ru_maxrss); tree RSS: the process and its "
                 f"children summed, sampled every {result['rss_sample_s']} s; the highest of "
                 "the repeats. The tbparse script builds the DataFrame and prints its length, "
                 "nothing else; the EventAccumulator one counts every tag's Scalars.")
    return "\n".join(lines)
