"""``dist-ft bench freeze``: what freezing saves, step time and memory per freeze plan.

Each (model, plan) runs in its own process (so its peak RSS is its own) on one rank: the
model is built and frozen by dist-ft's plan engine (``resolve_plan`` / ``apply_trainable`` /
BatchNorm policy), the optimizer gets the plan's parameter groups, and a few training steps
run on a random batch. Reported per step: median seconds after one warm-up step, bytes saved
for backward (autograd's saved tensors, counted by a ``saved_tensors_hooks`` pack hook),
gradient and optimizer-state bytes, and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from dist_ft.bench.suites import FREEZE_MODELS, FREEZE_PLANS

DEFAULT_MODELS, PLANS = FREEZE_MODELS, FREEZE_PLANS


def measure(model_name: str, plan: str, batch: int, image_size: int,
            steps: int) -> dict[str, Any]:
    """Train ``steps`` steps of ``model_name`` under ``plan`` in this process.

    On CUDA (when present) the model runs on the GPU in bf16 autocast, timed with
    synchronisation, and the peak is the GPU's allocated peak; on CPU it runs in fp32.
    """
    from dist_ft.bench.memory import storage_bytes
    from dist_ft.config.load import validate_recipe
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
    recipe = validate_recipe({
        "model": {"name": model_name, "pretrained": "none", "num_classes": 14},
        "data": {"root": tempfile.gettempdir(), "batch_size": batch, "image_size": image_size},
        "plan": {"stages": [{"name": plan, "start_step": 0, "include": PLANS[plan]}]},
        "output_dir": tempfile.gettempdir(),
    })
    module = build_model(recipe.model)
    resolved = resolve_plan(recipe, describe_model(module, model_name))
    stage = resolved.stages[0]
    apply_trainable(module, stage)
    optimizer = build_optimizer(recipe.optim, module, optimizer_groups(resolved, 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    module.to(device).train()
    set_bn_modes(module, stage)
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    y = torch.randint(0, 2, (batch, 14), device=device).float()

    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    times, activation_bytes, grads = [], 0, 0
    for _ in range(steps + 1):
        saved.clear()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = module(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), y)
        activation_bytes = sum(saved.values())
        loss.backward()
        optimizer.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        grads = storage_bytes(p.grad for p in module.parameters())
        optimizer.zero_grad()
    state = storage_bytes(t for s in optimizer.state.values() for t in s.values())
    return {
        "model": model_name, "plan": plan, "trainable_params": stage.trainable_params,
        "total_params": sum(p.numel() for p in module.parameters()),
        "bn_frozen": len(stage.bn_eval), "step_s": statistics.median(times[1:]),
        "step_s_min": min(times[1:]), "step_s_max": max(times[1:]),
        "saved_for_backward_bytes": activation_bytes, "grad_bytes": grads,
        "optimizer_bytes": state,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "device": device.type, "threads": torch.get_num_threads(),
    }


def worker(argv: list[str] | None = None) -> int:
    """One (model, plan) measurement, written as JSON to ``--out``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--plan", choices=sorted(PLANS), required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.out.write_text(json.dumps(measure(args.model, args.plan, args.batch, args.image_size,
                                           args.steps)))
    return 0


def bench_freeze(models: Iterable[str] = DEFAULT_MODELS, plans: Iterable[str] = tuple(PLANS),
                 batch: int = 8, image_size: int = 224, steps: int = 3) -> dict[str, Any]:
    """Every (model, plan) in its own process; ratios against the model's full training."""
    from dist_ft.bench.throughput import run_logged

    rows = []
    with tempfile.TemporaryDirectory(prefix="dist-ft-bench-freeze-") as tmp:
        for model in models:
            for plan in plans:
                out = Path(tmp) / f"{model}-{plan}.json"
                run_logged([sys.executable, "-m", "dist_ft.bench.freeze", "--model", model,
                            "--plan", plan, "--batch", str(batch), "--image-size",
                            str(image_size), "--steps", str(steps), "--out", str(out)],
                           out.with_suffix(".log"))
                rows.append(json.loads(out.read_text()))
    for row in rows:
        full = next((r for r in rows if r["model"] == row["model"] and r["plan"] == "full"), None)
        if full is not None:
            row["step_vs_full"] = row["step_s"] / full["step_s"]
            row["saved_vs_full"] = row["saved_for_backward_bytes"] / max(
                1, full["saved_for_backward_bytes"])
    return {"rows": rows, "batch": batch, "image_size": image_size, "steps": steps}


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the figures."""
    mib = 2**20
    lines = [f"freeze plans: one process, batch {result['batch']}, {result['image_size']}px, "
             f"AdamW; median of {result['steps']} steps after one warm-up", "",
             "| model | plan | trainable | step s | vs full | saved for backward MiB | "
             "grads + optimizer MiB | peak RSS MiB |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['model']} | {r['plan']} | {r['trainable_params'] / 1e6:.2f}M / "
            f"{r['total_params'] / 1e6:.1f}M | {r['step_s']:.3f} | "
            f"{r.get('step_vs_full', float('nan')):.2f} | "
            f"{r['saved_for_backward_bytes'] / mib:,.0f} | "
            f"{(r['grad_bytes'] + r['optimizer_bytes']) / mib:,.1f} | "
            f"{r['peak_rss_bytes'] / mib:,.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(worker())
