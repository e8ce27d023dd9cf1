"""``dist-ft submit`` before anything is submitted: dry-run layout, validation, quoting."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from dist_ft.launch.submit import plain_sbatch, plan_submission, time_minutes
from tests.conftest import CONFIGS

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


def dry_run_json(run_cli, *args: str) -> dict:
    result = run_cli("submit", str(SMOKE), *args, "--dry-run", "--json")
    assert result.code == 0, result.err
    return json.loads(result.out)


def test_dry_run_4_nodes_x_8_gpus_zero3(run_cli, tmp_path: Path) -> None:
    doc = dry_run_json(run_cli, "--nodes", "4", "--gpus-per-node", "8", "trainer.zero_stage=3",
                       "--partition", "gpu", "--time", "1-00:00:00", f"output_dir={tmp_path}")
    assert (doc["world_size"], doc["processes_per_node"], doc["nodes"]) == (32, 8, 4)
    assert (doc["backend"], doc["zero_stage"]) == ("deepspeed", 3)
    layout = doc["node_layout"]
    assert [n["node_ranks"] for n in layout] == [[0], [1], [2], [3]]
    assert [n["ranks"] for n in layout] == [list(range(8 * k, 8 * k + 8)) for k in range(4)]
    assert all(n["local_ranks"] == list(range(8)) for n in layout)
    assert {a for n in layout for a in n["master_addrs"]} == {"node1"}  # one head
    assert len({p for n in layout for p in n["master_ports"]}) == 1  # one port
    assert {w for n in layout for w in n["world_sizes"]} == {32}
    sbatch = doc["sbatch"]
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=1440", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append"):
        assert line in sbatch.splitlines()
    # Ranks are read inside each task, never expanded once in the batch script.
    assert "SLURM_PROCID" not in sbatch and "SLURM_NODEID" not in sbatch
    assert not (tmp_path / "submitit").exists()  # a dry run submits nothing
    plain = doc["plain_sbatch"]
    assert "srun " in plain and "trainer.zero_stage=3" in plain
    assert "SLURM_PROCID" not in plain.rsplit("\nsrun ", 1)[1]


def test_cpu_nodes_run_one_process_each(run_cli, tmp_path: Path) -> None:
    doc = dry_run_json(run_cli, "--nodes", "2", "--gpus-per-node", "0", f"output_dir={tmp_path}")
    assert (doc["world_size"], doc["processes_per_node"]) == (2, 1)
    assert "--gpus-per-node" not in doc["sbatch"]
    local = dry_run_json(run_cli, "--nodes", "2", "--cluster", "local", f"output_dir={tmp_path}")
    assert local["executor_parameters"]["tasks_per_node"] == 2
    assert "sbatch" not in local


@pytest.mark.parametrize(("args", "named"), [
    (["--nodes", "0"], "--nodes (launch.nodes)"),
    (["--gpus-per-node", "-1"], "--gpus-per-node (launch.gpus_per_node)"),
    (["--partition", "gpu;reboot"], "--partition (launch.partition)"),
    (["--account", "a b"], "--account (launch.account)"),
    (["--qos", "$(id)"], "--qos (launch.qos)"),
    (["--constraint", "a100 `id`"], "--constraint (launch.constraint)"),
    (["--time", "25h"], "--time (launch.time)"),
    (["--time", "99:99:99"], "--time (launch.time): '99:99:99' is not a Slurm time limit"),
    (["--time", "1-24:00"], "--time (launch.time): '1-24:00' is not a Slurm time limit"),
    (["--time", "0"], "--time (launch.time): '0' is no time at all"),
    (["--parallelism", "-3"], "--parallelism -3: must be 1 or more"),
    (["--parallelism", "0"], "--parallelism 0: must be 1 or more"),
    (["--mem", "4 G"], "--mem (launch.mem)"),
    (["--max-requeues", "-2"], "--max-requeues (launch.max_requeues)"),
    (["optim.lr=-1"], "optim.lr"),
    (["output_dir=runs/a b"], "output_dir"),
    (["output_dir=runs/$(touch x)"], "output_dir"),
    (["output_dir=runs/a\nrm -rf ~"], "output_dir"),
])
def test_bad_arguments_fail_before_submission_naming_the_argument(
        run_cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str],
        named: str) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli("submit", str(SMOKE), *args)
    assert result.code == 2, result.err
    assert named in result.err
    assert result.out == ""
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing submitted


def test_a_bad_sweep_task_is_named_before_anything_is_submitted(
        run_cli, tmp_path: Path, write_recipe) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  optim.lr: [1.0e-3, -1.0]\n")
    result = run_cli("submit", str(SMOKE), "--sweep", str(sweep), f"output_dir={tmp_path}/sw")
    assert result.code == 2
    assert "sweep task 1 (01-lr--1.0): optim.lr: must be greater than 0" in result.err
    assert not (tmp_path / "sw").exists()


def test_sweep_dry_run_is_one_array_with_a_parallelism_limit(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  trainer.seed: [0, 1, 2]\nparallelism: 2\n")
    doc = dry_run_json(run_cli, "--sweep", str(sweep), f"output_dir={tmp_path}/sw")
    assert "#SBATCH --array=0-2%2" in doc["sbatch"].splitlines()
    assert [t["output_dir"] for t in doc["tasks"]] == [
        f"{tmp_path}/sw/0{i}-seed-{i}" for i in range(3)]
    assert '--sweep-index "$SLURM_ARRAY_TASK_ID"' in doc["plain_sbatch"]


HOSTILE = ["data.root={tmp}/a b'; touch {tmp}/PWNED1; $(touch {tmp}/PWNED2) `touch {tmp}/PWNED3`",
           "model.pretrained='\"$(touch {tmp}/PWNED4)\"; touch {tmp}/PWNED5 #'",
           "optim.lr=0.001;touch {tmp}/PWNED6"]


def test_hostile_overrides_are_inert_in_the_generated_scripts(tmp_path: Path) -> None:
    overrides = [h.format(tmp=tmp_path) for h in HOSTILE[:2]]
    sub = plan_submission(SMOKE, [*overrides, f"output_dir={tmp_path}/run"],
                          {"nodes": 2, "gpus_per_node": 0})
    script = plain_sbatch(sub)
    # Run the script's commands with srun replaced by a recorder of its argv.
    record = tmp_path / "argv"
    shim = f"srun() {{ printf '%s\\0' \"$@\" > {record}; }}\n"
    subprocess.run(["bash", "-c", shim + script.split("\n", 1)[1]], check=True, cwd=tmp_path)
    argv = record.read_text().split("\0")[:-1]
    # A failed task ends the step at once (its peers need not wait out a timeout).
    assert argv[0] == "--kill-on-bad-exit=1"
    assert argv[5:8] == [str(SMOKE.resolve()), *overrides]
    assert argv[-2:] == ["--resume", "auto"]
    assert not list(tmp_path.glob("PWNED*"))
    # The submitted script carries no override at all: submitit pickles the recipe.
    from dist_ft.launch.submit import submitit_sbatch

    submitted = submitit_sbatch(sub)
    assert "PWNED" not in submitted and "touch" not in submitted
    assert "srun --unbuffered" in submitted and "--kill-on-bad-exit=1" in submitted


def test_a_hostile_override_that_is_not_a_valid_value_is_rejected(run_cli, tmp_path) -> None:
    result = run_cli("submit", str(SMOKE), HOSTILE[2].format(tmp=tmp_path), "--dry-run")
    assert result.code == 2
    assert "optim.lr" in result.err
    assert not list(tmp_path.glob("PWNED*"))


def test_time_limits_convert_to_whole_minutes() -> None:
    assert time_minutes("00:30:00") == 30
    assert time_minutes("01:00:01") == 61
    assert time_minutes("2-03:04:00") == 2 * 1440 + 184
    # Slurm's other formats: MM, MM:SS, D-HH, D-HH:MM
    assert [time_minutes(t) for t in ("90", "90:30", "1-2", "1-2:30")] == [90, 91, 1560, 1590]


def test_a_sweep_s_parallelism_must_be_a_positive_integer(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  trainer.seed: [0, 1]\nparallelism: yes\n")
    result = run_cli("submit", str(SMOKE), "--sweep", str(sweep), f"output_dir={tmp_path}/sw")
    assert result.code == 2 and "parallelism: must be a positive integer (got True)" in result.err


def test_home_and_relative_output_dirs_resolve_once(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    sub = plan_submission(SMOKE, ["output_dir=~/runs/a"], {"cluster": "local"})
    assert sub.root == tmp_path / "home" / "runs" / "a"
    recipe = sub.tasks[0].recipe
    assert recipe["output_dir"] == str(sub.root)
    assert recipe["data"]["root"] == str(tmp_path / "data" / "cxr14_synth")
    assert not (tmp_path / "~").exists()


def test_a_freeze_plan_that_matches_nothing_fails_at_submission(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("runs:\n  - plan.stages[1].include: ['layer9*']\n  - trainer.seed: 1\n")
    result = run_cli("submit", str(SMOKE), "--sweep", str(sweep), f"output_dir={tmp_path}/sw")
    assert result.code == 2
    assert "sweep task 0" in result.err and "'layer9*' matched no parameter" in result.err
    assert "sweep task 1" not in result.err


def test_without_sbatch_the_error_says_what_to_do(run_cli, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere
    result = run_cli("submit", str(SMOKE), f"output_dir={tmp_path}/run")
    assert result.code == 1
    assert "sbatch is not on PATH" in result.err and "--cluster local" in result.err
    assert not (tmp_path / "run").exists()


def test_a_sweep_aggregates_by_its_swept_keys_but_not_seeds(tmp_path: Path) -> None:
    from dist_ft.launch.submit import sweep_group_keys

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("grid:\n  optim.lr: [0.001, 0.002]\n  trainer.seed: [0, 1]\n")
    sub = plan_submission(SMOKE, [f"output_dir={tmp_path}/sw"], {}, sweep)
    assert sweep_group_keys(sub) == ["optim.lr"]
    sweep.write_text("grid:\n  trainer.seed: [0, 1, 2]\n")
    assert sweep_group_keys(plan_submission(SMOKE, [f"output_dir={tmp_path}/sw"], {},
                                            sweep)) == ["all"]


def test_a_submission_into_a_folder_holding_a_run_needs_resume(run_cli, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "status.json").write_text('{"state": "finished", "run_id": "r1"}')
    refused = run_cli("submit", str(SMOKE), f"output_dir={out}", "--dry-run")
    assert refused.code == 2
    assert f"output_dir {out} already holds a run: pass --resume to continue it" in refused.err
    assert sorted(p.name for p in out.iterdir()) == ["status.json"]
    assert run_cli("submit", str(SMOKE), f"output_dir={out}", "--dry-run", "--resume").code == 0


def test_dry_run_renders_the_job_on_a_machine_without_slurm(tmp_path: Path) -> None:
    """A laptop or a login node without Slurm: no srun or sbatch on PATH. The dry run renders
    the same sbatch script; real submission still says sbatch is missing."""
    import sys

    from tests.conftest import REPO, plain_env

    env = {**plain_env(), "PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO)}
    argv = [sys.executable, "-m", "dist_ft", "submit", str(SMOKE), "--nodes", "4",
            "--gpus-per-node", "8", f"output_dir={tmp_path / 'run'}"]
    dry = subprocess.run([*argv, "--dry-run", "--json"], capture_output=True, text=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert dry.returncode == 0, dry.stderr[-2000:]
    here = subprocess.run([*argv, "--dry-run", "--json"], capture_output=True, text=True,
                          env={**env, "PATH": f"{env['PATH']}:/usr/bin:/bin"}, cwd=tmp_path,
                          timeout=120)
    assert json.loads(dry.stdout)["sbatch"] == json.loads(here.stdout)["sbatch"]
    assert "#SBATCH --nodes=4" in json.loads(dry.stdout)["sbatch"].splitlines()
    real = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=120)
    assert real.returncode != 0 and "sbatch is not on PATH" in real.stderr
