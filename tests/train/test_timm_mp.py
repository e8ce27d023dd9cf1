"""timm backbones under DeepSpeed ZeRO-2 on 2 gloo processes: stages, resume, export.

For three families (an EfficientNet, a ConvNeXt, a DeiT), one run (32 px synthetic
ChestX-ray14 twin, layer decay, frozen BatchNorm) through three stages with two stage changes
is shared by the tests; a second run resumes it from a mid-run checkpoint. The EfficientNet
run uses timm's activation checkpointing; the DeiT's middle stage trains LoRA adapters on its
attention (timm's ``attn.qkv`` and ``attn.proj``), merged when the full stage starts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dist_ft.config import load_recipe
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import resolve_plan
from tests.conftest import CONFIGS, CliResult
from tests.train.conftest import assert_same_final
from tests.train.test_trainer_mp import launch

pytestmark = pytest.mark.multiprocess

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
COMMON = [
    "optim.layer_decay=0.8", "optim.groups=[]",
    "data.image_size=32", "data.load_size=32", "data.batch_size=8",
    "plan.stages[1].start_step=3", "plan.stages[2].start_step=6",
    "trainer.max_steps=8", "trainer.epochs=10", "trainer.checkpoint_every_steps=4",
    "trainer.keep_last=5", "trainer.save_stage_weights=true", "logging.every_steps=2",
    "schedule.warmup_steps=0", "trainer.backend=deepspeed", "trainer.zero_stage=2",
]
MODELS = {
    "efficientnet": ["model.name=timm/efficientnet_b0", "trainer.activation_checkpointing=true"],
    "convnext": ["model.name=timm/convnext_atto"],
    "deit": ["model.name=timm/deit_tiny_patch16_224",
             "plan.stages=[{name: head, start_step: 0, include: [head]}, "
             "{name: lora, start_step: 3, include: [head], "
             "adapters: {r: 4, target: [{last_blocks: 2}, attn]}}, "
             "{name: full, start_step: 6, include: [all]}]"],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from dist_ft.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("timm_data")
    write_synthetic(root, images=80, size=32, seed=0)
    return root


@pytest.fixture(scope="module", params=list(MODELS))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def run(family: str, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp(f"timm_{family}")
    result = launch(["train", str(SMOKE), f"data.root={data}", f"output_dir={out}",
                     *MODELS[family], *COMMON])
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_stages_train_what_timms_blocks_say(family: str, run: Path) -> None:
    recipe = load_recipe(SMOKE, [*MODELS[family], *COMMON])
    plan = resolve_plan(recipe, fast_model_spec(recipe.model))
    tail = {"efficientnet": ("blocks.5.3", "blocks.6.0", "head"),
            "convnext": ("stages.3.blocks.0", "stages.3.blocks.1", "head"),
            "deit": ("blocks.10", "blocks.11", "head")}[family]
    assert plan.spec.blocks.blocks[-3:] == tail
    weights = run / "stage_weights"
    for k, stage in enumerate(plan.stages):
        start = load_file(weights / f"stage{k}_start.safetensors")
        end = load_file(weights / f"stage{k}_end.safetensors")
        trainable = set(stage.trainable)
        for name in (p.name for p in stage.spec.params):
            moved = not torch.equal(start[name], end[name])
            assert moved == (name in trainable), f"stage {k}: {name}"
    log = (run / "logs" / "rank0.log").read_text()
    assert "final weights identical on 2 ranks" in log and "moments carried for" in log
    if family == "efficientnet":
        assert "activation checkpointing on" in log
    if family == "deit":
        assert "lora r=4 adapters on 4 layers injected" in log
        assert "merged into the base weights" in log


def test_resume_from_a_checkpoint_is_bitwise(family: str, run: Path, data: Path,
                                             tmp_path: Path) -> None:
    checkpoint = run / "checkpoints" / "step_00000004"
    assert (checkpoint / "COMPLETE").is_file()
    result = launch(["train", str(SMOKE), f"data.root={data}", f"output_dir={tmp_path}",
                     *MODELS[family], *COMMON, "trainer.save_stage_weights=false",
                     "--resume", str(checkpoint)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_final(run, tmp_path)


def test_exports_to_onnx(run: Path, run_cli: Callable[..., CliResult]) -> None:
    result = run_cli("export", str(run), "--weights", "final", "--format", "onnx", "--json")
    assert result.code == 0, result.err
    report = json.loads(result.out)
    assert report["max_abs_error"] <= 1e-4 and Path(report["path"]).is_file()
