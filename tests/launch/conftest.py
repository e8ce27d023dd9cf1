"""Fixtures for the launcher tests: the project's own single-machine Slurm cluster, data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LAUNCH_VARS, REPO

DEV_CLUSTER = REPO / "slurm" / "dev-cluster"
# Not Slurm's defaults, so a dev cluster someone already runs on this machine is left alone.
TEST_PORTS = {"SLURM_DEV_CTLD_PORT": "6917", "SLURM_DEV_SLURMD_PORT_BASE": "17100"}


def _unavailable(reason: str) -> None:
    if os.environ.get("DIST_FT_REQUIRE_SLURM") == "1":  # CI: a missing cluster is a failure
        pytest.fail(f"the Slurm dev cluster is required here: {reason}")
    pytest.skip(f"{reason} (sudo apt-get install slurm-wlm munge; tests run as root)")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real 2-node Slurm cluster (munge, slurmctld, 2 slurmd) for this test session.

    Yields the environment in which ``sbatch``, ``scontrol`` and ``dist-ft submit`` talk to it.
    """
    if os.geteuid() != 0:
        _unavailable("the dev cluster's daemons must be started as root")
    if not all(shutil.which(p) for p in ("slurmctld", "slurmd", "sbatch", "munged")):
        _unavailable("Slurm is not installed")
    # Not under pytest's tmp_path: munged runs as user munge and must traverse the path.
    folder = Path(tempfile.mkdtemp(prefix="dist-ft-slurm-"))
    folder.chmod(0o755)
    env = {**os.environ, **TEST_PORTS, "SLURM_DEV_NODES": "2"}
    started = subprocess.run(["bash", str(DEV_CLUSTER / "start.sh"), str(folder)], env=env,
                             capture_output=True, text=True, timeout=300)
    if started.returncode != 0:
        pytest.fail(f"dev cluster did not start:\n{started.stdout}\n{started.stderr}")
    cluster_env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    # PATH gains only the sacct stand-in. (Not the venv's bin: its ninja differs from the
    # system's, and each switch of ninja rebuilds DeepSpeed's JIT ops, ~45 s.)
    cluster_env.update(SLURM_CONF=str(folder / "etc" / "slurm.conf"), OMP_NUM_THREADS="1",
                       PATH=f"{folder / 'bin'}:{os.environ['PATH']}", PYTHONUNBUFFERED="1")
    try:
        yield cluster_env
    finally:
        subprocess.run(["bash", str(DEV_CLUSTER / "stop.sh"), str(folder)], env=env,
                       capture_output=True, timeout=120)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def launch_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 200-image synthetic ChestX-ray14 twin at 32 px, shared by the launcher tests."""
    from dist_ft.data.synth import write_synthetic

    root = tmp_path_factory.mktemp("launch_data")
    write_synthetic(root, images=200, size=32, seed=0)
    return root


def small_run(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """Overrides that make the smoke recipe a few-second run at 32 px."""
    return [f"data.root={data}", "data.image_size=32", "data.load_size=32", "data.batch_size=8",
            f"trainer.max_steps={steps}", "trainer.epochs=100", "logging.every_steps=1",
            "schedule.warmup_steps=0", "plan.stages[1].start_step=4",
            "plan.stages[2].start_step=8", f"output_dir={out}", *extra]


def dist_ft(args: list[str], env: dict[str, str], timeout: int = 420,
            ) -> subprocess.CompletedProcess[str]:
    """Run ``dist-ft ARGS`` as a user would, from the repository root."""
    return subprocess.run([sys.executable, "-m", "dist_ft", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def read_status(out: Path) -> dict:
    """The run's status.json, or {} while it does not exist yet."""
    try:
        return json.loads((out / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_until(predicate, timeout: float, what: str, poll: float = 0.5) -> None:
    """Poll ``predicate`` until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
