"""Adapter stages (LoRA through peft) on 2 gloo processes: DDP, DeepSpeed ZeRO-2/3 and FSDP2.

One run per backend trains head (steps 0-3) -> LoRA on the last two blocks' conv2 with the
head (4-7) -> everything, the LoRA merged (8-11), with stage snapshots and a (lean)
checkpoint at step 6, inside the LoRA stage. A second family of runs ends inside a LoRA
stage, from initial weights given as ``model.pretrained``: its ``final/`` holds merged
weights and the adapters in peft's format, and 2 processes equal 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dist_ft.config import load_recipe
from dist_ft.config.schema import ModelConfig
from dist_ft.models.adapters import merged_state_dict
from dist_ft.models.factory import build_model
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import resolve_plan
from tests.conftest import REPO, CliResult, plain_env
from tests.train.conftest import LazyRuns, assert_same_final
from tests.train.test_trainer_mp import (
    BACKENDS,
    SMOKE,
    _relative_gap,
    first_global_batch,
    launch,
)

pytestmark = pytest.mark.multiprocess

PLAN = ("plan.stages=[{name: head, start_step: 0, include: [head]}, "
        "{name: lora, start_step: 4, include: [head], "
        "adapters: {r: 4, alpha: 8, target: [{last_blocks: 2}, conv2]}}, "
        "{name: full, start_step: 8, include: [all]}]")
COMMON = [
    PLAN, "data.image_size=32", "data.load_size=32", "data.batch_size=8",
    "trainer.max_steps=12", "trainer.epochs=10", "trainer.checkpoint_every_steps=6",
    "trainer.keep_last=5", "trainer.save_stage_weights=true", "logging.every_steps=2",
    "schedule.warmup_steps=0", "optim.groups=[]",
]
ADAPTER_BACKENDS = ["ddp", "zero2", "zero3", "fsdp"]


@pytest.fixture(scope="module")
def runs(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folders of one 12-step head -> LoRA -> full run per backend (lazily, once)."""
    def start(backend: str) -> Path:
        out = tmp_path_factory.mktemp(f"lora_{backend}")
        result = launch(["train", str(SMOKE), f"data.root={smoke_data}",
                         f"output_dir={out}", *COMMON, *BACKENDS[backend]])
        assert result.returncode == 0, result.stderr[-4000:]
        return out

    return LazyRuns(start)


def _plan():
    recipe = load_recipe(SMOKE, COMMON)
    return resolve_plan(recipe, fast_model_spec(recipe.model))


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
def test_lora_stage_trains_adapters_and_head_only_and_moments_carry(
    runs: dict[str, Path], backend: str
) -> None:
    out, plan = runs[backend], _plan()
    weights = out / "stage_weights"
    start = load_file(weights / "stage1_start.safetensors")
    end = load_file(weights / "stage1_end.safetensors")
    lora = plan.stages[1]
    trainable = set(lora.trainable)
    assert {n for n in start if ".lora_" in n} == {n for n in trainable if ".lora_" in n}
    for name in start:
        if name in trainable:
            assert not torch.equal(start[name], end[name]), f"{name} never moved"
        else:  # base weights (wrapped or not), BN statistics: bitwise unchanged
            assert torch.equal(start[name], end[name]), f"frozen {name} moved"
    # Entering LoRA: the head's Adam moments come from the head stage; entering full, from
    # the LoRA stage (the adapters' own moments end with them: their tensors are merged).
    for k in (0, 1):
        before = load_file(weights / f"stage{k}_end.moments.safetensors")
        after = load_file(weights / f"stage{k + 1}_start.moments.safetensors")
        for key in ("exp_avg/fc.weight", "exp_avg_sq/fc.bias"):
            assert torch.equal(before[key], after[key]), (k, key)
        assert not [n for n in after if ".lora_" in n and k == 1]
    # The full stage starts from the LoRA stage's weights with the adapters merged.
    merged = merged_state_dict(ModelConfig(name="resnet18", num_classes=14), end,
                               lora.adapters)
    full = load_file(weights / "stage2_start.safetensors")
    assert full.keys() == merged.keys()
    assert _relative_gap(merged, full) < 1e-6
    assert not torch.equal(full["layer4.1.conv2.weight"], start["layer4.1.conv2.base_layer.weight"])
    log = (out / "logs" / "rank0.log").read_text()
    assert "lora r=4 adapters on 4 layers injected" in log
    assert "lora adapters on 4 layers merged into the base weights" in log
    assert "received no gradient" not in log and "final weights identical on 2 ranks" in log


@pytest.mark.parametrize("backend", ADAPTER_BACKENDS)
def test_lean_lora_checkpoint_resumes_bitwise(
    runs: dict[str, Path], backend: str, smoke_data: Path, tmp_path: Path
) -> None:
    first = runs[backend]
    checkpoint = first / "checkpoints" / "step_00000006"
    lean_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    weight_bytes = 4 * _plan().spec.num_params  # the fp32 weights alone: 44.7 MB
    assert lean_bytes < weight_bytes / 10, lean_bytes  # adapters + head + their moments
    result = launch(["train", str(SMOKE), f"data.root={smoke_data}", f"output_dir={tmp_path}",
                     *COMMON, *BACKENDS[backend], "trainer.save_stage_weights=false",
                     "--resume", str(checkpoint)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_final(first, tmp_path)


def test_lean_zero3_checkpoint_resumes_on_one_process_with_the_batch_change_accepted(
    runs: dict[str, Path], smoke_data: Path, tmp_path: Path
) -> None:
    """The lean ``portable/`` state (adapters, head, buffers and their moments; the frozen
    base rebuilt from the recipe) loads on another number of processes; per-process batch 8
    on 1 process halves the global batch, accepted by name and said."""
    checkpoint = runs["zero3"] / "checkpoints" / "step_00000006"
    held = load_file(checkpoint / "portable" / "model.safetensors")
    assert any(".lora_A." in n for n in held) and "layer1.0.conv1.weight" not in held
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "train", str(SMOKE), f"data.root={smoke_data}",
         *COMMON, *BACKENDS["zero3"], "trainer.save_stage_weights=false",
         f"output_dir={tmp_path}", "--resume", str(checkpoint),
         "--accept-change", "data.global_batch"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "the global batch changes from 16 to 8 (accepted)" in log
    assert "name-keyed weights and moments" in log
    assert "done: 12 steps" in result.stdout


def test_lean_checkpoint_refuses_other_initial_weights(
    runs: dict[str, Path], smoke_data: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other.safetensors"
    torch.manual_seed(5)
    save_file(build_model(ModelConfig(name="resnet18", num_classes=14)).state_dict(), str(other))
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "train", str(SMOKE), f"data.root={smoke_data}",
         *COMMON, *BACKENDS["ddp"], f"output_dir={tmp_path / 'run'}",
         "data.global_batch_size=16",  # the 2-process run's, on 1 process
         f"model.pretrained={other}", "--accept-change", "model.pretrained",
         "--resume", str(runs["ddp"] / "checkpoints" / "step_00000006")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert "stores only what trains in an adapter stage" in result.stderr
    assert "resume with the same initial weights" in result.stderr


# Ends inside the LoRA stage; the same global batches whatever the world size.
ENDS_IN_LORA = [
    "plan.stages=[{name: head, start_step: 0, include: [head]}, "
    "{name: lora, start_step: 2, include: [head], "
    "adapters: {r: 4, alpha: 8, target: [{last_blocks: 2}, conv2]}}]",
    "data.image_size=32", "data.load_size=32", "trainer.max_steps=6", "trainer.epochs=10",
    "trainer.checkpoint_every_steps=null", "schedule.warmup_steps=0", "optim.groups=[]",
    "data.augment.crop_scale=[1.0, 1.0]", "data.augment.ratio=[1.0, 1.0]",
    "data.augment.hflip=false", "data.augment.rotation_deg=0",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Initial weights as a user gives them: a state-dict file (``model.pretrained``)."""
    path = tmp_path_factory.mktemp("init") / "resnet18.safetensors"
    torch.manual_seed(11)
    save_file(build_model(ModelConfig(name="resnet18", num_classes=14)).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def one_process(smoke_data: Path, pretrained: Path,
                tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lora_one")
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "train", str(SMOKE), f"data.root={smoke_data}",
         *ENDS_IN_LORA, "data.batch_size=16", f"model.pretrained={pretrained}",
         f"output_dir={out}", "trainer.backend=ddp"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_final_adapters_merge_load_in_peft_and_match_one_process(
    smoke_data: Path, pretrained: Path, one_process: Path, tmp_path: Path, backend: str,
    run_cli: Callable[..., CliResult]
) -> None:
    from peft import PeftModel

    result = launch(["train", str(SMOKE), f"data.root={smoke_data}", *ENDS_IN_LORA,
                     "data.batch_size=8", f"model.pretrained={pretrained}",
                     f"output_dir={tmp_path}", *BACKENDS[backend]])
    assert result.returncode == 0, result.stderr[-3000:]
    final = tmp_path / "final"
    two = load_file(final / "model.safetensors")
    assert _relative_gap(load_file(one_process / "final" / "model.safetensors"), two) < 1e-5
    assert (final / "adapter_config.json").is_file()
    cfg = ModelConfig(name="resnet18", num_classes=14)
    plain = build_model(ModelConfig(name="resnet18", num_classes=14, pretrained=str(final /
                                                                                    "model.safetensors")))
    base = build_model(cfg.model_copy(update={"pretrained": str(pretrained)}))
    adapted = PeftModel.from_pretrained(base, final)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want, got = adapted.eval()(x), plain.eval()(x)
    assert float((got - want).norm() / want.norm()) < 1e-5
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert "adapters (lora, " in log and "in peft's format" in log
    if backend == "ddp":  # export takes the merged weights: a plain resnet18
        result = run_cli("export", str(tmp_path), "--weights", "final", "--format", "onnx",
                         "--json")
        assert result.code == 0, result.err
        assert json.loads(result.out)["max_abs_error"] <= 1e-4


SGD_STEP = [
    "plan.stages=[{name: ia3, start_step: 0, include: [head], "
    "adapters: {kind: ia3, target: [{last_blocks: 2}, conv2]}}]",
    "optim.name=sgd", "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.lr=0.5",
    "optim.groups=[{name: fc, match: [head]}, {name: l4, match: [layer4], lr_scale: 0.1}]",
    "trainer.grad_clip_norm=null", "trainer.max_steps=1", "schedule.name=constant",
    "schedule.warmup_steps=0", "trainer.save_stage_weights=true",
    "data.image_size=32", "data.load_size=32", "data.batch_size=8",
    "data.augment.crop_scale=[1.0, 1.0]", "data.augment.ratio=[1.0, 1.0]",
    "data.augment.hflip=false", "data.augment.rotation_deg=0",
]


@pytest.mark.parametrize("backend", ["ddp", "zero2"])
def test_sgd_step_moves_each_adapter_tensor_by_lr_times_gradient(
    smoke_data: Path, tmp_path: Path, backend: str
) -> None:
    """One plain-SGD step on 2 ranks (IA3: every adapter tensor has a gradient at once)."""
    from dist_ft.models.adapters import adapt

    result = launch(["train", str(SMOKE), f"data.root={smoke_data}", f"output_dir={tmp_path}",
                     *SGD_STEP, *BACKENDS[backend]])
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = load_recipe(SMOKE, [f"data.root={smoke_data}", *SGD_STEP])
    stage = resolve_plan(recipe, fast_model_spec(recipe.model)).stages[0]
    start = load_file(tmp_path / "stage_weights" / "stage0_start.safetensors")
    end = load_file(tmp_path / "stage_weights" / "stage0_end.safetensors")

    x, targets = first_global_batch(recipe)
    model = adapt(build_model(ModelConfig(name="resnet18", num_classes=14)), None,
                  stage.adapters)
    model.load_state_dict(start)
    model.requires_grad_(True)  # peft leaves only its adapters trainable
    model.eval()  # every BatchNorm is frozen in this plan
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), targets).backward()
    lr = {p: g.lr for g in stage.groups for p in g.params}
    adapters = [n for n in lr if ".ia3_l." in n]
    assert len(adapters) == 4 and {lr[n] for n in adapters} == {0.5, 0.05}
    for name, param in model.named_parameters():
        if name not in lr:
            assert torch.equal(end[name], start[name]), f"frozen {name} moved"
            continue
        expected = start[name] - lr[name] * param.grad
        assert not torch.equal(end[name], start[name]), name
        assert torch.allclose(end[name], expected, rtol=0, atol=2e-6), (
            name, float((end[name] - expected).abs().max()))
