"""``dist-ft submit``: run a recipe (or a sweep) on Slurm nodes, or locally, via submitit."""

from __future__ import annotations

import argparse
import sys
from typing import Any

EXAMPLES = """\
examples:
  dist-ft submit configs/chestxray14_densenet121.yaml --nodes 4 --gpus-per-node 8 \\
      --partition gpu --time 12:00:00 trainer.zero_stage=3 --dry-run
  dist-ft submit configs/chestxray14_smoke.yaml --nodes 2 --gpus-per-node 0 --wait
  dist-ft submit configs/chestxray14_smoke.yaml --cluster local        # this machine
  dist-ft submit configs/chestxray14_smoke.yaml \\
      --sweep configs/sweeps/smoke_lr_plan_seed.yaml --parallelism 2
  dist-ft submit chestxray14_smoke --sweep smoke_lr_plan_seed --dry-run  # shipped names
  dist-ft jobs runs/chestxray14_smoke                                  # states and results

One task per process: G tasks per node (one per GPU; one per node with --gpus-per-node 0),
each reading its rank from Slurm. SIGUSR2 (--signal USR2@launch.signal_delay_s before the time
limit, or preemption) makes every rank checkpoint and the job requeue itself, up to
launch.max_requeues times; the requeued job resumes into the same run directory.
"""

# flag -> launch.* key; every flag overrides the recipe's launch section
LAUNCH_FLAGS = ("nodes", "gpus_per_node", "cpus_per_task", "partition", "time", "account", "qos",
                "constraint", "mem", "cluster", "max_requeues")


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``submit``."""
    p = sub.add_parser(
        "submit", help="submit a recipe or a sweep to Slurm (or run it locally) via submitit",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Validate everything, then submit one job (or one job array for --sweep). "
        "Writes OUTPUT_DIR/submission.json; logs in OUTPUT_DIR/submitit/.",
    )
    p.add_argument("config", metavar="RECIPE",
                   help="recipe YAML file, or a shipped recipe's name (dist-ft recipes list)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="recipe overrides, e.g. optim.lr=1e-3")
    p.add_argument("--nodes", type=int, help="nodes per run (launch.nodes)")
    p.add_argument("--gpus-per-node", type=int,
                   help="GPUs = processes per node; 0 for one CPU process per node")
    p.add_argument("--cpus-per-task", type=int, help="CPU cores per process")
    p.add_argument("--partition", help="Slurm partition (sbatch --partition)")
    p.add_argument("--time", help="time limit in a Slurm format: MM, MM:SS, HH:MM:SS, D-HH, "
                   "D-HH:MM or D-HH:MM:SS")
    p.add_argument("--account", help="Slurm account to charge (sbatch --account)")
    p.add_argument("--qos", help="Slurm quality of service (sbatch --qos)")
    p.add_argument("--constraint", help="Slurm node features, e.g. a100 (sbatch --constraint)")
    p.add_argument("--mem", help="memory per node, e.g. 64G")
    p.add_argument("--cluster", choices=("slurm", "local"),
                   help="slurm (default) or local: the same job on this machine through "
                   "submitit's local executor (always waits)")
    p.add_argument("--max-requeues", type=int, help="self-requeues allowed after SIGUSR2")
    p.add_argument("--sweep", metavar="SWEEP", help="a sweep file or a shipped sweep's name: "
                   "a grid and/or runs of overrides; one job array, one run directory per task")
    p.add_argument("--parallelism", type=int, help="at most this many array tasks at once")
    p.add_argument("--resume", action="store_true",
                   help="continue the runs already in the task folders (`--resume` or "
                   "`--resume auto`: each job resumes from its last checkpoint, also on "
                   "other --nodes); without it a folder holding a run is refused")
    p.add_argument("--dry-run", action="store_true",
                   help="print the sbatch script and each node's processes; submit nothing")
    p.add_argument("--wait", action="store_true", help="wait for the jobs and print results")
    p.add_argument("--json", action="store_true", help="print one JSON document to stdout")
    p.set_defaults(run=run)


def _print_dry_run(doc: dict[str, Any]) -> None:
    print(f"# {doc['kind']} on {doc['cluster']}: {doc['nodes']} node(s) x "
          f"{doc['processes_per_node']} process(es) = world size {doc['world_size']}, "
          f"{doc['backend_label']}")
    for task in doc["tasks"]:
        print(f"# task {task['index']} {task['name']}: {task['output_dir']} "
              f"{' '.join(task['overrides'])}")
    for note in doc.get("notes", []):
        print(f"# note: {note}")
    if "sbatch" in doc:
        print("\n# ---- sbatch script (as submitit writes it) ----")
        print(doc["sbatch"])
    rdzv = doc["rendezvous"]
    print(f"# ---- processes per node (example allocation node[1-{doc['nodes']}], job "
          f"{doc['example_job_id']}); head: {rdzv['master_addr']}; port: {rdzv['master_port']}")
    for node in doc["node_layout"]:
        print(f"node {node['node']} ({node['host']}): NODE_RANK={node['node_ranks'][0]} "
              f"RANK={node['ranks'][0]}..{node['ranks'][-1]} LOCAL_RANK="
              f"{node['local_ranks'][0]}..{node['local_ranks'][-1]} "
              f"WORLD_SIZE={node['world_sizes'][0]} MASTER_ADDR={node['master_addrs'][0]} "
              f"MASTER_PORT={node['master_ports'][0]}")
    if "plain_sbatch" in doc:
        print("\n# ---- equivalent plain sbatch script (no Python submission) ----")
        print(doc["plain_sbatch"])


def run(args: argparse.Namespace) -> int:
    """Plan (validate), then dry-run, or submit and optionally wait."""
    from dist_ft.config.shipped import resolve_recipe, resolve_sweep
    from dist_ft.jsonio import dumps
    from dist_ft.launch.submit import dry_run, plan_submission, submit, wait_for

    flags = {k: getattr(args, k) for k in LAUNCH_FLAGS}
    # Shipped names become their files here: the jobs run `dist-ft train PATH` elsewhere.
    sweep = resolve_sweep(args.sweep) if args.sweep is not None else None
    # `--resume auto`, as `dist-ft train` spells it: the word lands among the overrides.
    overrides = [o for o in args.overrides if not (args.resume and o == "auto")]
    sub = plan_submission(resolve_recipe(args.config), overrides, flags, sweep,
                          args.parallelism, resume=args.resume)
    if args.dry_run:
        doc = dry_run(sub)
        if args.json:
            print(dumps(doc))
        else:
            _print_dry_run(doc)
        return 0
    log = sys.stderr if args.json else sys.stdout
    for note in sub.notes:
        print(f"note: {note}", file=log, flush=True)
    manifest, jobs = submit(sub)
    tasks = manifest["tasks"]
    print(f"submitted {manifest['kind']} as job {manifest['job_id']} on {manifest['cluster']} "
          f"({len(tasks)} task(s)); logs in {manifest['folder']}; "
          f"status: dist-ft jobs {sub.root}", file=log, flush=True)
    aggregation = manifest.get("aggregate")
    if aggregation and aggregation["job_id"]:
        print(f"aggregation job {aggregation['job_id']} runs when the array has ended: "
              f"{aggregation['out']} (grouped by {', '.join(aggregation['group_by'])})",
              file=log, flush=True)
    code = 0
    if args.wait or sub.launch.cluster == "local":
        outcomes = wait_for(jobs)
        manifest["outcomes"] = outcomes[:len(tasks)]
        for task, outcome in zip(tasks, outcomes, strict=False):
            if outcome["ok"]:
                score = outcome["result"].get("score")
                print(f"  {task['name']}: done, step {outcome['result'].get('step')}, "
                      f"score {score:.4f}, weights {outcome['result'].get('weights')}", file=log)
            else:
                code = 1
                print(f"  {task['name']}: FAILED: {outcome['error']} (log: "
                      f"{manifest['folder']}/{task['job_id']}_0_log.err)", file=log)
        if aggregation:
            if aggregation["job_id"]:
                aggregation["outcome"] = outcomes[-1]
            else:  # local: this process aggregates
                from dist_ft.launch.submit import aggregation_task

                doc = aggregation_task(sub)()
                aggregation["outcome"] = {"ok": True, "result": {"rows": doc["rows"]}}
            ok = aggregation["outcome"]["ok"]
            code = code or (0 if ok else 1)
            said = f"written to {aggregation['out']}" if ok \
                else f"FAILED: {aggregation['outcome']['error']}"
            print(f"  aggregate: {said}", file=log)
    if args.json:
        print(dumps(manifest))
    return code
