"""Slurm facts as dist-ft uses them: the process-group environment of an ``srun`` task, the
rendezvous port of a job, and whether (and how) a job may requeue itself.

The launch scheme (see README, "SLURM"): **one task per process**. ``srun`` starts
``nodes x processes_per_node`` tasks; each task reads its own global rank from
``SLURM_PROCID``, its local rank from ``SLURM_LOCALID`` and its node from ``SLURM_NODEID``,
inside its own process, so no rank is ever expanded once on the head node and copied to the
others. Every task computes the same head address (the first host of the step's node list)
and the same port (a function of the job id).

Pure functions of an environment mapping: no torch, no subprocess, testable anywhere.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

PORT_BASE = 10_000
PORT_SPAN = 20_000  # 10000-29999: below Linux's ephemeral range (32768+), away from 29500 clashes


def rendezvous_port(job_id: str | int) -> int:
    """The ``MASTER_PORT`` of a Slurm job: the same on every node, distinct for nearby jobs.

    Array tasks each have their own ``SLURM_JOB_ID``, so tasks sharing a node do not collide.

    >>> rendezvous_port(123456)
    23456
    """
    return PORT_BASE + int(job_id) % PORT_SPAN


def expand_nodelist(nodelist: str) -> list[str]:
    """``gpu[001-003],cpu7`` -> ``['gpu001', 'gpu002', 'gpu003', 'cpu7']`` (Slurm's syntax)."""
    from submitit.slurm.slurm import _parse_node_list  # submitit's parser, as submitit uses it

    return list(_parse_node_list(nodelist))


def in_srun_step(env: Mapping[str, str]) -> bool:
    """Whether this process is a task of an ``srun`` step (not the batch script itself).

    The batch shell of an sbatch job also has ``SLURM_PROCID=0``; only step tasks carry
    ``SLURM_STEP_NUM_TASKS``.
    """
    return "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env and "SLURM_JOB_ID" in env


def slurm_process_group_env(env: Mapping[str, str]) -> dict[str, str] | None:
    """The torch.distributed variables of an ``srun`` task, or None outside one.

    ``MASTER_PORT`` already in the environment wins (a user's choice); otherwise it comes from
    the job id.
    """
    if not in_srun_step(env):
        return None
    world = int(env["SLURM_STEP_NUM_TASKS"])
    nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_JOB_NUM_NODES", "1")))
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "localhost")
    return {
        "RANK": env["SLURM_PROCID"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "NODE_RANK": env.get("SLURM_NODEID", "0"),
        "WORLD_SIZE": str(world),
        "LOCAL_WORLD_SIZE": str(max(1, world // max(1, nodes))),
        "MASTER_ADDR": expand_nodelist(nodelist)[0],
        "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port(env["SLURM_JOB_ID"])),
    }


def restart_count(env: Mapping[str, str]) -> int:
    """How many times Slurm has restarted this job (``SLURM_RESTART_COUNT``, 0 at first)."""
    return int(env.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue_command(env: Mapping[str, str], max_requeues: int) -> tuple[list[str] | None, str]:
    """The command that requeues this job, or None with the reason it must not.

    Returns:
        ``(argv, reason)``: ``argv`` is ``["scontrol", "requeue", JOB_ID]`` when this is a
        Slurm job (not submitit's local executor) that has been restarted fewer than
        ``max_requeues`` times; otherwise None and a sentence saying why.
    """
    if "SLURM_JOB_ID" not in env or env.get("SUBMITIT_EXECUTOR") == "local":
        return None, "not a Slurm job"
    done = restart_count(env)
    if done >= max_requeues:
        return None, (f"requeue limit reached ({done} of launch.max_requeues={max_requeues}); "
                      "resubmit to continue from the checkpoint")
    return ["scontrol", "requeue", env["SLURM_JOB_ID"]], f"requeue {done + 1} of {max_requeues}"


def forbid_world_writable() -> None:
    """Clear the "others may write" bit of this process's umask (group bits are left as set).

    Everything dist-ft creates (run folders, checkpoints, logs, job scripts) is then never
    world-writable, even under ``umask 000``; called first by the CLI and by submitted tasks.
    """
    os.umask(os.umask(0o022) | 0o002)
