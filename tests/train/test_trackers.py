"""``logging.trackers``: TensorBoard, MLflow and W&B get the same scalars and the recipe.

One tiny run logs to all three (MLflow into its SQLite store under the run folder, W&B offline)
and is resumed once; each tracker is read back with its own library: ``tb/`` with dist-ft's
event reader (what ``aggregate`` uses), MLflow with ``MlflowClient``, W&B from its offline
run file (``run-<id>.wandb``: LevelDB-log framing of W&B's own protobuf records).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dist_ft.logs.aggregate import flatten
from dist_ft.logs.events import read_run
from dist_ft.rundir import RunDir
from tests.conftest import CONFIGS, REPO, plain_env

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
FAST = ["data.image_size=32", "data.load_size=32", "data.batch_size=8", "trainer.backend=ddp",
        "data.val_fraction=0.3", "trainer.checkpoint_every_steps=2", "logging.every_steps=1",
        "logging.trackers=[tensorboard,mlflow,wandb]"]
W_B_KEYS = ("_step", "_runtime", "_timestamp")  # W&B's own history columns


def tracker_free_env() -> dict[str, str]:
    """A plain one-process environment without the user's MLflow / W&B settings."""
    return {k: v for k, v in plain_env().items()
            if not k.startswith(("MLFLOW_", "WANDB_"))}


def train(data: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dist_ft", "train", str(SMOKE), *FAST,
                           f"data.root={data}", f"output_dir={out}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env=tracker_free_env())


# ---------------------------------------------------------------------- readers
def read_tb(out: Path) -> dict[str, dict[int, float]]:
    """``tb/`` as TensorBoard shows it (an interrupted segment's purged steps hidden)."""
    return {tag: dict(zip(s.steps.tolist(), s.values.tolist(), strict=True))
            for tag, s in read_run(RunDir(out).tb).series.items()}


def read_mlflow(out: Path) -> dict[str, Any]:
    """The one MLflow run in the run folder's store, through MLflow's own client."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'trackers' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dist-ft")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    return {"run_id": run.info.run_id, "status": run.info.status, "params": run.data.params,
            "tags": run.data.tags, "history": history}


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``.wandb`` file (W&B's LevelDB-log framing: 32 KiB blocks of
    chunks, each a CRC-32, a length and a FULL/FIRST/MIDDLE/LAST type), checksums verified."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or kind == 0:  # a block's zero trailer
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"{path}: bad checksum at {pos}"
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            records.append(record)
    return records


def read_wandb(out: Path) -> list[dict[str, Any]]:
    """Each offline W&B run segment under the run folder, oldest first."""
    segments = []
    for folder in sorted((out / "trackers" / "wandb").glob("offline-run-*")):
        (file,) = folder.glob("run-*.wandb")
        rows, config, run_id, exit_code = [], {}, None, None
        for record in wandb_records(file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                config.update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in record.history.item})
            elif kind == "exit":
                exit_code = record.exit.exit_code
        segments.append({"run_id": run_id, "config": config, "rows": rows, "exit": exit_code})
    return segments


def wandb_series(rows: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key not in W_B_KEYS:
                series.setdefault(key, {})[row["_step"]] = value
    return series


@dataclass
class Tracked:
    out: Path
    stdout: str
    tb: dict[str, dict[int, float]]  # after the first segment (steps 1-4)
    mlflow: dict[str, Any]
    wandb: list[dict[str, Any]]
    resumed_log: str  # the second segment: resumed from step 3 to step 6
    resumed_tb: dict[str, dict[int, float]]
    resumed_mlflow: dict[str, Any]
    resumed_wandb: list[dict[str, Any]]


@pytest.fixture(scope="module")
def tracked(tiny_cxr14_session: Path, tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    out = tmp_path_factory.mktemp("trackers") / "run"
    first = train(tiny_cxr14_session, out, "trainer.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    readings = read_tb(out), read_mlflow(out), read_wandb(out)
    # Epochs are 3 steps: the resume starts from the epoch-end checkpoint at step 3.
    second = train(tiny_cxr14_session, out, "trainer.max_steps=6", "--resume", "auto",
                   "--accept-change", "trainer.max_steps")
    assert second.returncode == 0, second.stderr[-3000:]
    return Tracked(out, first.stdout, *readings, (out / "logs" / "rank0.log").read_text(),
                   read_tb(out), read_mlflow(out), read_wandb(out))


# ---------------------------------------------------------------------- tests
@pytest.mark.multiprocess
def test_every_tracker_gets_the_same_scalars_at_the_same_steps(tracked: Tracked) -> None:
    tb, history = tracked.tb, tracked.mlflow["history"]
    (segment,) = tracked.wandb
    wandb = wandb_series(segment["rows"])
    for tag in ("train/loss", "train/samples_per_s", "train/stage", "train/grad_norm",
                "val/loss", "val/auroc_mean"):
        assert tag in tb, sorted(tb)
    assert any(t.startswith("lr/") for t in tb) and any(t.startswith("val_auroc/") for t in tb)
    assert sorted(tb["train/loss"]) == [1, 2, 3, 4]
    assert set(history) == set(tb) == set(wandb)
    for tag, points in tb.items():
        # TensorBoard keeps float32; MLflow and W&B the float64 that was logged.
        assert sorted(step for step, _ in history[tag]) == sorted(points), tag
        for step, value in history[tag]:
            assert value == pytest.approx(points[step], rel=1e-6, abs=1e-9), (tag, step)
        assert wandb[tag] == pytest.approx(points, rel=1e-6, abs=1e-9), tag
    assert tracked.mlflow["status"] == "FINISHED" and segment["exit"] == 0


@pytest.mark.multiprocess
def test_the_resolved_recipe_is_every_trackers_hyperparameters(tracked: Tracked) -> None:
    recipe = flatten(yaml.safe_load((tracked.out / "recipe.yaml").read_text()))
    params, config = tracked.mlflow["params"], tracked.wandb[0]["config"]
    assert params["optim.lr"] == str(recipe["optim.lr"])
    assert config["optim.lr"] == recipe["optim.lr"]
    assert params["data.root"] == recipe["data.root"] == config["data.root"]
    assert json.loads(params["logging.trackers"]) == ["tensorboard", "mlflow", "wandb"]
    assert set(recipe) <= set(params) and set(recipe) <= set(config)


@pytest.mark.multiprocess
def test_a_resume_continues_the_same_tracker_runs(tracked: Tracked) -> None:
    run_id = RunDir(tracked.out).run_id()
    # MLflow: the same run (read_mlflow finds exactly one), now through step 6, finished; the
    # changed max_steps keeps its first value (MLflow refuses to change a parameter).
    mlflow = tracked.resumed_mlflow
    assert mlflow["run_id"] == tracked.mlflow["run_id"]
    assert mlflow["tags"]["dist_ft.run_id"] == run_id and mlflow["status"] == "FINISHED"
    # Step 4 came after the checkpoint the run resumed from (3): logged again, MLflow keeps
    # both copies (README, Trackers), TensorBoard shows the second only (below).
    assert sorted(s for s, _ in mlflow["history"]["train/loss"]) == [1, 2, 3, 4, 4, 5, 6]
    assert mlflow["params"]["trainer.max_steps"] == "4"
    assert "MLflow keeps the first value of parameters changed on resume: trainer.max_steps" \
        in tracked.resumed_log
    # W&B: a second offline segment of the same run id (wandb sync joins them), from step 4.
    first, second = tracked.resumed_wandb
    assert first["run_id"] == second["run_id"] == run_id
    assert sorted(wandb_series(second["rows"])["train/loss"]) == [4, 5, 6]
    assert second["config"]["trainer.max_steps"] == 6
    # TensorBoard: the purge hid the first segment's step 4; the resumed values agree.
    tb = tracked.resumed_tb
    assert sorted(tb["train/loss"]) == [1, 2, 3, 4, 5, 6]
    assert tb["train/loss"][4] == pytest.approx(wandb_series(second["rows"])["train/loss"][4])


@pytest.mark.multiprocess
def test_the_run_ends_naming_where_each_tracker_recorded_it(tracked: Tracked) -> None:
    store = tracked.out / "trackers"
    assert f"TensorBoard: tensorboard --logdir {tracked.out / 'tb'}" in tracked.stdout
    assert f"MLflow: mlflow ui --backend-store-uri sqlite:///{store / 'mlflow.db'}" \
        in tracked.stdout
    assert f"W&B: wandb sync {store / 'wandb' / 'offline-run-'}" in tracked.stdout
    runs = json.loads((store / "runs.json").read_text())
    assert runs["mlflow"]["run_id"] == tracked.mlflow["run_id"]


def test_a_missing_tracker_package_fails_before_training(tmp_path: Path) -> None:
    # sys.modules[name] = None makes a package unimportable, as if not installed: wandb, and
    # SQLAlchemy, which MLflow's SQLite store under the run folder needs.
    code = ("import sys; sys.modules['wandb'] = sys.modules['sqlalchemy'] = None; "
            "from dist_ft.cli.main import main; sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", code, "train", str(SMOKE), f"output_dir={tmp_path / 'run'}",
         "logging.trackers=[tensorboard,mlflow,wandb]"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=tracker_free_env())
    assert result.returncode == 2, result.stderr[-2000:]
    assert "logging.trackers: mlflow needs sqlalchemy" in result.stderr
    assert "pip install 'dist-ft[mlflow]'" in result.stderr
    assert "logging.trackers: wandb needs wandb" in result.stderr
    assert "pip install 'dist-ft[wandb]'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_aggregate_explains_a_run_logged_without_tensorboard(run_cli: Any,
                                                             tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "trackers").mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({"logging": {"trackers": ["mlflow"]}}))
    result = run_cli("aggregate", str(run), "--out", str(tmp_path / "agg"))
    assert result.code != 0
    assert "1 run(s) here logged without TensorBoard" in result.err
    assert "tensorboard among logging.trackers" in result.err
    assert os.fspath(run) in result.err
