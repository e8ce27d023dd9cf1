"""A tree of real TensorBoard logs: 3 seeds x 2 ranks x 2 requeued segments, two writers."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

TAGS = ("train/loss", "val/auroc_mean")


@dataclass
class Written:
    """What the fixture wrote, as TensorBoard should show it: (run, rank, tag) -> step->value."""

    root: Path
    truth: dict[tuple[str, int, str], dict[int, float]]
    truncated: Path


def _writer(kind: str, folder: Path, purge_step: int | None):
    if kind == "torch":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(str(folder), purge_step=purge_step)
    from tensorboardX import SummaryWriter as XWriter

    # tensorboardX names files by the second: segments started within one would share a file
    return XWriter(str(folder), purge_step=purge_step, filename_suffix=f".{time.time_ns()}")


def write_segment(kind: str, folder: Path, steps: range, rng: np.random.Generator,
                  purge_step: int | None) -> dict[tuple[str, int], float]:
    """One writer's segment; returns what it wrote (float32, as stored)."""
    written = {}
    writer = _writer(kind, folder, purge_step)
    for step in steps:
        for tag in TAGS:
            value = float(np.float32(rng.normal(1.0, 0.5)))
            writer.add_scalar(tag, value, step)
            written[(tag, step)] = value
    writer.close()
    return written


@pytest.fixture(scope="session")
def log_tree(tmp_path_factory: pytest.TempPathFactory) -> Written:
    """sweep/seed{0,1,2}/tb/rank{0,1}/: segment 1 logs steps 0-59; the requeued segment 2
    starts with purge_step 40 and logs 40-99 (seed 2: 40-79). Rank 0 uses torch's
    SummaryWriter, rank 1 tensorboardX. Seed 0 rank 1 has a third segment (100-109) whose
    last record is cut short, as by a writer killed mid-write."""
    root = tmp_path_factory.mktemp("logs") / "sweep"
    rng = np.random.default_rng(0)
    truth: dict[tuple[str, int, str], dict[int, float]] = {}
    truncated = None
    for seed in range(3):
        run = root / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "recipe.yaml").write_text(yaml.safe_dump(
            {"optim": {"lr": 0.001}, "trainer": {"seed": seed}}))
        for rank in range(2):
            kind = "torch" if rank == 0 else "tensorboardx"
            folder = run / "tb" / f"rank{rank}"
            first = write_segment(kind, folder, range(0, 60), rng, None)
            # Segments start at later wall times, as requeued jobs do. TensorBoard reads a
            # folder's files in name order; torch names them "<second>.<host>.<pid>.<n-th
            # writer of the process>", so two in one second could sort 10 before 9: a new second.
            time.sleep(1.01 - time.time() % 1 if kind == "torch" else 0.01)
            end = 100 if seed != 2 else 80
            second = write_segment(kind, folder, range(40, end), rng, purge_step=40)
            shown = {k: v for k, v in first.items() if k[1] < 40} | second
            if seed == 0 and rank == 1:
                time.sleep(0.01)
                third = write_segment(kind, folder, range(100, 110), rng, purge_step=100)
                truncated = max(folder.glob("events.out.tfevents.*"),
                                key=lambda p: p.stat().st_mtime_ns)
                data = truncated.read_bytes()
                truncated.write_bytes(data[:-7])  # the last record loses its end:
                shown |= {k: v for k, v in third.items() if k != (TAGS[-1], 109)}
            for (tag, step), value in shown.items():
                truth.setdefault((f"seed{seed}", rank, tag), {})[step] = value
    assert truncated is not None
    return Written(root, truth, truncated)
