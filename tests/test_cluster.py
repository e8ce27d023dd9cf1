"""Slurm environment: ranks from each task's own variables, one head, one port, requeue rules."""

from __future__ import annotations

import pytest

from dist_ft.cluster import (
    expand_nodelist,
    in_srun_step,
    rendezvous_port,
    requeue_command,
    slurm_process_group_env,
)


def task_env(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
           "SLURM_NODEID": str(nodeid), "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_STEP_NUM_NODES": "2", "SLURM_STEP_NODELIST": "gpu[007-008]",
           "SLURM_JOB_NODELIST": "gpu[007-008]"}
    env.update(extra)
    return env


def test_each_task_reads_its_own_rank_and_all_agree_on_head_and_port() -> None:
    envs = [slurm_process_group_env(task_env(r, r % 4, r // 4)) for r in range(8)]
    assert [e["RANK"] for e in envs] == [str(r) for r in range(8)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"] * 2
    assert [e["NODE_RANK"] for e in envs] == ["0"] * 4 + ["1"] * 4
    assert {e["MASTER_ADDR"] for e in envs} == {"gpu007"}
    assert {e["MASTER_PORT"] for e in envs} == {str(rendezvous_port(4242))} == {"14242"}
    assert {(e["WORLD_SIZE"], e["LOCAL_WORLD_SIZE"]) for e in envs} == {("8", "4")}


def test_the_batch_script_itself_is_not_a_training_task() -> None:
    batch = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "8",
             "SLURM_JOB_NODELIST": "n[1-2]"}
    assert not in_srun_step(batch)
    assert slurm_process_group_env(batch) is None
    assert slurm_process_group_env({}) is None


def test_a_users_master_port_wins() -> None:
    assert slurm_process_group_env(task_env(0, 0, 0, MASTER_PORT="29999"))["MASTER_PORT"] == \
        "29999"


def test_ports_stay_below_the_ephemeral_range_and_differ_for_neighbouring_jobs() -> None:
    ports = [rendezvous_port(j) for j in range(1_000_000, 1_000_100)]
    assert len(set(ports)) == 100
    assert all(10_000 <= p < 30_000 for p in ports)


def test_nodelists_expand_as_slurm_writes_them() -> None:
    assert expand_nodelist("127.0.0.[2-3]") == ["127.0.0.2", "127.0.0.3"]
    assert expand_nodelist("gpu[001-003,007],cpu1") == ["gpu001", "gpu002", "gpu003", "gpu007",
                                                       "cpu1"]


@pytest.mark.parametrize(("env", "allowed", "why"), [
    ({}, True, "not a Slurm job"),
    ({"SLURM_JOB_ID": "5", "SUBMITIT_EXECUTOR": "local"}, True, "not a Slurm job"),
    ({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "3"}, False, "requeue limit reached"),
])
def test_no_requeue_outside_slurm_or_past_the_limit(env: dict[str, str], allowed: bool,
                                                     why: str) -> None:
    argv, reason = requeue_command(env, max_requeues=3)
    assert argv is None
    assert why in reason


def test_requeue_command_names_this_job() -> None:
    argv, reason = requeue_command({"SLURM_JOB_ID": "77", "SLURM_RESTART_COUNT": "1"}, 3)
    assert argv == ["scontrol", "requeue", "77"]
    assert reason == "requeue 2 of 3"
