"""The accelerate config files in launch/: they load, say what their names say, are documented,
and a DeepSpeed one that contradicts the recipe stops the run at once, naming both."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from dist_ft.config import load_recipe
from dist_ft.train.runtime import LauncherConflict, check_launcher_agrees
from tests.conftest import CONFIGS, REPO

LAUNCH = REPO / "launch"
SMOKE = CONFIGS / "chestxray14_smoke.yaml"
EXPECTED = {  # file: (distributed_type, processes, machines, zero stage, offload device)
    "cpu_2proc.yaml": ("MULTI_GPU", 2, 1, None, None),
    "1gpu.yaml": ("NO", 1, 1, None, None),
    "ddp_gpus.yaml": ("MULTI_GPU", 8, 1, None, None),
    "zero2.yaml": ("DEEPSPEED", 8, 1, 2, "none"),
    "zero3.yaml": ("DEEPSPEED", 8, 1, 3, "none"),
    "zero3_offload.yaml": ("DEEPSPEED", 8, 1, 3, "cpu"),
    "multinode.yaml": ("MULTI_GPU", 16, 2, None, None),
    "fsdp.yaml": ("FSDP", 2, 1, None, None),
}


def test_every_config_is_listed() -> None:
    assert sorted(p.name for p in LAUNCH.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_loads_in_accelerate_and_is_documented(name: str) -> None:
    kind, processes, machines, stage, offload = EXPECTED[name]
    cfg = load_config_from_file(str(LAUNCH / name))
    assert cfg.distributed_type.value == kind
    assert (cfg.num_processes, cfg.num_machines) == (processes, machines)
    if stage is not None:
        assert cfg.deepspeed_config["zero_stage"] == stage
        assert cfg.deepspeed_config["offload_optimizer_device"] == offload
        assert cfg.deepspeed_config["offload_param_device"] == offload
    assert f"accelerate launch --config_file launch/{name}" in (REPO / "README.md").read_text()
    assert f"launch/{name}" in (LAUNCH / name).read_text()  # the file shows its own command


def recipe(*overrides: str):
    return load_recipe(SMOKE, list(overrides))


def test_launcher_and_recipe_must_agree_on_deepspeed() -> None:
    ds = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"}
    check_launcher_agrees(recipe("trainer.zero_stage=3"), ds)
    check_launcher_agrees(recipe("trainer.backend=ddp"), {})  # not a DeepSpeed launcher
    with pytest.raises(LauncherConflict, match=re.escape(
            "asks for ZeRO-3 but the recipe says trainer.zero_stage=2: add the override "
            "trainer.zero_stage=3")):
        check_launcher_agrees(recipe(), ds)
    with pytest.raises(LauncherConflict, match=re.escape(
            "trainer.backend=ddp: add the override trainer.backend=deepspeed "
            "trainer.zero_stage=3")):
        check_launcher_agrees(recipe("trainer.backend=ddp"), ds)
    with pytest.raises(LauncherConflict, match="DeepSpeed JSON"):
        check_launcher_agrees(recipe(), {**ds, "ACCELERATE_DEEPSPEED_CONFIG_FILE": "ds.json"})


def test_launcher_and_recipe_must_agree_on_fsdp() -> None:
    cfg = load_config_from_file(str(LAUNCH / "fsdp.yaml"))
    assert cfg.fsdp_config["fsdp_version"] == 2
    fsdp = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
    check_launcher_agrees(recipe("trainer.backend=fsdp"), fsdp)
    check_launcher_agrees(recipe("trainer.backend=fsdp"), {})  # any launcher starts FSDP2
    with pytest.raises(LauncherConflict, match=re.escape(
            "asks for FSDP but the recipe says trainer.backend=deepspeed: add the override "
            "trainer.backend=fsdp")):
        check_launcher_agrees(recipe(), fsdp)
    with pytest.raises(LauncherConflict, match="FSDP version 1; dist-ft shards with FSDP2"):
        check_launcher_agrees(recipe("trainer.backend=fsdp"), {**fsdp, "FSDP_VERSION": "1"})
    with pytest.raises(LauncherConflict, match=re.escape(
            "recipe says trainer.backend=fsdp: add the override trainer.backend=deepspeed")):
        check_launcher_agrees(recipe("trainer.backend=fsdp"),
                              {"ACCELERATE_USE_DEEPSPEED": "true",
                               "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"})


@pytest.mark.multiprocess
def test_a_zero3_launch_of_a_zero2_recipe_stops_at_start(tmp_path) -> None:
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    result = subprocess.run(
        [accelerate, "launch", "--config_file", str(LAUNCH / "zero3.yaml"), "--num_processes",
         "2", "-m", "dist_ft", "train", str(SMOKE), f"output_dir={tmp_path}/run"],
        cwd=REPO, capture_output=True, text=True, timeout=180,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "the launcher config asks for ZeRO-3 but the recipe says trainer.zero_stage=2" \
        in result.stderr
    assert not (tmp_path / "run").exists()  # nothing written
