"""The bench suites' default choices, torch-free: ``dist-ft``'s parser offers them without
importing the suites (every command builds the whole parser, so an import here costs each
command's start-up)."""

from __future__ import annotations

from typing import Any

MEMORY_BACKENDS = ("ddp", "zero1", "zero2", "zero3", "fsdp")
MEMORY_MODELS = ("densenet121", "convnext_base", "vit_l_16")
FREEZE_MODELS = ("densenet121", "vit_b_16")
FREEZE_PLANS: dict[str, list[Any]] = {
    "head": ["head"],
    "last_blocks": ["head", {"last_blocks": 2}],
    "full": ["all"],
}
OPTIMIZER_MODELS = ("resnet18", "densenet121", "convnext_base")
# ``bench aggregate``: 20 run folders x 10 tags x 10,000 steps = 2,000,000 points.
AGGREGATE_RUNS, AGGREGATE_TAGS, AGGREGATE_STEPS = 20, 10, 10_000

# ``bench cli``: name -> what follows ``python`` on the command line. ``{configs}`` is the
# repo's configs folder, ``{cxr14}`` a ChestX-ray14 metadata folder, ``{runs}`` a tiny folder
# of event files, ``{tmp}`` a scratch folder. The first two are baselines: the interpreter
# alone, and what importing torch costs on this machine.
CLI_COMMANDS: dict[str, tuple[str, ...]] = {
    "python": ("-c", "pass"),
    "import-torch": ("-c", "import torch"),
    "help": ("-m", "dist_ft", "--help"),
    "plan": ("-m", "dist_ft", "plan", "{configs}/chestxray14_densenet121.yaml", "--json"),
    "data-stats": ("-m", "dist_ft", "data", "stats", "{cxr14}", "--json"),
    "submit": ("-m", "dist_ft", "submit", "{configs}/chestxray14_smoke.yaml", "--dry-run",
               "--nodes", "2"),
    "jobs-help": ("-m", "dist_ft", "jobs", "--help"),
    "aggregate-help": ("-m", "dist_ft", "aggregate", "--help"),
    "aggregate": ("-m", "dist_ft", "aggregate", "{runs}", "--out", "{tmp}/aggregate", "--json"),
    "eval-help": ("-m", "dist_ft", "eval", "--help"),
}
# The README's promise for the start-up of a command without a model (``plan``), seconds.
CLI_TARGET_S = 0.5
