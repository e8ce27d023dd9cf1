"""The trainer on 2 gloo processes under DDP, DeepSpeed ZeRO-1/2/3 (real DeepSpeed, CPU) and
PyTorch FSDP2 (``fully_shard``).

Each backend trains the smoke recipe for 12 steps through three freeze stages (steps 0, 4,
8) with stage snapshots on, and the tests read what it wrote: weights and optimizer moments
at every stage boundary, the final consolidated weights, checkpoints, and logs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dist_ft.config import load_recipe
from dist_ft.config.schema import ModelConfig, Recipe
from dist_ft.models.factory import build_model
from dist_ft.models.spec_cache import fast_model_spec
from dist_ft.plan import resolve_plan
from tests.conftest import CONFIGS, REPO, plain_env
from tests.train.conftest import LazyRuns, assert_same_final

pytestmark = pytest.mark.multiprocess

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
BACKENDS = {
    "ddp": ["trainer.backend=ddp"],
    "zero1": ["trainer.backend=deepspeed", "trainer.zero_stage=1"],
    "zero2": ["trainer.backend=deepspeed", "trainer.zero_stage=2"],
    "zero3": ["trainer.backend=deepspeed", "trainer.zero_stage=3"],
    "fsdp": ["trainer.backend=fsdp"],
}
COMMON = [
    "data.image_size=32", "data.load_size=32", "data.batch_size=8",
    "plan.stages[1].start_step=4", "plan.stages[2].start_step=8",
    "trainer.max_steps=12", "trainer.epochs=10", "trainer.checkpoint_every_steps=6",
    "trainer.keep_last=5", "trainer.save_stage_weights=true", "logging.every_steps=2",
    "trainer.activation_checkpointing=true", "logging.per_rank=true",
    "schedule.warmup_steps=0",
]


def launch(args: list[str], timeout: int = 300, processes: int = 2,
           launcher: str = "torchrun") -> subprocess.CompletedProcess[str]:
    """2 (or ``processes``) processes of ``dist-ft ARGS`` from the repository root, started
    by ``torchrun``, or by ``accelerate launch --config_file launch/cpu_2proc.yaml`` (the
    README's command, ``launcher="accelerate"``). dist-ft reads its ranks from the
    environment either way; ``accelerate launch`` runs torch's same launcher after importing
    itself (3.5 s more a launch on 2 cores), which the tests of the launcher pay alone."""
    if launcher == "accelerate":
        cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
               str(REPO / "launch/cpu_2proc.yaml"), "--num_processes", str(processes)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
               str(processes)]
    cmd += ["-m", "dist_ft", *args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Output folders of one 12-step run per backend (launched lazily, once)."""
    def start(backend: str) -> Path:
        out = tmp_path_factory.mktemp(f"run_{backend}")
        result = launch(["train", str(SMOKE), f"data.root={smoke_data}",
                         f"output_dir={out}", *COMMON, *BACKENDS[backend]])
        assert result.returncode == 0, result.stderr[-4000:]
        return out

    return LazyRuns(start)


def _plan(backend: str):
    recipe = load_recipe(SMOKE, [*COMMON, *BACKENDS[backend]])
    return resolve_plan(recipe, fast_model_spec(recipe.model))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_three_stages_freeze_train_and_carry_moments(runs: dict[str, Path], backend: str) -> None:
    out = runs[backend]
    plan = _plan(backend)
    weights = out / "stage_weights"
    params = {p.name for p in plan.spec.params}
    bn_buffers = {m: [f"{m}.running_mean", f"{m}.running_var"] for s in plan.stages
                  for m in s.bn_eval}
    for k, stage in enumerate(plan.stages):
        start = load_file(weights / f"stage{k}_start.safetensors")
        end = load_file(weights / f"stage{k}_end.safetensors")
        trainable = set(stage.trainable)
        for name in start:
            if name in trainable:
                assert not torch.equal(start[name], end[name]), f"stage {k}: {name} never moved"
            elif "." in name and name.rsplit(".", 1)[0] in stage.bn_eval:
                assert torch.equal(start[name], end[name]), f"stage {k}: frozen BN {name} moved"
            elif name in params:
                assert torch.equal(start[name], end[name]), f"stage {k}: frozen {name} moved"
        for module in stage.bn_eval:
            for buf in bn_buffers[module]:
                assert torch.equal(start[buf], end[buf]), f"stage {k}: BN stats of {module} moved"
        if k + 1 < len(plan.stages):
            nxt = load_file(weights / f"stage{k + 1}_start.safetensors")
            assert all(torch.equal(end[n], nxt[n]) for n in end), "rebuild changed weights"
            before = load_file(weights / f"stage{k}_end.moments.safetensors")
            after = load_file(weights / f"stage{k + 1}_start.moments.safetensors")
            carried = [n for n in before if n.split("/", 1)[1] in set(plan.stages[k + 1].trainable)]
            assert carried, "no moments carried"
            for name in carried:
                assert torch.equal(before[name], after[name]), f"moment {name} not carried"
            fresh = set(after) - set(before)
            assert all(float(after[n].abs().max()) == 0 for n in fresh)
    final = load_file(out / "final" / "model.safetensors")
    last = load_file(weights / f"stage{len(plan.stages) - 1}_end.safetensors")
    assert final.keys() == last.keys() and all(torch.equal(final[n], last[n]) for n in final)
    log = (out / "logs" / "rank0.log").read_text()
    assert "final weights identical on 2 ranks" in log
    assert "moments carried for" in log and "received no gradient" not in log
    for rank in (0, 1):
        assert list((out / "tb" / f"rank{rank}").glob("events.out.tfevents.*"))


@pytest.mark.parametrize("backend", ["ddp", "zero2", "fsdp"])
def test_final_weights_load_into_the_model_factory(runs: dict[str, Path], backend: str) -> None:
    for kind in ("final", "best"):  # best/: written collectively by 2 ranks, consolidated
        path = runs[backend] / kind / "model.safetensors"
        model = build_model(ModelConfig(name="resnet18", num_classes=14, pretrained=str(path)))
        assert torch.equal(model.fc.weight, load_file(path)["fc.weight"])
    best = json.loads((runs[backend] / "best" / "metrics.json").read_text())
    assert best["selected_by"]["monitor"] == "val/auroc_mean"
    assert best["auroc_mean"] == best["selected_by"]["value"]


# ZeRO-1 and ZeRO-2 are one DeepSpeed optimizer class (stage_1_and_2); ZeRO-1 keeps its
# three-stage training and state-sharding tests, and these heavier ones run on ZeRO-2 for both.
SHARED_CODE_BACKENDS = ["ddp", "zero2", "zero3", "fsdp"]


@pytest.mark.parametrize("backend", SHARED_CODE_BACKENDS)
def test_resume_mid_epoch_mid_stage_is_bitwise_identical(
    runs: dict[str, Path], backend: str, smoke_data: Path, tmp_path: Path
) -> None:
    first = runs[backend]
    checkpoint = first / "checkpoints" / "step_00000006"
    assert (checkpoint / "COMPLETE").is_file()
    result = launch(["train", str(SMOKE), f"data.root={smoke_data}", f"output_dir={tmp_path}",
                     *COMMON, *BACKENDS[backend], "trainer.save_stage_weights=false",
                     "--resume", str(checkpoint)])
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same_final(first, tmp_path)


def test_a_rank_with_another_plan_stops_every_rank(smoke_data: Path, tmp_path: Path) -> None:
    """Two processes started by hand, one with a different lr: both fail fast, naming it."""
    env = {**os.environ, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "dist_ft", "train", str(SMOKE), f"data.root={smoke_data}",
            f"output_dir={tmp_path}", *COMMON, "trainer.backend=ddp"]
    started = time.monotonic()
    procs = [
        subprocess.Popen(base + (["optim.lr=0.003"] if rank else []), cwd=REPO,
                         env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    elapsed = time.monotonic() - started
    assert all(p.returncode != 0 for p in procs)
    assert elapsed < 60
    for err in errors:
        assert "plan digests differ across ranks at start" in err
        assert "rank 1 vs rank 0" in err and "lr" in err


def _state_elements(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"optimizer state on this rank: (\d+) elements", log)]


@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3", "fsdp"])
def test_sharded_ranks_hold_half_the_optimizer_state(runs: dict[str, Path], backend: str) -> None:
    ddp = _state_elements((runs["ddp"] / "logs" / "rank0.log").read_text())
    for rank in (0, 1):
        zero = _state_elements((runs[backend] / "logs" / f"rank{rank}.log").read_text())
        assert len(zero) == len(ddp) == 3  # one figure per stage
        for full, sharded in zip(ddp, zero, strict=True):
            assert sharded == pytest.approx(full / 2, rel=0.02), (rank, full, sharded)


def test_smoke_recipe_learns_the_synthetic_twin(tmp_path: Path) -> None:
    """The README demo's recipe, as shipped (2 processes, ZeRO-2, 3 stages): AUROC >= 0.9."""
    from dist_ft.data.synth import write_synthetic

    data = tmp_path / "data"
    write_synthetic(data, images=800, size=64, seed=0)
    result = launch(["train", str(SMOKE), f"data.root={data}", f"output_dir={tmp_path / 'run'}"],
                    timeout=600, launcher="accelerate")
    assert result.returncode == 0, result.stderr[-4000:]
    metrics = json.loads((tmp_path / "run" / "final" / "metrics.json").read_text())
    assert metrics["auroc_mean"] >= 0.9, metrics
    # Exact evaluation: every validation image once across the 2 ranks, no padding.
    from dist_ft.config.schema import DataConfig
    from dist_ft.data.datasets import build_dataset

    val = build_dataset(DataConfig(root=str(data), image_size=64, val_fraction=0.2), "val")
    assert metrics["val_samples"] == len(val)


EQUIVALENCE = [
    # Same global batches whatever the world size: batch 8 on 2 ranks = 16 on 1.
    "data.augment.crop_scale=[1.0, 1.0]", "data.augment.ratio=[1.0, 1.0]",
    "data.augment.hflip=false", "data.augment.rotation_deg=0",
    # BatchNorm in eval mode everywhere (per-rank batch statistics legitimately differ).
    "plan.stages[2].exclude=[{regex: 'bn|downsample\\.1'}]",
    "plan.stages[1].exclude=[{regex: 'bn|downsample\\.1'}]",
    "trainer.save_stage_weights=false", "trainer.activation_checkpointing=false",
    "trainer.checkpoint_every_steps=null",
    # Stay within the first epoch's full batches: its last one is padded on 2 ranks.
    "plan.stages[1].start_step=2", "plan.stages[2].start_step=4", "trainer.max_steps=7",
]
# The 2-process runs: 12 images a step whatever the world size (a resume on 1 or 3 processes
# keeps the batches), the moments at each stage boundary, a checkpoint mid-stage before the
# last boundary. Adam as foreach ops: the fused CPU kernel rounds the last bit of exp_avg_sq
# differently for a tensor and for its shards (vector body vs scalar tail); foreach does not.
TWO_PROCESS_EQUIVALENCE = [*EQUIVALENCE, "data.global_batch_size=12",
                           "optim.implementation=foreach", "trainer.save_stage_weights=true",
                           "trainer.checkpoint_every_steps=3"]


@pytest.fixture(scope="module")
def single_process_run(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-process reference: batch 12, the equivalence settings."""
    out = tmp_path_factory.mktemp("one_process")
    result = subprocess.run(
        [sys.executable, "-m", "dist_ft", "train", str(SMOKE), f"data.root={smoke_data}",
         *COMMON, *EQUIVALENCE, "data.batch_size=12", f"output_dir={out}",
         "trainer.backend=ddp"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _relative_gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).norm() / max(float(a[n].norm()), 1e-12))
               for n in a if a[n].is_floating_point() and a[n].numel())


VARIANTS = {"": [], "accum2": ["trainer.grad_accum_steps=2"],
            "noclip": ["trainer.grad_clip_norm=null"]}


@pytest.fixture(scope="module")
def equivalence_runs(smoke_data: Path, tmp_path_factory: pytest.TempPathFactory) -> LazyRuns:
    """2-process runs with the equivalence settings: ``BACKEND`` or ``BACKEND-VARIANT``."""
    def start(key: str) -> Path:
        backend, _, variant = key.partition("-")
        out = tmp_path_factory.mktemp(f"equivalence_{key}")
        result = launch(["train", str(SMOKE), f"data.root={smoke_data}", *COMMON,
                         *TWO_PROCESS_EQUIVALENCE, f"output_dir={out}", *BACKENDS[backend],
                         *VARIANTS[variant]])
        assert result.returncode == 0, result.stderr[-3000:]
        return out

    return LazyRuns(start)


@pytest.mark.parametrize("run", [
    "ddp",  # ZeRO-2 without accumulation: every other ZeRO-2 test
    "ddp-accum2", "zero2-accum2", "fsdp", "fsdp-accum2",
])
def test_two_processes_match_one_over_the_same_global_batches(
    single_process_run: Path, equivalence_runs: LazyRuns, run: str
) -> None:
    one = load_file(single_process_run / "final" / "model.safetensors")
    two = load_file(equivalence_runs[run] / "final" / "model.safetensors")
    assert _relative_gap(one, two) < 1e-5


def test_fsdp_carries_the_moments_ddp_carries(equivalence_runs: LazyRuns) -> None:
    """At each stage boundary FSDP2's Adam moments (gathered from their shards) are DDP's,
    bitwise. Without clipping: the global gradient norm over shards sums in another order
    than over whole tensors, so a clipped step's scale differs in its last bits (6e-6
    relative in the moments after stage 1, measured with trainer.grad_clip_norm=1)."""
    plan = _plan("fsdp")
    for k in range(1, len(plan.stages)):
        for label in (f"stage{k - 1}_end", f"stage{k}_start"):
            fsdp = load_file(equivalence_runs["fsdp-noclip"] / "stage_weights" /
                             f"{label}.moments.safetensors")
            ddp = load_file(equivalence_runs["ddp-noclip"] / "stage_weights" /
                            f"{label}.moments.safetensors")
            assert fsdp.keys() == ddp.keys() and fsdp, label
            different = [n for n in fsdp if not torch.equal(fsdp[n], ddp[n])]
            assert not different, (label, different[:3])


# Each backend's 2-process checkpoint at step 3 (stage 1), resumed on 1 and on 3 processes
# through the boundary at step 4 (whose moments are carried) to step 7. ZeRO-2 as the
# accumulation run: 12 images a step split 3 x 2 x 2, 6 x 1 x 2 or 2 x 3 x 2.
WORLD_CHANGES = {"ddp": "ddp", "zero2": "zero2-accum2", "zero3": "zero3", "fsdp": "fsdp"}


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("backend", list(WORLD_CHANGES))
def test_a_checkpoint_resumes_on_another_number_of_processes(
    equivalence_runs: LazyRuns, smoke_data: Path, tmp_path: Path, backend: str, world: int
) -> None:
    """The resumed run ends within 1e-5 of the uninterrupted 2-process run: same global
    batches, same next samples, the optimizer state carried by name (ZeRO), as whole tensors
    (DDP) or resharded by DCP (FSDP2)."""
    key = WORLD_CHANGES[backend]
    first = equivalence_runs[key]
    checkpoint = first / "checkpoints" / "step_00000003"
    if backend == "fsdp":  # each rank wrote its shards
        assert {p.name for p in (checkpoint / "sharded").glob("*.distcp")} == \
            {"__0_0.distcp", "__1_0.distcp"}
    if backend.startswith("zero"):  # each group's Adam step count, as DeepSpeed kept it
        with safe_open(str(checkpoint / "portable" / "optimizer.safetensors"), "pt") as fh:
            steps = json.loads(fh.metadata()["group_steps"])
        assert steps and all(isinstance(k, int) for k in steps) and max(steps) == 3, steps
    _, _, variant = key.partition("-")
    args = ["train", str(SMOKE), f"data.root={smoke_data}", *COMMON, *TWO_PROCESS_EQUIVALENCE,
            *BACKENDS[backend], *VARIANTS[variant], f"output_dir={tmp_path}",
            "trainer.save_stage_weights=false", "--resume", str(checkpoint)]
    result = launch(args, processes=world) if world > 1 else subprocess.run(
        [sys.executable, "-m", "dist_ft", *args], cwd=REPO, capture_output=True, text=True,
        timeout=300, env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "logs" / "rank0.log").read_text()
    assert f"written by 2 processes, this run has {world}; the global batch stays 12" in log
    assert "at step 3" in log and f"rank 0/{world}" in log
    if backend.startswith("zero"):
        assert "name-keyed weights and moments" in log
    carried = re.search(r"stage 2 '\w+' at step 4: .* moments carried for (\d+) tensors", log)
    assert carried and int(carried.group(1)) > 0, "the boundary inside the resumed segment"
    resumed = load_file(tmp_path / "final" / "model.safetensors")
    uninterrupted = load_file(first / "final" / "model.safetensors")
    assert _relative_gap(uninterrupted, resumed) < 1e-5


def test_another_global_batch_on_resume_is_refused_with_the_fix(
    runs: dict[str, Path], smoke_data: Path, tmp_path: Path
) -> None:
    """Batch 8 per process on 2 processes, resumed on 1: the global batch would halve. The
    fix it names (the global batch of 16, 16 per process on 1) resumes."""
    checkpoint = runs["ddp"] / "checkpoints" / "step_00000006"
    args = [sys.executable, "-m", "dist_ft", "train", str(SMOKE), f"data.root={smoke_data}",
            *COMMON, *BACKENDS["ddp"], "trainer.save_stage_weights=false",
            "--resume", str(checkpoint)]
    result = subprocess.run([*args, f"output_dir={tmp_path / 'refused'}"], cwd=REPO,
                            capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 2, result.stderr[-3000:]
    assert "data.global_batch: checkpoint 16, now 8" in result.stderr
    assert "set data.global_batch_size=16" in result.stderr
    assert "--accept-change data.global_batch" in result.stderr
    result = subprocess.run([*args, f"output_dir={tmp_path / 'fixed'}",
                             "data.global_batch_size=16"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the global batch stays 16 (16 per process)" in \
        (tmp_path / "fixed" / "logs" / "rank0.log").read_text()
    assert "done: 12 steps" in result.stdout


SGD_STEP = [
    *EQUIVALENCE[:4],  # no augmentation
    "plan.stages=[{name: two_groups, start_step: 0, include: [head, layer4], "
    "exclude: [{regex: 'bn|downsample\\.1'}]}]",
    "optim.name=sgd", "optim.momentum=0.0", "optim.weight_decay=0.0", "optim.lr=0.5",
    "optim.groups=[{name: fc, match: [head]}, {name: l4, match: [layer4], lr_scale: 0.1}]",
    "trainer.grad_clip_norm=null", "trainer.max_steps=1", "schedule.name=constant",
    "schedule.warmup_steps=0",
    "trainer.save_stage_weights=true", "trainer.activation_checkpointing=false",
    "data.image_size=32", "data.load_size=32", "data.batch_size=8",
]


def first_global_batch(recipe: Recipe, count: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The first global batch of ``recipe`` (no augmentation), as the model sees it: ranks 0
    and 1 took order[0::2] and order[1::2] of these ``count`` samples."""
    from dist_ft.data.datasets import build_dataset
    from dist_ft.data.sampler import epoch_order
    from dist_ft.data.transforms import BatchAugment, BatchNormalize

    train = build_dataset(recipe.data, "train")
    indices = epoch_order(len(train), recipe.trainer.seed, 0)[:count]
    images = torch.stack([train[int(i)][0] for i in indices])
    targets = torch.stack([train[int(i)][1] for i in indices])
    size = recipe.data.image_size
    augment = BatchAugment(size, (1.0, 1.0), (1.0, 1.0), hflip=False, rotation_deg=0)
    return BatchNormalize()(augment(images)), targets


@pytest.mark.parametrize("backend", SHARED_CODE_BACKENDS)
def test_sgd_step_is_lr_times_gradient_per_group(
    smoke_data: Path, tmp_path: Path, backend: str
) -> None:
    """One plain-SGD step on 2 ranks: each parameter moves by its group's lr x gradient."""
    result = launch(["train", str(SMOKE), f"data.root={smoke_data}", f"output_dir={tmp_path}",
                     *SGD_STEP, *BACKENDS[backend]])
    assert result.returncode == 0, result.stderr[-3000:]
    recipe = load_recipe(SMOKE, [f"data.root={smoke_data}", *SGD_STEP])
    start = load_file(tmp_path / "stage_weights" / "stage0_start.safetensors")
    end = load_file(tmp_path / "stage_weights" / "stage0_end.safetensors")

    x, targets = first_global_batch(recipe)
    model = build_model(ModelConfig(name="resnet18", num_classes=14))
    model.load_state_dict(start)
    model.eval()  # every BatchNorm is frozen in this plan
    torch.nn.functional.binary_cross_entropy_with_logits(model(x), targets).backward()
    lrs = {"fc": 0.5, "layer4": 0.05}
    for name, param in model.named_parameters():
        group = "fc" if name.startswith("fc.") else "layer4" if name.startswith("layer4.") else None
        if group is None or ".bn" in name or "downsample.1" in name:
            assert torch.equal(end[name], start[name]), name
            continue
        expected = start[name] - lrs[group] * param.grad
        assert torch.allclose(end[name], expected, rtol=0, atol=2e-6), (
            name, float((end[name] - expected).abs().max()))
