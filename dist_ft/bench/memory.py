"""``dist-ft bench memory``: per-rank model-state bytes under DDP, ZeRO-1/2/3 and FSDP2 vs the
formulas.

Each backend runs once on ``processes`` ranks (``accelerate launch``); inside, every model is
built, prepared with dist-ft's own accelerator set-up, optimizer and parameter groups, and
trained one step on a random batch at its native resolution. The bytes are counted from the
tensors the backend really holds (unique storages, so views are not counted twice):

- parameters: the module's parameters (DDP), DeepSpeed's flat parameter buffer (ZeRO-1/2),
  or this rank's partition plus the small parameters ZeRO-3 keeps whole (``ds_persist``),
  or each parameter's local ``DTensor`` shard (FSDP2, sharded the way the trainer shards);
- gradients, right after backward and before the step: ``.grad`` and DeepSpeed's gradient
  partitions (ZeRO-2/3); its fixed-size bucket buffers are reported apart; under FSDP2 the
  local shards of the reduce-scattered ``.grad``;
- optimizer state after the step: the optimizer's moments (local shards under FSDP2) plus
  DeepSpeed's fp32 master partition.

The formulas (ZeRO paper, mixed-precision Adam, P parameters, N ranks): DDP 16P,
ZeRO-1 4P + 12P/N, ZeRO-2 2P + 14P/N, ZeRO-3 16P/N bytes. Their fp32 counterparts (what runs
on CPU, where there is no mixed precision): parameters and gradients take 4 bytes each, DDP's
Adam keeps 8P (no master copy is needed), DeepSpeed keeps 12P/N (it always holds an fp32
master partition): DDP 16P, ZeRO-1 8P + 12P/N, ZeRO-2 4P + 16P/N, ZeRO-3 20P/N.
FSDP2 shards all three and keeps them fp32 (no master copy: ``mixed_precision.param_dtype``
only sets the dtype of the transient gathered weights a unit computes with): parameters 4P/N,
gradients 4P_t/N, Adam 8P_t/N (P_t trainable; the bench trains all, P_t = P), 16P/N in all.

``--adapters`` (:func:`bench_adapters`) compares a LoRA plan with full fine-tuning: the
formulas on the plan engine's counts for every model, a ZeRO-2 run per measured model that
also writes the checkpoint the trainer would (lean in the adapter stage) and counts its
bytes, and the step time of head-only / LoRA / full training in one process.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dist_ft.bench.suites import MEMORY_BACKENDS, MEMORY_MODELS
from dist_ft.config.schema import Recipe

BACKENDS, DEFAULT_MODELS = MEMORY_BACKENDS, MEMORY_MODELS
COMPONENTS = ("params", "grads", "optimizer")


def formula_bytes(backend: str, params: int, world: int, mixed: bool) -> dict[str, float]:
    """Per-rank bytes of each component by the ZeRO formulas (``mixed``) or their fp32 twins."""
    p, n = float(params), float(world)
    if backend == "ddp":  # fp32 weights and grads (AMP keeps them too) + Adam's m and v: 16P
        return {"params": 4 * p, "grads": 4 * p, "optimizer": 8 * p}
    if backend == "fsdp":  # fp32 shards of weights, grads, m and v, mixed or not: 16P/N
        return {"params": 4 * p / n, "grads": 4 * p / n, "optimizer": 8 * p / n}
    width = 2 if mixed else 4  # bytes per weight / gradient element DeepSpeed trains in
    stage = int(backend[-1])
    return {"params": width * p / (n if stage == 3 else 1),
            "grads": width * p / (n if stage >= 2 else 1),
            "optimizer": 12 * p / n}  # fp32 master partition + m + v, mixed or not


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None and empty ones skipped; a
    ``DTensor`` counts as its local shard's storage, FSDP2's padding included)."""
    from torch.distributed.tensor import DTensor

    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, DTensor):
            t = t.to_local()
        if isinstance(t, torch.Tensor) and t.numel() > 0:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _flatten(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [t for v in value.values() for t in _flatten(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return [value]


def _attrs(obj: Any, names: Iterable[str]) -> list[Any]:
    return [t for name in names for t in _flatten(getattr(obj, name, None))]


_GRAD_PARTITIONS = ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer")
_GRAD_BUCKETS = ("ipg_buffer", "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer")
_PARAM_FLATS = ("bit16_groups_flat", "fp16_partitioned_groups_flat")
_MASTERS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat")


def _param_tensors(module: torch.nn.Module, zero_opt: Any) -> list[Any]:
    tensors: list[Any] = []
    for p in module.parameters():
        tensors.append(getattr(p, "ds_tensor", None))  # ZeRO-3: this rank's partition
        tensors.append(p.data)  # empty under ZeRO-3 unless the parameter persists whole
    return tensors + _attrs(zero_opt, _PARAM_FLATS)


def bench_model_recipe(backend: str, model_name: str, image_size: int,
                       batch: int = 1, plan: str | None = None) -> Recipe:
    """A recipe training ``model_name`` from scratch under ``backend`` (no data is read).

    Args:
        plan: one of :data:`ADAPTER_PLANS` as a one-stage plan; None: the default plan.
    """
    from dist_ft.config.load import validate_recipe

    trainer = ({"backend": backend} if backend in ("ddp", "fsdp")
               else {"backend": "deepspeed", "zero_stage": int(backend[-1])})
    doc: dict[str, Any] = {
        "model": {"name": model_name, "pretrained": "none", "num_classes": 14},
        "data": {"root": tempfile.gettempdir(), "batch_size": batch, "image_size": image_size},
        "trainer": {**trainer, "grad_clip_norm": None},
        "output_dir": tempfile.gettempdir(),
    }
    if plan is not None:
        doc["plan"] = {"stages": [plan_stage(plan, model_name)]}
    return validate_recipe(doc)


# ``bench memory --adapters``: LoRA r=8 on every encoder block's MLP Linear layers of a ViT
# (torchvision's MultiheadAttention has no Linear q/k/v and reads out_proj's weight directly,
# so the MLP is what an adapter can train there) with the head training, vs the head alone
# and full training.
ADAPTER_MODELS = ("vit_b_16", "vit_l_16")
ADAPTER_PLANS = ("head", "lora", "full")
LORA_R, LORA_ALPHA = 8, 16
VIT_LORA_TARGET: list[Any] = [{"glob": "encoder.layers"}, "mlp"]
CHECKPOINT_FILES = ("model", "optimizer", "other")


def lora_target(model_name: str) -> list[Any]:
    """The LoRA target rules the bench uses: a ViT's encoder blocks' Linear layers; for any
    other model the Linear/Conv2d layers of its last two blocks (small models in tests)."""
    return VIT_LORA_TARGET if model_name.startswith("vit_") else [{"last_blocks": 2}]


def plan_stage(plan: str, model_name: str) -> dict[str, Any]:
    """The one stage of ``plan`` (``head``, ``lora``, ``full``) as a recipe's YAML would say."""
    if plan not in ADAPTER_PLANS:
        raise ValueError(f"plan {plan!r}: use one of {', '.join(ADAPTER_PLANS)}")
    stage: dict[str, Any] = {"name": plan, "start_step": 0,
                             "include": ["all"] if plan == "full" else ["head"]}
    if plan == "lora":
        stage["adapters"] = {"kind": "lora", "r": LORA_R, "alpha": LORA_ALPHA,
                             "target": lora_target(model_name)}
    return stage


def measure(acc: Any, recipe: Recipe, checkpoint: Path | None = None) -> dict[str, Any]:
    """Build, prepare and step ``recipe.model`` once; this rank's bytes per component.

    Args:
        acc: the process's Accelerator (dist-ft's ``build_accelerator``), reused per model.
        recipe: from :func:`bench_model_recipe`; an adapter stage's adapters are injected.
        checkpoint: a scratch run folder: after the step, write a checkpoint there as the
            trainer does (lean in an adapter stage), count its files' bytes, delete it.
    """
    from dist_ft.models.adapters import adapt
    from dist_ft.models.factory import build_model
    from dist_ft.models.spec import describe_model
    from dist_ft.plan import resolve_plan
    from dist_ft.train import engine
    from dist_ft.train.fsdp import shard_model
    from dist_ft.train.stages import apply_trainable, build_optimizer, optimizer_groups

    model_name, batch, image_size = (recipe.model.name, recipe.data.batch_size,
                                     recipe.data.image_size)
    clock = [time.perf_counter()]
    module = build_model(recipe.model)
    plan = resolve_plan(recipe, describe_model(module, model_name))
    module = adapt(module, None, plan.stages[0].adapters)
    apply_trainable(module, plan.stages[0])
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    groups = optimizer_groups(plan, 0)
    clock.append(time.perf_counter())
    # As the trainer's StageSwitcher: FSDP2 shards by the plan's blocks, then the optimizer
    # is built over the DTensors; the other backends go through Accelerate's prepare.
    block_of, cfg = plan.stages[0].spec.blocks.block_of, recipe.trainer.fsdp
    model, optimizer = engine.prepare(
        acc, module, lambda m: build_optimizer(recipe.optim, m, groups),
        (lambda m: shard_model(m, block_of, cfg, acc.device))
        if recipe.trainer.backend == "fsdp" else None)
    clock.append(time.perf_counter())
    deepspeed = engine.is_deepspeed(acc)
    zero_opt = acc.deepspeed_engine_wrapped.engine.optimizer if deepspeed else None
    inner = zero_opt.optimizer if deepspeed else getattr(optimizer, "optimizer", optimizer)
    module = engine.unwrap(acc, model)

    x = torch.randn(batch, 3, image_size, image_size, device=acc.device)
    y = torch.randint(0, 2, (batch, 14), device=acc.device).float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
    if deepspeed:
        ds = acc.deepspeed_engine_wrapped.engine
        ds.backward(loss)
    else:
        acc.backward(loss)
    clock.append(time.perf_counter())
    grads = [p.grad for p in module.parameters()] + _attrs(zero_opt, _GRAD_PARTITIONS)
    measured = {"grads": storage_bytes(grads),
                "grad_buckets": storage_bytes(_attrs(zero_opt, _GRAD_BUCKETS))}
    if deepspeed:
        ds.step()
    else:
        optimizer.step()
        optimizer.zero_grad()
    clock.append(time.perf_counter())
    state = [t for s in inner.state.values() for t in _flatten(s)]
    measured["optimizer"] = storage_bytes(state + _attrs(zero_opt, _MASTERS))
    measured["params"] = storage_bytes(_param_tensors(module, zero_opt))
    # The formulas' "mixed precision" is 16-bit weights and gradients over fp32 masters;
    # dist-ft's bf16 is autocast over fp32 weights (engine and formula alike fp32).
    mixed = any(p.element_size() == 2 for p in module.parameters())
    elements = engine.optimizer_state_elements(acc, model, ("exp_avg", "exp_avg_sq"))
    if checkpoint is not None:
        measured["checkpoint"] = checkpoint_bytes(acc, checkpoint, plan.stages[0].adapters
                                                  is not None)
    acc.free_memory()
    del model, optimizer, module, inner, zero_opt, state, grads
    gc.collect()
    seconds = dict(zip(("build", "prepare", "forward_backward", "step"),
                       (b - a for a, b in itertools.pairwise(clock)), strict=True))
    return {**measured, "trainable_params": trainable, "state_elements": elements,
            "mixed": mixed, "seconds": seconds}


def worker(argv: list[str] | None = None) -> int:
    """Entry point run on every rank: measure each model under one backend, write JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--plans", default="",
                        help="comma-separated ADAPTER_PLANS: results keyed MODEL/PLAN")
    parser.add_argument("--checkpoint", type=Path,
                        help="scratch folder: also write and measure a checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from dist_ft.train.consistency import gather_objects
    from dist_ft.train.runtime import build_accelerator

    names = args.models.split(",")
    acc = build_accelerator(bench_model_recipe(args.backend, names[0], args.image_size))
    if args.plans:
        results = {f"{name}/{plan}": gather_objects(measure(
            acc, bench_model_recipe(args.backend, name, args.image_size, plan=plan),
            args.checkpoint)) for name in names for plan in args.plans.split(",")}
    else:
        results = {name: gather_objects(measure(acc, bench_model_recipe(args.backend, name,
                                                                        args.image_size)))
                   for name in names}
    if torch.distributed.get_rank() == 0:
        args.out.write_text(json.dumps({"backend": args.backend, "models": results,
                                        "world_size": torch.distributed.get_world_size()}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    return 0


def bench_memory(models: Iterable[str] = DEFAULT_MODELS, backends: Iterable[str] = BACKENDS,
                 processes: int = 2, image_size: int = 224) -> dict[str, Any]:
    """Run each backend once on ``processes`` ranks; compare every component with its formula.

    The figure per rank is the largest over ranks (they differ only by DeepSpeed's padding,
    or by FSDP2's dim-0 split: a tensor of one row, such as a ViT's position embedding, lies
    whole on rank 0).
    """
    from dist_ft.bench.throughput import launch_command, run_logged

    models = list(models)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dist-ft-bench-memory-") as tmp:
        for backend in backends:
            out = Path(tmp) / f"{backend}.json"
            timing = run_logged(launch_command(processes, [
                "dist_ft.bench.memory", "--backend", backend, "--models", ",".join(models),
                "--image-size", str(image_size), "--out", str(out)]), Path(tmp) / f"{backend}.log")
            found = json.loads(out.read_text())
            for name in models:
                ranks = found["models"][name]
                params = ranks[0]["trainable_params"]
                formula = formula_bytes(backend, params, found["world_size"], ranks[0]["mixed"])
                row: dict[str, Any] = {"model": name, "backend": backend, "num_params": params,
                                       "world_size": found["world_size"],
                                       "mixed_precision": ranks[0]["mixed"], **timing,
                                       "state_elements": max(r["state_elements"] for r in ranks)}
                for c in COMPONENTS:
                    row[c] = max(r[c] for r in ranks)
                    row[f"{c}_formula"] = formula[c]
                    row[f"{c}_ratio"] = row[c] / formula[c]
                row["grad_buckets"] = max(r["grad_buckets"] for r in ranks)
                row["seconds"] = ranks[0]["seconds"]  # rank 0's build/prepare/step times
                row["total"] = sum(row[c] for c in COMPONENTS)
                row["total_formula"] = sum(formula.values())
                row["total_ratio"] = row["total"] / row["total_formula"]
                rows.append(row)
    zero = [r["optimizer_ratio"] for r in rows if r["backend"].startswith("zero")]
    fsdp = [r["optimizer_ratio"] for r in rows if r["backend"] == "fsdp"]
    return {"rows": rows, "processes": processes, "image_size": image_size,
            "zero_optimizer_ratio_min": min(zero, default=None),
            "zero_optimizer_ratio_max": max(zero, default=None),
            "zero_optimizer_ratio_median": statistics.median(zero) if zero else None,
            "fsdp_optimizer_ratio_min": min(fsdp, default=None),
            "fsdp_optimizer_ratio_max": max(fsdp, default=None)}


def backend_title(backend: str) -> str:
    """A :data:`BACKENDS` name as the tables write it: ``DDP``, ``ZeRO-2``, ``FSDP2``."""
    return {"ddp": "DDP", "fsdp": "FSDP2"}.get(backend) or f"ZeRO-{backend[-1]}"


def format_table(result: dict[str, Any]) -> str:
    """A markdown table: measured MiB per rank and measured / formula per component."""
    mixed = any(r["mixed_precision"] for r in result["rows"])
    lines = [f"model-state memory per rank, world size {result['processes']}, "
             f"{'mixed-precision' if mixed else 'fp32'} Adam(W); MiB measured (measured / "
             "formula)", "",
             "| model | params | backend | parameters | gradients | optimizer state | total |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        cells = [f"{r[c] / 2**20:,.1f} ({r[f'{c}_ratio']:.3f})" for c in (*COMPONENTS, "total")]
        lines.append(f"| {r['model']} | {r['num_params'] / 1e6:.1f}M | "
                     f"{backend_title(r['backend'])} | "
                     + " | ".join(cells) + " |")
    if result["zero_optimizer_ratio_min"] is not None:
        lines.append(f"\nZeRO optimizer state measured / formula: "
                     f"{result['zero_optimizer_ratio_min']:.4f}-"
                     f"{result['zero_optimizer_ratio_max']:.4f}")
    if result.get("fsdp_optimizer_ratio_min") is not None:
        lines.append(f"FSDP2 optimizer state measured / formula 8P/N: "
                     f"{result['fsdp_optimizer_ratio_min']:.4f}-"
                     f"{result['fsdp_optimizer_ratio_max']:.4f}")
    return "\n".join(lines)


def _file_kind(name: str) -> str:
    """Which part of a checkpoint a file of Accelerate's / DeepSpeed's ``save_state`` holds."""
    if "optim" in name:  # zero_pp_rank_*_optim_states.pt, optimizer.bin
        return "optimizer"
    if name.startswith(("mp_rank_", "model", "pytorch_model")):
        return "model"
    return "other"  # RNG states, rank files, trainer state, DeepSpeed's zero_to_fp32.py


def checkpoint_bytes(acc: Any, folder: Path, lean: bool) -> dict[str, int]:
    """Write a checkpoint as the trainer does (``lean``: an adapter stage's), return its bytes
    by part (:data:`CHECKPOINT_FILES`, counted on the main process), and delete it."""
    from dist_ft.rundir import RunDir
    from dist_ft.train.checkpoint import remove_checkpoint, save_checkpoint

    path = save_checkpoint(acc, RunDir(folder), 1, {"run_id": "bench-memory"}, {}, keep_last=1,
                           changed_frozen={} if lean else None)
    sizes = dict.fromkeys(CHECKPOINT_FILES, 0)
    if acc.is_main_process:
        for f in path.rglob("*"):
            if f.is_file():
                sizes[_file_kind(f.name)] += f.stat().st_size
        remove_checkpoint(path)
    acc.wait_for_everyone()
    return sizes


def adapter_formula(model_name: str, world: int, image_size: int = 224) -> list[dict[str, Any]]:
    """The LoRA and full plans of ``model_name`` counted by the plan engine (meta-device
    builds, nothing trains), with the formulas' bytes for ``T`` trainable of ``P`` parameters:

    - optimizer state per rank: DDP 8T (Adam's m and v, fp32), ZeRO-1/2/3 12T/N (plus the fp32
      master partition DeepSpeed always keeps);
    - a ZeRO checkpoint: the model file's weights (only the T trainable in a lean adapter
      checkpoint, all P otherwise; 4 bytes each in fp32, 2 under bf16 mixed precision) plus
      every rank's optimizer partition (12T in all). Buffers and file overhead are left out.
    """
    from dist_ft.models.spec_cache import fast_model_spec
    from dist_ft.plan import resolve_plan

    rows = []
    for plan in ("lora", "full"):
        recipe = bench_model_recipe("zero2", model_name, image_size, plan=plan)
        resolved = resolve_plan(recipe, fast_model_spec(recipe.model))
        stage = resolved.stages[0]
        t, p = stage.trainable_params, resolved.spec.num_params
        saved = t if stage.adapters is not None else p
        rows.append({"model": model_name, "plan": plan, "num_params": p, "trainable_params": t,
                     "adapter_params": stage.adapter_params,
                     "adapter_modules": len(stage.adapters.modules) if stage.adapters else 0,
                     "world_size": world, "optimizer_ddp": 8 * t,
                     "optimizer_zero": 12 * t / world,
                     "checkpoint_fp32": 4 * saved + 12 * t,
                     "checkpoint_mixed": 2 * saved + 12 * t})
    return rows


def time_plans(model_name: str, batch: int = 4, image_size: int = 224, steps: int = 3,
               plans: Iterable[str] = ADAPTER_PLANS) -> list[dict[str, Any]]:
    """Seconds per training step of each plan in this process (CPU fp32, AdamW), round-robin:
    every round times one step of each plan, so a busy machine slows them alike. Median of
    ``steps`` rounds after one warm-up round."""
    from dist_ft.models.adapters import adapt
    from dist_ft.models.factory import build_model
    from dist_ft.models.spec import describe_model
    from dist_ft.plan import resolve_plan
    from dist_ft.train.stages import (
        apply_trainable,
        build_optimizer,
        optimizer_groups,
        set_bn_modes,
    )

    torch.manual_seed(0)
    runs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer, int]] = {}
    for plan in plans:
        recipe = bench_model_recipe("ddp", model_name, image_size, batch, plan=plan)
        module = build_model(recipe.model)
        resolved = resolve_plan(recipe, describe_model(module, model_name))
        stage = resolved.stages[0]
        module = adapt(module, None, stage.adapters)
        apply_trainable(module, stage)
        optimizer = build_optimizer(recipe.optim, module, optimizer_groups(resolved, 0))
        module.train()
        set_bn_modes(module, stage)
        runs[plan] = (module, optimizer, stage.trainable_params)
    x = torch.randn(batch, 3, image_size, image_size)
    y = torch.randint(0, 2, (batch, 14)).float()
    times: dict[str, list[float]] = {plan: [] for plan in runs}
    for _ in range(steps + 1):
        for plan, (module, optimizer, _t) in runs.items():
            start = time.perf_counter()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(module(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[plan].append(time.perf_counter() - start)
    rows = [{"model": model_name, "plan": plan, "trainable_params": runs[plan][2],
             "step_s": statistics.median(ts[1:]), "step_s_min": min(ts[1:]),
             "step_s_max": max(ts[1:])} for plan, ts in times.items()]
    full = next((r["step_s"] for r in rows if r["plan"] == "full"), None)
    for row in rows:
        row["step_vs_full"] = row["step_s"] / full if full else None
    del runs
    gc.collect()
    return rows


def bench_adapters(models: Iterable[str] = ADAPTER_MODELS,
                   measure_models: Iterable[str] = ("vit_b_16",), time_model: str | None =
                   "vit_b_16", processes: int = 2, image_size: int = 224, batch: int = 4,
                   steps: int = 3) -> dict[str, Any]:
    """``bench memory --adapters``: LoRA vs full fine-tuning.

    Args:
        models: counted by the plan engine and the formulas (:func:`adapter_formula`).
        measure_models: also measured by one ZeRO-2 launch on ``processes`` CPU ranks: the
            optimizer state each rank holds after a step and the bytes of the checkpoint the
            trainer writes (lean for LoRA), vs the formulas.
        time_model: step time of head / LoRA / full in one process (:func:`time_plans`).
    """
    from dist_ft.bench.throughput import launch_command, run_logged

    formula = {(r["model"], r["plan"]): r for m in models
               for r in adapter_formula(m, processes, image_size)}
    measure_models = list(measure_models)
    measured = []
    if measure_models:
        with tempfile.TemporaryDirectory(prefix="dist-ft-bench-adapters-") as tmp:
            out = Path(tmp) / "zero2.json"
            timing = run_logged(launch_command(processes, [
                "dist_ft.bench.memory", "--backend", "zero2", "--models",
                ",".join(measure_models), "--image-size", str(image_size), "--plans",
                "lora,full", "--checkpoint", str(Path(tmp) / "run"), "--out", str(out)]),
                Path(tmp) / "zero2.log")
            found = json.loads(out.read_text())
        for name in measure_models:
            for f in adapter_formula(name, found["world_size"], image_size):
                ranks = found["models"][f"{name}/{f['plan']}"]
                mixed = ranks[0]["mixed"]
                ckpt = ranks[0]["checkpoint"]  # counted on the main process
                total = sum(ckpt.values())
                expected = f["checkpoint_mixed" if mixed else "checkpoint_fp32"]
                measured.append({
                    "model": name, "plan": f["plan"], "backend": "zero2",
                    "world_size": found["world_size"], "mixed_precision": mixed,
                    "trainable_params": ranks[0]["trainable_params"],
                    "optimizer": max(r["optimizer"] for r in ranks),
                    "optimizer_formula": f["optimizer_zero"],
                    "optimizer_ratio": max(r["optimizer"] for r in ranks) / f["optimizer_zero"],
                    "checkpoint": ckpt, "checkpoint_total": total,
                    "checkpoint_formula": expected, "checkpoint_ratio": total / expected,
                    "launch_s": timing.get("wall_s")})
    steps_rows = time_plans(time_model, batch, image_size, steps) if time_model else []
    return {"formula": list(formula.values()), "measured": measured, "step_time": steps_rows,
            "processes": processes, "image_size": image_size, "batch": batch, "steps": steps,
            "lora": {"r": LORA_R, "alpha": LORA_ALPHA}}


def _size(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def format_adapters_table(result: dict[str, Any]) -> str:
    """Markdown tables of ``bench memory --adapters``: formulas, measured bytes, step time."""
    n = result["processes"]
    lora = result["lora"]
    lines = [f"LoRA r={lora['r']} (alpha {lora['alpha']}; ViTs: every encoder block's MLP Linear "
             "layers, other models: their last 2 blocks') + head vs full fine-tuning; formula "
             f"on the plan engine's counts (T trainable of P), N={n} ranks",
             "", "| model | plan | trainable T | optimizer state / rank, DDP 8T | ZeRO 12T/N | "
             "ZeRO checkpoint fp32 | bf16 mixed |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["formula"]:
        lines.append(f"| {r['model']} | {r['plan']} | {r['trainable_params']:,} of "
                     f"{r['num_params'] / 1e6:.1f}M | {_size(r['optimizer_ddp'])} | "
                     f"{_size(r['optimizer_zero'])} | {_size(r['checkpoint_fp32'])} | "
                     f"{_size(r['checkpoint_mixed'])} |")
    if result["measured"]:
        lines += ["", f"measured: ZeRO-2 on {n} CPU processes, one step, then the checkpoint the "
                  "trainer writes (lean for LoRA); measured (measured / formula)", "",
                  "| model | plan | optimizer state / rank | checkpoint model file | "
                  "optimizer files | other | total |", "|---|---|---:|---:|---:|---:|---:|"]
        for r in result["measured"]:
            c = r["checkpoint"]
            lines.append(f"| {r['model']} | {r['plan']} | {_size(r['optimizer'])} "
                         f"({r['optimizer_ratio']:.3f}) | {_size(c['model'])} | "
                         f"{_size(c['optimizer'])} | {_size(c['other'])} | "
                         f"{_size(r['checkpoint_total'])} ({r['checkpoint_ratio']:.3f}) |")
    if result["step_time"]:
        lines += ["", f"step time: one CPU process, batch {result['batch']}, "
                  f"{result['image_size']}px, AdamW fp32; median of {result['steps']} "
                  "round-robin steps after a warm-up", "",
                  "| model | plan | trainable | step s | min-max | vs full |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in result["step_time"]:
            vs = f"{r['step_vs_full']:.2f}" if r["step_vs_full"] else "-"
            lines.append(f"| {r['model']} | {r['plan']} | {r['trainable_params']:,} | "
                         f"{r['step_s']:.3f} | {r['step_s_min']:.3f}-{r['step_s_max']:.3f} | "
                         f"{vs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(worker())
