"""``dist-ft eval`` under ``accelerate launch`` (2 gloo processes) equals the 1-process eval."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dist_ft.train.eval_record import read_evaluations
from tests.cli.test_eval_run_folder import make_run
from tests.conftest import REPO, plain_env

pytestmark = pytest.mark.multiprocess

ARGS = ["--split", "test", "--resamples", "50", "--json"]


def _eval(argv: list[str], env: dict[str, str]) -> dict:
    result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)  # one JSON document: only the main process prints


def test_two_processes_score_every_image_once_and_equal_one_process(tmp_path: Path) -> None:
    from dist_ft.data.synth import write_synthetic

    # 71 test images: an odd count, so the two ranks' shares differ in size.
    write_synthetic(tmp_path / "twin", images=300, size=32, seed=2)
    run = make_run(tmp_path / "run", tmp_path / "twin")
    one = _eval([sys.executable, "-m", "dist_ft", "eval", str(run), *ARGS,
                 "--out", str(tmp_path / "one")], plain_env())
    accelerate = str(Path(sys.executable).parent / "accelerate")
    two = _eval([accelerate, "launch", "--config_file", str(REPO / "launch/cpu_2proc.yaml"),
                 "-m", "dist_ft", "eval", str(run), *ARGS, "--out", str(tmp_path / "two")],
                {**os.environ, "OMP_NUM_THREADS": "1"})
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["images"] == two["images"] and one["images"] % 2 == 1
    a, b = np.load(tmp_path / "one" / "scores_test.npz"), np.load(tmp_path / "two" /
                                                                   "scores_test.npz")
    assert a["images"].tolist() == b["images"].tolist()  # dataset order, no duplicates
    assert len(set(a["images"].tolist())) == one["images"]
    np.testing.assert_array_equal(a["targets"], b["targets"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=0, atol=1e-6)
    for name, row in one["classes"].items():
        other = two["classes"][name]
        assert (row["positives"], row["negatives"]) == (other["positives"], other["negatives"])
        assert row["auroc"] == pytest.approx(other["auroc"], abs=1e-6, nan_ok=True)
    assert one["mean"]["auroc"] == pytest.approx(two["mean"]["auroc"], abs=1e-6)
    assert one["operating_points"].keys() == two["operating_points"].keys()
    # One record line per eval (the main process alone writes).
    assert [e["split"] for e in read_evaluations(run / "evaluations.jsonl")] == ["test", "test"]
