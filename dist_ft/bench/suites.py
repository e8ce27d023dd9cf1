"""The bench suites' default choices, torch-free: ``dist-ft``'s parser offers them without
importing the suites (every command builds the whole parser, so an import here costs each
command's start-up)."""

from __future__ import annotations

from typing import Any

MEMORY_BACKENDS = ("ddp", "zero1", "zero2", "zero3")
MEMORY_MODELS = ("densenet121", "convnext_base", "vit_l_16")
FREEZE_MODELS = ("densenet121", "vit_b_16")
FREEZE_PLANS: dict[str, list[Any]] = {
    "head": ["head"],
    "last_blocks": ["head", {"last_blocks": 2}],
    "full": ["all"],
}
OPTIMIZER_MODELS = ("resnet18", "densenet121", "convnext_base")
