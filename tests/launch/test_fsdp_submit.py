"""``dist-ft submit`` of an FSDP2 recipe (``trainer.backend=fsdp``), before anything is
submitted: each Slurm task is one rank running ``dist-ft train`` on the recipe, which decides
the backend; no ``accelerate launch`` config sits in between, so ``launch/fsdp.yaml`` needs
no counterpart for Slurm."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml
from accelerate.commands.config.config_args import load_config_from_file

from dist_ft.config.load import validate_recipe
from dist_ft.launch.submit import dry_run, node_layout, plan_submission
from dist_ft.train.runtime import check_launcher_agrees
from tests.conftest import CONFIGS, REPO

SMOKE = CONFIGS / "chestxray14_smoke.yaml"


def test_dry_run_of_an_fsdp_recipe_names_fsdp2_and_runs_dist_ft_train_per_rank(
    run_cli, tmp_path: Path
) -> None:
    args = ["submit", str(SMOKE), "trainer.backend=fsdp", "--nodes", "2", "--gpus-per-node",
            "4", f"output_dir={tmp_path}", "--dry-run"]
    text = run_cli(*args)
    assert text.code == 0, text.err
    assert "2 node(s) x 4 process(es) = world size 8, FSDP2" in text.out.splitlines()[0]
    result = run_cli(*args, "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert (doc["backend"], doc["zero_stage"], doc["backend_label"]) == ("fsdp", None, "FSDP2")
    assert {"#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4",
            "#SBATCH --gpus-per-node=4"} <= set(doc["sbatch"].splitlines())
    # The plain script's one step: srun starts every rank as `dist-ft train` of the recipe
    # with the fsdp override; no launcher (accelerate/torchrun) and no launch config.
    srun = shlex.split(doc["plain_sbatch"].rsplit("\nsrun ", 1)[1])
    assert srun[srun.index("-m"):srun.index("-m") + 4] == ["-m", "dist_ft", "train", str(SMOKE)]
    assert "trainer.backend=fsdp" in srun
    assert not {"accelerate", "torchrun", "--config_file"} & set(srun)
    assert not (tmp_path / "submitit").exists()  # a dry run submits nothing


def test_the_submitted_recipe_is_the_one_launch_fsdp_yaml_accepts(tmp_path: Path) -> None:
    """What a task trains (the resolved recipe it carries) says FSDP2, and both roads to the
    processes accept it: each srun rank's own environment, and ``accelerate launch
    --config_file launch/fsdp.yaml`` as written (unchanged)."""
    sub = plan_submission(SMOKE, ["trainer.backend=fsdp",
                                  "trainer.fsdp.reshard_after_forward=false",
                                  f"output_dir={tmp_path}"], {"nodes": 2, "gpus_per_node": 0})
    recipe = validate_recipe(sub.tasks[0].recipe)
    assert recipe.trainer.backend == "fsdp" and recipe.trainer.fsdp.reshard_after_forward is False
    assert dry_run(sub)["executor_parameters"]["tasks_per_node"] == 1  # one CPU rank a node
    for node in node_layout(sub):  # what the ranks export for the process group
        assert not any(k.startswith("ACCELERATE_") for k in node)
        check_launcher_agrees(recipe, {})  # srun: no launcher settings to disagree with
    cfg = load_config_from_file(str(REPO / "launch" / "fsdp.yaml"))
    check_launcher_agrees(recipe, {"ACCELERATE_USE_FSDP": "true",
                                   "FSDP_VERSION": str(cfg.fsdp_config["fsdp_version"])})


def test_a_sweep_may_compare_backends_and_labels_each_task(run_cli, tmp_path: Path) -> None:
    sweep = tmp_path / "backends.yaml"
    sweep.write_text(yaml.safe_dump({"grid": {"trainer.backend": ["ddp", "fsdp"]}}))
    result = run_cli("submit", str(SMOKE), "--sweep", str(sweep), "--nodes", "1",
                     "--gpus-per-node", "2", f"output_dir={tmp_path / 'runs'}", "--dry-run",
                     "--json")
    assert result.code == 0, result.err
    doc = json.loads(result.out)
    assert [t["backend_label"] for t in doc["tasks"]] == ["DDP", "FSDP2"]
    assert doc["backend_label"] == "DDP | FSDP2"
    assert "--sweep-index" in doc["plain_sbatch"]


def test_fsdp_with_precision_is_refused_at_submission_naming_the_keys(
    run_cli, tmp_path: Path
) -> None:
    result = run_cli("submit", str(SMOKE), "trainer.backend=fsdp", "trainer.precision=bf16",
                     f"output_dir={tmp_path}", "--dry-run")
    assert result.code != 0
    assert "precision=bf16 with backend=fsdp" in result.err
    assert "trainer.fsdp.mixed_precision.param_dtype" in result.err
    assert "Traceback" not in result.err
