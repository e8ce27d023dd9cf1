"""``dist-ft bench memory``: per-rank model-state bytes under DDP and ZeRO-1/2/3 vs the formulas.

Each backend runs once on ``processes`` ranks (``accelerate launch``); inside, every model is
built, prepared with dist-ft's own accelerator set-up, optimizer and parameter groups, and
trained one step on a random batch at its native resolution. The bytes are counted from the
tensors the backend really holds (unique storages, so views are not counted twice):

- parameters: the module's parameters (DDP), DeepSpeed's flat parameter buffer (ZeRO-1/2),
  or this rank's partition plus the small parameters ZeRO-3 keeps whole (``ds_persist``);
- gradients, right after backward and before the step: ``.grad`` and DeepSpeed's gradient
  partitions (ZeRO-2/3); its fixed-size bucket buffers are reported apart;
- optimizer state after the step: the optimizer's moments plus DeepSpeed's fp32 master
  partition.

The formulas (ZeRO paper, mixed-precision Adam, P parameters, N ranks): DDP 16P,
ZeRO-1 4P + 12P/N, ZeRO-2 2P + 14P/N, ZeRO-3 16P/N bytes. Their fp32 counterparts (what runs
on CPU, where there is no mixed precision): parameters and gradients take 4 bytes each, DDP's
Adam keeps 8P (no master copy is needed), DeepSpeed keeps 12P/N (it always holds an fp32
master partition): DDP 16P, ZeRO-1 8P + 12P/N, ZeRO-2 4P + 16P/N, ZeRO-3 20P/N.
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
    width = 2 if mixed else 4  # bytes per weight / gradient element DeepSpeed trains in
    stage = int(backend[-1])
    return {"params": width * p / (n if stage == 3 else 1),
            "grads": width * p / (n if stage >= 2 else 1),
            "optimizer": 12 * p / n}  # fp32 master partition + m + v, mixed or not


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None and empty ones skipped)."""
    seen: dict[int, int] = {}
    for t in tensors:
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
                       batch: int = 1) -> Recipe:
    """A recipe training ``model_name`` from scratch under ``backend`` (no data is read)."""
    from dist_ft.config.load import validate_recipe

    trainer = ({"backend": "ddp"} if backend == "ddp"
               else {"backend": "deepspeed", "zero_stage": int(backend[-1])})
    return validate_recipe({
        "model": {"name": model_name, "pretrained": "none", "num_classes": 14},
        "data": {"root": tempfile.gettempdir(), "batch_size": batch, "image_size": image_size},
        "trainer": {**trainer, "grad_clip_norm": None},
        "output_dir": tempfile.gettempdir(),
    })


def measure(acc: Any, recipe: Recipe) -> dict[str, Any]:
    """Build, prepare and step ``recipe.model`` once; this rank's bytes per component.

    Args:
        acc: the process's Accelerator (dist-ft's ``build_accelerator``), reused per model.
        recipe: from :func:`bench_model_recipe`.
    """
    from dist_ft.models.factory import build_model
    from dist_ft.models.spec import describe_model
    from dist_ft.plan import resolve_plan
    from dist_ft.train import engine
    from dist_ft.train.stages import apply_trainable, build_optimizer, optimizer_groups

    model_name, batch, image_size = (recipe.model.name, recipe.data.batch_size,
                                     recipe.data.image_size)
    clock = [time.perf_counter()]
    module = build_model(recipe.model)
    plan = resolve_plan(recipe, describe_model(module, model_name))
    apply_trainable(module, plan.stages[0])
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    optimizer = build_optimizer(recipe.optim, module, optimizer_groups(plan, 0))
    clock.append(time.perf_counter())
    model, optimizer = acc.prepare(module, optimizer)
    clock.append(time.perf_counter())
    deepspeed = engine.is_deepspeed(acc)
    zero_opt = acc.deepspeed_engine_wrapped.engine.optimizer if deepspeed else None
    inner = zero_opt.optimizer if deepspeed else optimizer.optimizer
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
    elements = engine.optimizer_state_elements(acc, model, ("exp_avg", "exp_avg_sq"))
    acc.free_memory()
    del model, optimizer, module, inner, zero_opt, state, grads
    gc.collect()
    seconds = dict(zip(("build", "prepare", "forward_backward", "step"),
                       (b - a for a, b in itertools.pairwise(clock)), strict=True))
    return {**measured, "trainable_params": trainable, "state_elements": elements,
            "mixed": acc.mixed_precision != "no", "seconds": seconds}


def worker(argv: list[str] | None = None) -> int:
    """Entry point run on every rank: measure each model under one backend, write JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--models", required=True)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from dist_ft.train.consistency import gather_objects
    from dist_ft.train.runtime import build_accelerator

    names = args.models.split(",")
    acc = build_accelerator(bench_model_recipe(args.backend, names[0], args.image_size))
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

    The figure per rank is the largest over ranks (they differ only by DeepSpeed's padding).
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
    zero = [r["optimizer_ratio"] for r in rows if r["backend"] != "ddp"]
    return {"rows": rows, "processes": processes, "image_size": image_size,
            "zero_optimizer_ratio_min": min(zero, default=None),
            "zero_optimizer_ratio_max": max(zero, default=None),
            "zero_optimizer_ratio_median": statistics.median(zero) if zero else None}


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
                     f"{'DDP' if r['backend'] == 'ddp' else 'ZeRO-' + r['backend'][-1]} | "
                     + " | ".join(cells) + " |")
    if result["zero_optimizer_ratio_min"] is not None:
        lines.append(f"\nZeRO optimizer state measured / formula: "
                     f"{result['zero_optimizer_ratio_min']:.4f}-"
                     f"{result['zero_optimizer_ratio_max']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(worker())
