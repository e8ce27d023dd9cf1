"""DeepSpeed clips exactly as the recipe says: ``trainer.grad_clip_norm: null`` means none.

Accelerate leaves a 0.0 out of DeepSpeed's config and DeepSpeed's default is then 1.0, so
without an explicit setting a run asking for no clipping was clipped at 1.0.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import CONFIGS, REPO, plain_env

pytestmark = pytest.mark.multiprocess

PROBE = """
import sys, torch
from dist_ft.config import load_recipe
from dist_ft.train.runtime import build_accelerator
recipe = load_recipe(sys.argv[1], sys.argv[2:])
acc = build_accelerator(recipe)
model = torch.nn.Linear(4, 2)
model, _ = acc.prepare(model, torch.optim.Adam(model.parameters()))
print("clipping", model.gradient_clipping())
torch.distributed.destroy_process_group()
"""


@pytest.mark.parametrize(("setting", "expected"), [("null", 0.0), ("2.5", 2.5)])
def test_the_deepspeed_engine_clips_as_the_recipe_says(setting: str, expected: float) -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, str(CONFIGS / "chestxray14_smoke.yaml"),
         "trainer.backend=deepspeed", "trainer.zero_stage=2",
         f"trainer.grad_clip_norm={setting}"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=plain_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"clipping {expected}" in result.stdout
