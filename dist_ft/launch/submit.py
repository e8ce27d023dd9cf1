"""``dist-ft submit``: a recipe (or a sweep of it) as Slurm jobs through submitit.

Scheme: **one task per process**. A job of N nodes with G GPUs each runs ``srun`` with G tasks
per node (one per node on CPU, ``gpus_per_node: 0``); each task is one training rank and
finds its rank, node, head address and port itself (``dist_ft.cluster``). A sweep
is one job array. Everything is validated before anything is submitted: every task's recipe,
every Slurm resource, and every path that reaches an ``#SBATCH`` line.

The submission is recorded in ``ROOT/submission.json`` (ROOT: the recipe's ``output_dir``;
for a sweep, the folder holding one run directory per task); submitit keeps its files and
the per-task logs in ``ROOT/submitit/``.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dist_ft.cluster import rendezvous_port, slurm_process_group_env
from dist_ft.config.errors import ConfigError
from dist_ft.config.load import load_recipe, recipe_to_dict, validate_recipe
from dist_ft.config.schema import LaunchConfig, Recipe, backend_label, slurm_time_seconds
from dist_ft.launch.sweep import Sweep, format_value, load_sweep, safe_name, task_folder
from dist_ft.rundir import RunDir

MANIFEST = "submission.json"
SUBMITIT_DIR = "submitit"
# A path that lands on an #SBATCH line (submitit's --output/--error): Slurm cannot take
# newlines, and whitespace, quotes or '%' (its filename pattern character) would break it.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_.,:@+=/~-]+")
EXAMPLE_JOB_ID = 123456


@dataclass(frozen=True)
class PlannedTask:
    """One run of a submission: name, its own overrides, run directory, resolved recipe."""

    index: int
    name: str
    overrides: tuple[str, ...]
    output_dir: str
    recipe: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class Submission:
    """Everything needed to submit, checked: resources, tasks, where files go."""

    kind: str  # "run" or "sweep"
    root: Path
    config: str
    overrides: tuple[str, ...]
    launch: LaunchConfig
    tasks: tuple[PlannedTask, ...]
    sweep: str | None = None
    parallelism: int | None = None
    notes: tuple[str, ...] = ()  # said before submitting: what a resumed run continues from

    @property
    def processes_per_node(self) -> int:
        """Tasks (= training processes) per node: one per GPU, or one on a CPU node."""
        return max(1, self.launch.gpus_per_node)

    @property
    def world_size(self) -> int:
        """Processes of one run."""
        return self.launch.nodes * self.processes_per_node

    @property
    def job_name(self) -> str:
        """The Slurm job name: the root folder's name, made safe."""
        return safe_name(f"dist-ft-{self.root.name}")


def _flag_name(problem: str, flags: dict[str, Any]) -> str:
    """``launch.partition: ...`` -> ``--partition (launch.partition): ...`` for given flags."""
    for key in flags:
        prefix = f"launch.{key}"
        if problem.startswith(prefix + ":"):
            return f"--{key.replace('_', '-')} ({prefix}){problem[len(prefix):]}"
    return problem


def _check_path(label: str, path: Path) -> None:
    if not _SAFE_PATH.fullmatch(str(path)):
        bad = sorted({c for c in str(path) if not _SAFE_PATH.fullmatch(c)})
        raise ConfigError([
            f"{label}: {str(path)!r} has characters that cannot go on an #SBATCH line "
            f"({' '.join(repr(c) for c in bad)}); use letters, digits and _ . , : @ + = / ~ -"])


def _check_plan(recipe: Recipe) -> None:
    """Resolve the freeze plan against the model's structure (no weights, no torch import
    for shipped models): a rule matching nothing fails here, not on the cluster."""
    from dist_ft.models.spec_cache import fast_model_spec
    from dist_ft.plan import resolve_plan

    resolve_plan(recipe, fast_model_spec(recipe.model))


def check_output_room(recipe: Recipe) -> None:
    """``output_dir`` (or its nearest existing parent) is writable with room for one
    checkpoint: a full or read-only disk fails at submission, not after the queue wait."""
    from dist_ft.models.spec_cache import fast_model_spec
    from dist_ft.train.checkpoint import check_output_dir, checkpoint_bytes

    spec = fast_model_spec(recipe.model)
    check_output_dir(recipe.output_dir, checkpoint_bytes(spec.num_params, recipe.trainer),
                     create=False)


def plan_submission(config: str | Path, overrides: list[str] | tuple[str, ...] = (),
                    launch_flags: dict[str, Any] | None = None, sweep: str | Path | None = None,
                    parallelism: int | None = None, resume: bool = False) -> Submission:
    """Load and check everything a submission needs; nothing is submitted.

    Args:
        config: the recipe file.
        overrides: ``key=value`` overrides for every task.
        launch_flags: ``launch.*`` values from the command line (they win over the recipe).
        sweep: a sweep file; each of its tasks adds its own overrides and run directory.
        parallelism: at most this many array tasks at once (default: the sweep's, else all).
        resume: the task folders may hold runs, which the jobs continue; without it a folder
            holding a run is refused (every job runs with ``--resume auto``).

    Raises:
        ConfigError: every problem found, naming the flag, key or task.
    """
    if parallelism is not None and parallelism < 1:
        raise ConfigError([f"--parallelism {parallelism}: must be 1 or more (at most this many "
                           "array tasks run at once); leave it out to run them all at once"])
    flags = {k: v for k, v in (launch_flags or {}).items() if v is not None}
    flag_overrides = [f"launch.{k}={format_value(v)}" for k, v in flags.items()]
    base_overrides = tuple(overrides)
    try:
        base: Recipe = load_recipe(config, [*base_overrides, *flag_overrides])
    except ConfigError as exc:
        raise ConfigError([_flag_name(p, flags) for p in exc.problems], exc.source) from None
    root = Path(base.output_dir)  # absolute already: load_recipe resolves every path field
    _check_path("output_dir", root)
    launch = base.launch
    if launch.cluster == "local" and launch.gpus_per_node and launch.nodes > 1:
        raise ConfigError(["--cluster local runs on this machine: use --nodes 1"])

    swept: Sweep | None = load_sweep(sweep) if sweep is not None else None
    tasks: list[PlannedTask] = []
    problems: list[str] = []
    if swept is None:
        _check_plan(base)
        tasks.append(PlannedTask(0, safe_name(root.name), (), str(root), recipe_to_dict(base)))
    else:
        for item in swept.tasks:
            out = task_folder(root, item)
            try:
                recipe = load_recipe(config, [*base_overrides, *item.overrides,
                                              *flag_overrides, f"output_dir={out}"])
            except ConfigError as exc:
                problems += [f"sweep task {item.index} ({item.name}): {p}" for p in exc.problems]
                continue
            try:
                _check_plan(recipe)
            except ConfigError as exc:
                problems += [f"sweep task {item.index} ({item.name}): {p}" for p in exc.problems]
            if recipe.launch != launch:
                problems.append(f"sweep task {item.index} ({item.name}): launch.* differs from "
                                "the other tasks; one job array has one set of resources")
            tasks.append(PlannedTask(item.index, item.name, item.overrides, str(out),
                                     recipe_to_dict(recipe)))
        if problems:
            raise ConfigError(problems, str(sweep))
    held = [t.output_dir for t in tasks if RunDir(t.output_dir).holds_run()]
    if held and not resume:
        raise ConfigError([f"output_dir {out} already holds a run: pass --resume to continue "
                           "it (the job resumes from its last checkpoint), or choose another "
                           "output_dir" for out in held])
    per_node = max(1, launch.gpus_per_node)
    notes = tuple(resume_note(task, launch.nodes, per_node) for task in tasks
                  if task.output_dir in held)
    return Submission(
        kind="sweep" if swept else "run", root=root, config=str(Path(config).resolve()),
        overrides=base_overrides, launch=launch, tasks=tuple(tasks),
        sweep=str(Path(sweep).resolve()) if sweep is not None else None,
        parallelism=parallelism or (swept.parallelism if swept else None), notes=notes,
    )


def resume_note(task: PlannedTask, nodes: int, per_node: int) -> str:
    """What a resubmitted task continues: the run, its checkpoint, and where it ran last
    against where it runs now (nodes, world size, global batch).

    Raises:
        ConfigError: the world size changes and the recipe's per-process batch would change
            the global batch (the job's resume would refuse it): names the fix.

    The run folder keeps one run across submissions: ``--resume`` with other ``--nodes``
    continues it on the new world size (every backend's checkpoints load on any number of
    processes; ZeRO's through their ``portable/`` state); each start is a segment of the
    run (``segments.jsonl``, ``dist-ft jobs``).
    """
    run = RunDir(task.output_dir)
    status = run.read_status() or {}
    latest = run.latest_checkpoint()
    world = nodes * per_node
    where = (f"from {latest.name}" if latest is not None
             else "at step 0 (no complete checkpoint yet)")
    note = (f"--resume: {run.root} holds run {status.get('run_id', '?')} "
            f"({status.get('state', 'not started')} at step {status.get('step', '?')}"
            f"/{status.get('total_steps', '?')}); the job continues it {where} on {nodes} "
            f"node(s) x {per_node} = world size {world}")
    segments = run.read_segments()
    if not segments:
        return note
    last = segments[-1]
    before = last.get("world_size")
    if (before, last.get("nodes")) == (world, nodes) or not isinstance(before, int):
        return note
    data, trainer = task.recipe["data"], task.recipe["trainer"]
    note += (f"; it ran last on {last.get('nodes', '?')} node(s), world size {before} "
             f"(segment {last.get('segment', '?')})")
    if data.get("global_batch_size") is not None:
        return note + (f": data.global_batch_size={data['global_batch_size']} keeps the global "
                       "batch (each process takes a different share of it)")
    batch = data["batch_size"] * trainer["grad_accum_steps"]
    # The job's resume would refuse it (the run's contract holds the global batch): say so
    # now, not after the queue.
    raise ConfigError([f"{note}, where data.batch_size={data['batch_size']} per process made "
                       f"{batch * before} images per step and would make {batch * world}: add "
                       f"data.global_batch_size={batch * before} to keep the run's global batch"])


def time_minutes(slurm_time: str) -> int:
    """A Slurm time limit (any of its formats, see :func:`slurm_time_seconds`) -> whole
    minutes (rounded up), as submitit's ``timeout_min`` takes."""
    return math.ceil(slurm_time_seconds(slurm_time) / 60)


def executor_parameters(sub: Submission) -> dict[str, Any]:
    """submitit ``update_parameters`` for this submission (Slurm or local)."""
    launch = sub.launch
    params: dict[str, Any] = {"name": sub.job_name, "timeout_min": time_minutes(launch.time)}
    if launch.cluster == "local":
        # One machine: every process of every "node" runs here.
        params.update(nodes=1, tasks_per_node=sub.world_size)
        return params
    params.update(nodes=launch.nodes, tasks_per_node=sub.processes_per_node,
                  slurm_signal_delay_s=launch.signal_delay_s,
                  slurm_additional_parameters={"requeue": True},
                  # One task failing ends the step at once, not when its peers time out.
                  slurm_srun_args=["--kill-on-bad-exit=1"])
    if launch.gpus_per_node:
        params["gpus_per_node"] = launch.gpus_per_node
    optional = {"cpus_per_task": launch.cpus_per_task, "slurm_partition": launch.partition,
                "slurm_account": launch.account, "slurm_qos": launch.qos,
                "slurm_constraint": launch.constraint, "slurm_mem": launch.mem}
    params.update({k: v for k, v in optional.items() if v is not None})
    if sub.kind == "sweep":
        params["slurm_array_parallelism"] = sub.parallelism or len(sub.tasks)
    return params


def build_executor(sub: Submission) -> Any:
    """The submitit executor for this submission, its folder ``ROOT/submitit``."""
    import submitit

    executor = submitit.AutoExecutor(folder=sub.root / SUBMITIT_DIR, cluster=sub.launch.cluster)
    executor.update_parameters(**executor_parameters(sub))
    return executor


@contextlib.contextmanager
def _render_without_slurm() -> Iterator[None]:
    """Let submitit build its Slurm executor where ``srun`` is not on PATH, to render only.

    submitit refuses the executor outright on a laptop or a login node without Slurm
    (``Could not detect "srun"``), though the script it writes does not depend on Slurm
    being here; a dry run only renders it, and real submission checks for ``sbatch`` first.
    """
    from submitit.slurm.slurm import SlurmExecutor

    if shutil.which("srun") is not None:
        yield
        return
    found = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 2)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SlurmExecutor.affinity = found  # type: ignore[method-assign]


def submitit_sbatch(sub: Submission) -> str:
    """The exact sbatch script submitit would submit for this submission (Slurm only; it
    renders on machines without Slurm too)."""
    with _render_without_slurm():
        executor = build_executor(sub)
    inner = executor._executor  # submitit's own SlurmExecutor renders its own script
    if sub.kind == "sweep":
        inner.parameters["map_count"] = len(sub.tasks)
    try:
        return inner._make_submission_file_text(inner._submitit_command_str, "<uuid>")
    finally:
        inner.parameters.pop("map_count", None)


def plain_sbatch(sub: Submission) -> str:
    """An equivalent sbatch script that calls ``dist-ft train`` directly (no Python submit).

    Every argument is shell-quoted; ranks come from each task's own Slurm variables.
    """
    launch = sub.launch
    lines = ["#!/bin/bash", "# Equivalent of `dist-ft submit` (one task per process); "
             "submit with: sbatch THIS_FILE",
             f"#SBATCH --job-name={sub.job_name}", f"#SBATCH --nodes={launch.nodes}",
             f"#SBATCH --ntasks-per-node={sub.processes_per_node}"]
    if launch.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={launch.gpus_per_node}")
    optional = {"cpus-per-task": launch.cpus_per_task, "partition": launch.partition,
                "account": launch.account, "qos": launch.qos, "constraint": launch.constraint,
                "mem": launch.mem}
    lines += [f"#SBATCH --{k}={shlex.quote(str(v))}" for k, v in optional.items() if v is not None]
    lines += [f"#SBATCH --time={time_minutes(launch.time)}",
              f"#SBATCH --signal=USR2@{launch.signal_delay_s}", "#SBATCH --requeue",
              "#SBATCH --open-mode=append"]  # slurm-JOBID.out in the submit folder
    launch_overrides = [f"launch.{k}={format_value(v)}" for k, v in launch.model_dump().items()
                        if v != LaunchConfig.model_fields[k].default]
    argv = [sys.executable, "-m", "dist_ft", "train", sub.config, *sub.overrides,
            *launch_overrides, "--resume", "auto"]
    if sub.kind == "sweep":
        lines.append(f"#SBATCH --array=0-{len(sub.tasks) - 1}%"
                     f"{sub.parallelism or len(sub.tasks)}")
        argv += ["--sweep", str(sub.sweep)]
    command = " ".join(shlex.quote(a) for a in argv)
    if sub.kind == "sweep":
        command += ' --sweep-index "$SLURM_ARRAY_TASK_ID"'
    lines += ["# srun starts one task per process; each reads its rank from SLURM_PROCID",
              f"srun --kill-on-bad-exit=1 {command}"]
    return "\n".join(lines) + "\n"


def node_layout(sub: Submission, job_id: int = EXAMPLE_JOB_ID) -> list[dict[str, Any]]:
    """What each node's tasks compute for the process group, evaluated with the same code
    the tasks run, on an example allocation (``node[1-N]``, job ``job_id``)."""
    nodes = 1 if sub.launch.cluster == "local" else sub.launch.nodes
    per_node = sub.world_size // nodes
    nodelist = f"node[1-{nodes}]" if nodes > 1 else "node1"
    layout = []
    for node in range(nodes):
        envs = []
        for local in range(per_node):
            rank = node * per_node + local
            envs.append(slurm_process_group_env({
                "SLURM_JOB_ID": str(job_id), "SLURM_PROCID": str(rank),
                "SLURM_LOCALID": str(local), "SLURM_NODEID": str(node),
                "SLURM_STEP_NUM_TASKS": str(sub.world_size),
                "SLURM_STEP_NUM_NODES": str(nodes), "SLURM_STEP_NODELIST": nodelist,
            }))
        layout.append({
            "node": node, "host": f"node{node + 1}",
            "ranks": [int(e["RANK"]) for e in envs],
            "local_ranks": [int(e["LOCAL_RANK"]) for e in envs],
            "node_ranks": sorted({int(e["NODE_RANK"]) for e in envs}),
            "world_sizes": sorted({int(e["WORLD_SIZE"]) for e in envs}),
            "master_addrs": sorted({e["MASTER_ADDR"] for e in envs}),
            "master_ports": sorted({int(e["MASTER_PORT"]) for e in envs}),
        })
    return layout


def dry_run(sub: Submission) -> dict[str, Any]:
    """What would be submitted, as data: scripts, per-node layout, tasks.

    The backend (DDP, DeepSpeed ZeRO-N, FSDP2) is the recipe's: every task is one rank that
    ``dist-ft train`` starts under srun, with no ``accelerate launch`` config in between.
    """
    trainer = sub.tasks[0].recipe["trainer"]
    # zero_stage only where it means something: an FSDP2 or DDP run has none.
    stage = trainer["zero_stage"] if trainer["backend"] == "deepspeed" else None
    labels = [backend_label(t.recipe["trainer"]["backend"], t.recipe["trainer"]["zero_stage"])
              for t in sub.tasks]  # a sweep may compare backends
    doc: dict[str, Any] = {
        "kind": sub.kind, "cluster": sub.launch.cluster, "root": str(sub.root),
        "nodes": sub.launch.nodes, "processes_per_node": sub.processes_per_node,
        "world_size": sub.world_size, "backend": trainer["backend"], "zero_stage": stage,
        "backend_label": " | ".join(dict.fromkeys(labels)),
        "executor_parameters": executor_parameters(sub),
        "tasks": [{"index": t.index, "name": t.name, "overrides": list(t.overrides),
                   "output_dir": t.output_dir, "backend_label": label}
                  for t, label in zip(sub.tasks, labels, strict=True)],
        "example_job_id": EXAMPLE_JOB_ID,
        "rendezvous": {"master_addr": "first host of the step's node list",
                       "master_port": f"10000 + SLURM_JOB_ID % 20000 "
                                      f"(job {EXAMPLE_JOB_ID}: "
                                      f"{rendezvous_port(EXAMPLE_JOB_ID)})"},
        "node_layout": node_layout(sub),
        "notes": list(sub.notes),
    }
    if sub.launch.cluster == "slurm":
        doc["sbatch"] = submitit_sbatch(sub)
        doc["plain_sbatch"] = plain_sbatch(sub)
    return doc


AGGREGATE_DIR = "aggregate"


def sweep_group_keys(sub: Submission) -> list[str]:
    """What a sweep's aggregation groups by: its swept keys, seeds excepted (seeds are what
    a group averages over); ``all`` when only seeds vary."""
    keys: list[str] = []
    for task in sub.tasks:
        for override in task.overrides:
            key = override.partition("=")[0]
            if "seed" not in key and key not in keys:
                keys.append(key)
    return keys or ["all"]


def aggregation_task(sub: Submission) -> Any:
    """The sweep's aggregation: its run folders (not ROOT, so that ``ROOT/aggregate`` lies
    beside them, never inside an input), grouped by the swept keys."""
    from dist_ft.launch.task import AggregateTask

    runs = tuple(str(task.output_dir) for task in sub.tasks)
    return AggregateTask(runs, str(sub.root / AGGREGATE_DIR), tuple(sweep_group_keys(sub)))


def _submit_aggregation(sub: Submission, after: str) -> Any:
    """A small job that aggregates the sweep's logs once every array task has ended."""
    import submitit

    launch = sub.launch
    executor = submitit.AutoExecutor(folder=sub.root / SUBMITIT_DIR, cluster="slurm")
    params: dict[str, Any] = {"name": f"{sub.job_name}-aggregate", "nodes": 1,
                              "tasks_per_node": 1, "timeout_min": 60,
                              "slurm_additional_parameters": {"dependency": f"afterany:{after}"}}
    optional = {"slurm_partition": launch.partition, "slurm_account": launch.account,
                "slurm_qos": launch.qos}
    params.update({k: v for k, v in optional.items() if v is not None})
    executor.update_parameters(**params)
    return executor.submit(aggregation_task(sub))


def read_earlier_manifest(root: Path) -> dict[str, Any] | None:
    """The submission ``root`` already records (a resubmission replaces it), or None."""
    try:
        earlier = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return earlier if isinstance(earlier, dict) else None


def submit(sub: Submission) -> tuple[dict[str, Any], list[Any]]:
    """Submit through submitit; write and return the manifest, with the job objects.

    A sweep on Slurm also gets an aggregation job that starts when the array has ended
    (``afterany``) and writes ``ROOT/aggregate/``; the last job object is that one.
    """
    from dist_ft.launch.task import TrainTask

    if sub.launch.cluster == "slurm" and shutil.which("sbatch") is None:
        raise RuntimeError("sbatch is not on PATH: this machine cannot submit to Slurm. Use "
                           "--cluster local to run here, --dry-run to see the job, or start "
                           "slurm/dev-cluster/start.sh DIR and `source DIR/env.sh`")
    for task in sub.tasks:
        check_output_room(validate_recipe(task.recipe))
    sub.root.mkdir(parents=True, exist_ok=True, mode=0o755)
    executor = build_executor(sub)
    callables = [TrainTask(t.recipe, t.name) for t in sub.tasks]
    if sub.kind == "sweep":
        with executor.batch():
            jobs = [executor.submit(c) for c in callables]
    else:
        jobs = [executor.submit(callables[0])]
    earlier = read_earlier_manifest(sub.root)
    manifest = {
        "kind": sub.kind, "cluster": sub.launch.cluster, "config": sub.config,
        "overrides": list(sub.overrides), "sweep": sub.sweep, "submitted": time.time(),
        "folder": str(sub.root / SUBMITIT_DIR), "launch": sub.launch.model_dump(),
        "job_id": str(jobs[0].job_id).split("_")[0], "parallelism": sub.parallelism,
        "tasks": [{**{k: v for k, v in asdict(t).items() if k != "recipe"},
                   "overrides": list(t.overrides), "job_id": str(j.job_id)}
                  for t, j in zip(sub.tasks, jobs, strict=True)],
    }
    if sub.notes:
        manifest["notes"] = list(sub.notes)
    if earlier is not None:  # a resubmission (--resume): keep the chain of submissions
        manifest["previous"] = [*earlier.get("previous", []), {
            k: earlier.get(k) for k in ("job_id", "submitted", "launch")}]
    if sub.kind == "sweep":
        manifest["aggregate"] = {"out": str(sub.root / AGGREGATE_DIR),
                                 "group_by": sweep_group_keys(sub), "job_id": None}
        if sub.launch.cluster == "slurm":
            agg_job = _submit_aggregation(sub, manifest["job_id"])
            manifest["aggregate"]["job_id"] = str(agg_job.job_id)
            jobs.append(agg_job)
    tmp = sub.root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(sub.root / MANIFEST)
    return manifest, jobs


FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE", "UNKNOWN")


def wait_for(jobs: list[Any], poll_s: float = 3.0, settle_s: float = 120.0,
             ) -> list[dict[str, Any]]:
    """Block until every job is done; one outcome per job (result or error text).

    On Slurm it also waits (up to ``settle_s``) for the job to leave RUNNING/COMPLETING, so
    that when this returns the scheduler agrees the job is over.
    """
    outcomes = []
    for job in jobs:
        while not job.done(force_check=True):
            time.sleep(poll_s)
        try:
            outcome = {"job_id": str(job.job_id), "ok": True, "result": job.results()[0]}
        except Exception as exc:  # submitit re-raises the task's failure, whatever it was
            text = str(exc).strip()
            outcome = {"job_id": str(job.job_id), "ok": False,
                       "error": text.splitlines()[-1] if text else type(exc).__name__}
        deadline = time.monotonic() + settle_s
        while hasattr(job, "get_info") and job.__class__.__name__ == "SlurmJob":
            state = str(job.get_info(mode="force").get("State", "UNKNOWN")).split()[0]
            if state in FINAL_STATES or time.monotonic() > deadline:
                outcome["state"] = state
                break
            time.sleep(1.0)
        outcomes.append(outcome)
    return outcomes
