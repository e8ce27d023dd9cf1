"""``dist-ft bench optimizer``: one AdamW step per kernel (``optim.implementation``).

The model's parameters as DDP steps them (one tensor each) and as one flat tensor (what a
ZeRO rank steps: its fp32 partition), with random gradients; the best of ``repeats`` steps
after one that creates the state. Same process, same tensors, kernels side by side.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import torch

from dist_ft.bench.suites import OPTIMIZER_MODELS

KERNELS = {"for_loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
DEFAULT_MODELS = OPTIMIZER_MODELS


def _step_seconds(params: list[torch.nn.Parameter], kwargs: dict[str, Any],
                  repeats: int) -> float:
    optimizer = torch.optim.AdamW(params, lr=1e-3, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()  # creates the state
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        optimizer.step()
        best = min(best, time.perf_counter() - start)
    return best


def bench_optimizer(models: Iterable[str] = DEFAULT_MODELS, repeats: int = 3) -> dict[str, Any]:
    """Step seconds per (model, layout, kernel); speed-ups against torch's default loop."""
    import torchvision

    rows = []
    for name in models:
        model = torchvision.models.get_model(name, num_classes=14)
        tensors = [p.detach() for p in model.parameters()]
        layouts = {"per_tensor": tensors, "flat": [torch.cat([t.flatten() for t in tensors])]}
        for layout, source in layouts.items():
            row: dict[str, Any] = {"model": name, "layout": layout,
                                   "params": sum(t.numel() for t in source)}
            for kernel, kwargs in KERNELS.items():
                params = [torch.nn.Parameter(t.clone()) for t in source]
                row[f"{kernel}_s"] = _step_seconds(params, kwargs, repeats)
            row["fused_speedup"] = row["for_loop_s"] / row["fused_s"]
            rows.append(row)
    return {"rows": rows, "threads": torch.get_num_threads(), "repeats": repeats}


def format_table(result: dict[str, Any]) -> str:
    """A markdown table of the figures."""
    lines = [f"AdamW step, {result['threads']} threads, best of {result['repeats']}; ms", "",
             "| model | layout | params | for_loop | foreach | fused | fused speed-up |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['layout']} | {r['params'] / 1e6:.1f}M | "
                     f"{r['for_loop_s'] * 1e3:.1f} | {r['foreach_s'] * 1e3:.1f} | "
                     f"{r['fused_s'] * 1e3:.1f} | {r['fused_speedup']:.1f}x |")
    return "\n".join(lines)
