"""``dist-ft aggregate`` end to end: every aggregated value against numpy on what was written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.logs.conftest import TAGS, Written

STAT_FUNCS = {"mean": np.mean, "min": np.min, "max": np.max, "std": np.std,
              "median": np.median, "count": len}


def read_csv(path: Path, stats: str = "mean,std,min,max",
             ) -> dict[tuple[str, str, int, str], tuple[float, int]]:
    """(group, tag, step, stat) -> (value, members) from the wide scalars.csv."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    names = stats.split(",")
    assert list(rows[0]) == ["group", "tag", "step", "members", "nonfinite", *names, "label",
                             "since_stage"]
    assert all(r["nonfinite"] == "0" for r in rows)  # no NaN logged
    return {(r["group"], r["tag"], int(r["step"]), stat): (float(r[stat]), int(r["members"]))
            for r in rows for stat in names}


def expected(truth: dict, members: list[tuple[str, int]], tag: str, align: str,
             ) -> dict[int, list[float]]:
    """step -> the members' values, aligned as asked."""
    per = [truth[(run, rank, tag)] for run, rank in members]
    steps = set(per[0])
    for p in per[1:]:
        steps = steps & set(p) if align == "intersection" else steps | set(p)
    return {s: [p[s] for p in per if s in p] for s in sorted(steps)}


def check(table: dict, group: str, tag: str, want: dict[int, list[float]]) -> None:
    steps = sorted({k[2] for k in table if k[0] == group and k[1] == tag})
    assert steps == sorted(want), (group, tag)
    for step, values in want.items():
        for stat, fn in STAT_FUNCS.items():
            if (group, tag, step, stat) not in table:  # not asked for
                continue
            value, members = table[(group, tag, step, stat)]
            assert members == len(values)
            assert value == pytest.approx(float(fn(np.array(values))), rel=1e-12, abs=1e-12), \
                (group, tag, step, stat)


def test_all_ranks_of_each_run(run_cli, log_tree: Written, tmp_path: Path) -> None:
    out = tmp_path / "agg"
    every = "mean,min,max,std,median,count"
    result = run_cli("aggregate", str(log_tree.root), "--out", str(out), "--json", "--stats",
                     every)
    assert result.code == 0, result.err
    table = read_csv(out / "scalars.csv", every)
    assert not (out / "tb").exists()  # event files only with --tensorboard
    for seed in range(3):
        for tag in TAGS:
            want = expected(log_tree.truth, [(f"seed{seed}", 0), (f"seed{seed}", 1)], tag,
                            "intersection")
            check(table, f"seed{seed}", tag, want)
    summary = json.loads(result.out)
    assert summary["members"] == 6
    assert len(summary["problems"]) == 1 and "truncated" in summary["problems"][0]
    assert "truncated" in result.err  # and warned about
    loss = summary["groups"]["seed1"]["train/loss"]
    want = expected(log_tree.truth, [("seed1", 0), ("seed1", 1)], "train/loss", "intersection")
    means = {s: float(np.mean(v)) for s, v in want.items()}
    assert loss["final"] == {"step": 99, "value": pytest.approx(means[99]), "members": 2}
    best = min(means, key=means.get)
    assert loss["best"] == {"step": best, "value": pytest.approx(means[best]), "mode": "min"}
    assert summary["groups"]["seed1"]["val/auroc_mean"]["best"]["mode"] == "max"


@pytest.mark.parametrize("align", ["intersection", "union"])
def test_seeds_grouped_by_a_recipe_key(run_cli, log_tree: Written, tmp_path: Path,
                                       align: str) -> None:
    out = tmp_path / align
    result = run_cli("aggregate", str(log_tree.root), "--out", str(out), "--group-by",
                     "optim.lr", "--align", align, "--plot")
    assert result.code == 0, result.err
    table = read_csv(out / "scalars.csv")
    members = [(f"seed{s}", r) for s in range(3) for r in range(2)]
    for tag in TAGS:
        want = expected(log_tree.truth, members, tag, align)
        check(table, "optim.lr=0.001", tag, want)
    steps = sorted({k[2] for k in table})
    # seed 2 stops at 79, seed 0 rank 1 goes on to 109 (minus a cut record)
    assert steps[-1] == (79 if align == "intersection" else 109)
    assert not (out / "plots").exists()  # --plot with no tag: no plots


def test_tensorboard_reads_the_aggregated_runs(run_cli, log_tree: Written, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "agg"
    assert run_cli("aggregate", str(log_tree.root), "--out", str(out), "--group-by",
                   "trainer.seed", "--stats", "mean,std", "--tags", "train/*",
                   "--tensorboard").code == 0
    runs = sorted(str(p.relative_to(out / "tb")) for p in (out / "tb").glob("*/*"))
    assert runs == [f"trainer.seed-{s}/{stat}" for s in range(3) for stat in ("mean", "std")]
    acc = EventAccumulator(str(out / "tb" / "trainer.seed-2" / "mean"),
                           size_guidance={"scalars": 0})
    acc.Reload()
    assert acc.Tags()["scalars"] == ["train/loss"]
    want = expected(log_tree.truth, [("seed2", 0), ("seed2", 1)], "train/loss", "intersection")
    got = acc.Scalars("train/loss")
    assert [e.step for e in got] == sorted(want)
    # event files hold float32, as every TensorBoard scalar does
    assert [e.value for e in got] == [float(np.float32(np.mean(want[s]))) for s in sorted(want)]
    pngs = sorted(p.name for p in (out / "plots").glob("*.png"))
    assert pngs == ["train_loss.png"] and (out / "plots" / pngs[0]).stat().st_size > 10_000


def test_bad_invocations_name_the_problem(run_cli, log_tree: Written, tmp_path: Path) -> None:
    missing = run_cli("aggregate", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert missing.code == 1 and "no such folder" in missing.err
    (tmp_path / "empty").mkdir()
    empty = run_cli("aggregate", str(tmp_path / "empty"), "--out", str(tmp_path / "o"))
    assert empty.code == 1 and "no TensorBoard event files" in empty.err
    key = run_cli("aggregate", str(log_tree.root), "--out", str(tmp_path / "o"), "--group-by",
                  "optim.lrr")
    assert key.code == 1 and "--group-by optim.lrr" in key.err and "no such recipe key" in key.err
    stats = run_cli("aggregate", str(log_tree.root), "--out", str(tmp_path / "o"), "--stats",
                    "mean,p99")
    assert stats.code == 1 and "--stats: unknown p99" in stats.err
    tags = run_cli("aggregate", str(log_tree.root), "--out", str(tmp_path / "o"), "--tags",
                   "nothing/*")
    assert tags.code == 1 and "no scalar matched" in tags.err
    workers = run_cli("aggregate", str(log_tree.root), "--out", str(tmp_path / "o"),
                      "--workers", "0")
    assert workers.code != 0 and "--workers 0: use 1 or more" in workers.err
