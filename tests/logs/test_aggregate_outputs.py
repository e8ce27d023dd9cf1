"""NaN and inf as data, -0.0 kept, outputs that read back exactly: scalars.csv through the csv
module, the event files (only with --tensorboard) through TensorBoard's EventAccumulator."""

from __future__ import annotations

import csv
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from dist_ft.logs import outputs
from dist_ft.logs.aggregate import DEFAULT_STATS, STATS, aggregate
from dist_ft.logs.report import aggregate_runs
from dist_ft.logs.runs import load_members

NAN, INF = math.nan, math.inf
# train/loss per rank at steps 0-3: rank 0 logs NaN at step 2, rank 1 inf at step 3.
LOSS = {0: [1.0, 0.5, NAN, 0.25], 1: [0.75, 0.75, 0.5, INF]}
EVERY = ",".join(STATS)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """run/tb/rank{0,1}: torch's SummaryWriter, as the trainer logs; rank 1 alone logs
    train/zero = -0.0 at step 0."""
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path_factory.mktemp("nonfinite") / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("trainer: {seed: 0}\n")  # the ranks' run: one group
    for rank, values in LOSS.items():
        writer = SummaryWriter(str(run / "tb" / f"rank{rank}"))
        for step, value in enumerate(values):
            writer.add_scalar("train/loss", value, step)
        if rank == 1:
            writer.add_scalar("train/zero", -0.0, 0)
        writer.close()
    return run


def bits(value: float) -> bytes:
    return struct.pack("<d", value)


def same(a: float, b: float) -> bool:
    """Equal bit for bit; NaN equals NaN (a CSV's ``nan`` carries no sign or payload)."""
    return (math.isnan(a) and math.isnan(b)) or bits(a) == bits(b)


def test_nan_and_inf_propagate_and_are_counted(ranks: Path, tmp_path: Path) -> None:
    summary = aggregate_runs([ranks], tmp_path / "agg", stats=STATS, plot=[])
    members, root = load_members([ranks], workers=1)
    (loss,) = [a for a in aggregate(members, ["run"], ["train/loss"], list(STATS),
                                    "intersection", root)]
    assert loss.members.tolist() == [2, 2, 2, 2]
    assert loss.nonfinite.tolist() == [0, 0, 1, 1]
    mean, std = loss.stats["mean"], loss.stats["std"]
    assert mean[:2].tolist() == [0.875, 0.625] and math.isnan(mean[2]) and mean[3] == INF
    assert math.isnan(std[2]) and math.isnan(std[3])  # inf - inf, as numpy's np.std
    assert loss.stats["min"][3] == 0.25 and loss.stats["max"][3] == INF
    assert math.isnan(loss.stats["median"][2]) and loss.stats["median"][3] == INF
    assert all(math.isnan(loss.stats[s][2]) for s in ("min", "max"))
    assert loss.stats["count"].tolist() == [2, 2, 2, 2]
    entry = summary["groups"]["run"]["train/loss"]
    assert entry["final"] == {"step": 1, "value": 0.625, "members": 2}  # last finite
    assert entry["best"] == {"step": 1, "value": 0.625, "mode": "min"}  # best finite
    assert entry["first_nonfinite_step"] == 2 and entry["nonfinite_steps"] == 2
    assert summary["groups"]["run"]["train/zero"]["first_nonfinite_step"] is None


def test_a_lone_negative_zero_keeps_its_sign(ranks: Path, tmp_path: Path) -> None:
    summary = aggregate_runs([ranks], tmp_path / "agg", stats=STATS, align="union", plot=[])
    with open(tmp_path / "agg" / "scalars.csv", newline="") as fh:
        (row,) = [r for r in csv.DictReader(fh) if r["tag"] == "train/zero"]
    assert [row[s] for s in ("mean", "min", "max", "median", "std", "count")] == \
        ["-0.0", "-0.0", "-0.0", "-0.0", "0.0", "1.0"]
    assert (row["members"], row["nonfinite"]) == ("1", "0")
    final = summary["groups"]["run"]["train/zero"]["final"]["value"]
    assert final == 0.0 and math.copysign(1.0, final) == -1.0


@pytest.mark.parametrize("align", ["intersection", "union"])
def test_csv_reads_back_bit_for_bit(ranks: Path, tmp_path: Path, align: str) -> None:
    """Every value of scalars.csv, read with the csv module and float(), is the aggregated
    float64 exactly: nan, inf and -0.0 included."""
    aggregate_runs([ranks], tmp_path / "agg", stats=STATS, align=align, plot=[])
    members, root = load_members([ranks], workers=1)
    want = {(a.tag, int(s)): (a, i) for a in aggregate(members, ["run"], None, list(STATS),
                                                        align, root)
            for i, s in enumerate(a.steps)}
    with open(tmp_path / "agg" / "scalars.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows and len(rows) == len(want)
    for row in rows:
        agg, i = want[(row["tag"], int(row["step"]))]
        assert (int(row["members"]), int(row["nonfinite"])) == (agg.members[i],
                                                                 agg.nonfinite[i])
        for stat in STATS:
            assert same(float(row[stat]), float(agg.stats[stat][i])), (row, stat)
    texts = {row["mean"] for row in rows}
    assert {"nan", "inf"} <= texts


def test_event_files_only_when_asked_and_tensorboard_reads_them(ranks: Path,
                                                               tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    aggregate_runs([ranks], tmp_path / "plain", plot=[])
    assert not (tmp_path / "plain" / "tb").exists()
    summary = aggregate_runs([ranks], tmp_path / "tb", plot=[], tensorboard=True)
    assert summary["tensorboard"] == str(tmp_path / "tb" / "tb")
    assert sorted(p.name for p in (tmp_path / "tb" / "tb" / "run").iterdir()) == \
        sorted(DEFAULT_STATS)
    members, root = load_members([ranks], workers=1)
    results = aggregate(members, ["run"], None, list(DEFAULT_STATS), "intersection", root)
    for stat in DEFAULT_STATS:
        acc = EventAccumulator(str(tmp_path / "tb" / "tb" / "run" / stat),
                               size_guidance={"scalars": 0})
        acc.Reload()
        assert sorted(acc.Tags()["scalars"]) == sorted(a.tag for a in results)
        for agg in results:
            got = acc.Scalars(agg.tag)
            assert [e.step for e in got] == agg.steps.tolist()
            want = agg.stats[stat].astype(np.float32).astype(np.float64).tolist()
            assert all(same(e.value, w) for e, w in zip(got, want, strict=True)), (stat, got)


def test_bulk_event_records_at_every_step_size(tmp_path: Path) -> None:
    """Steps whose varints take 1 to 10 bytes (a negative step: 10), values NaN, +-inf, -0.0
    and beyond float32: TensorBoard reads each back; every record's checksums hold."""
    import google_crc32c
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps = np.array([-5, 0, 1, 127, 128, 300, 16_383, 16_384, 2**21, 2**28, 2**35, 2**42,
                      2**49, 2**56, 2**62], dtype=np.int64)
    values = np.array([0.1, -0.0, NAN, INF, -INF, 1e300, 3.5, -2.25, 1e-3, 7.0, 8.0, 9.0,
                       10.0, 11.0, 12.0])
    path = outputs.write_event_file(tmp_path / "run", {"a/b": (steps, values),
                                                       "c": (steps[:3], values[:3])})
    data, offset, records = path.read_bytes(), 0, 0
    mask = outputs._masked
    while offset < len(data):
        (length,) = struct.unpack_from("<Q", data, offset)
        assert struct.unpack_from("<I", data, offset + 8)[0] == \
            mask(google_crc32c.value(data[offset:offset + 8]))
        body = data[offset + 12:offset + 12 + length]
        assert struct.unpack_from("<I", data, offset + 12 + length)[0] == \
            mask(google_crc32c.value(body))
        offset, records = offset + 16 + length, records + 1
    assert records == 1 + len(steps) + 3
    acc = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    acc.Reload()
    got = acc.Scalars("a/b")
    assert [e.step for e in got] == steps.tolist()
    with np.errstate(over="ignore"):
        want = values.astype(np.float32).astype(np.float64).tolist()
    assert all(same(e.value, w) for e, w in zip(got, want, strict=True))
    assert [e.step for e in acc.Scalars("c")] == [-5, 0, 1]


def test_plots_only_for_the_tags_asked(ranks: Path, tmp_path: Path) -> None:
    asked = aggregate_runs([ranks], tmp_path / "one", plot=["train/zero"])
    assert [Path(p).name for p in asked["plots"]] == ["train_zero.png"]
    assert [p.name for p in (tmp_path / "one" / "plots").iterdir()] == ["train_zero.png"]
    aggregate_runs([ranks], tmp_path / "none", plot=[])
    assert not (tmp_path / "none" / "plots").exists()


def test_worker_processes_write_the_same_outputs(ranks: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The forked workers' CSV is byte for byte the one written in process, plots and event
    files the same set (the size threshold lowered so that a tiny run uses them)."""
    if not outputs.can_fork():
        pytest.skip("output workers are forked: Linux only")
    monkeypatch.setattr(outputs, "PARALLEL_FROM", 0)
    monkeypatch.setattr(outputs, "csv_blocks",  # a block per step: many parts, in order
                        lambda results, rows=1: [(i, s, s + 1) for i, a in enumerate(results)
                                                 for s in range(len(a.steps))])
    made = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        doc = aggregate_runs([ranks], out, align="union", plot=["train/*"], tensorboard=True,
                             workers=workers)
        made[workers] = ((out / "scalars.csv").read_bytes(),
                         sorted(Path(p).name for p in doc["plots"]),
                         sorted(str(p.relative_to(out)) for p in (out / "tb").rglob("*.*")
                                if p.is_file()))
    assert made[1][0] == made[2][0] and made[1][0].count(b"\n") == 1 + 5
    assert made[1][1] == made[2][1] == ["train_loss.png", "train_zero.png"]
    assert [len(made[w][2]) for w in (1, 2)] == [4, 4]


def test_plotted_points_keep_each_pixel_columns_extremes() -> None:
    rng = np.random.default_rng(0)
    steps = np.arange(20_000) * 3
    curve = rng.normal(size=len(steps))
    curve[777] = NAN
    keep = outputs.pixel_points(steps, [curve], columns=500)
    assert len(keep) < len(steps) / 4 and 777 in keep and {0, len(steps) - 1} <= set(keep)
    column = steps * 500 // (steps[-1] + 1)
    for c in range(500):
        inside = column == c
        kept = column[keep] == c
        assert np.nanmax(curve[inside]) == np.nanmax(curve[keep][kept])
        assert np.nanmin(curve[inside]) == np.nanmin(curve[keep][kept])
    assert outputs.pixel_points(steps[:100], [curve[:100]]).tolist() == list(range(100))


def test_a_dense_line_is_drawn_as_each_pixel_columns_range() -> None:
    steps = np.arange(10_000)
    curve = np.sin(steps / 500.0)
    curve[5_000] = INF  # a gap where the line has one
    assert outputs.pixel_envelope(steps[:400], curve[:400], columns=100) is None  # sparse
    envelope = outputs.pixel_envelope(steps, curve, columns=100)
    assert envelope is not None
    x, low, high = envelope
    assert len(x) == 100 and x[0] == 49.5 and x[-1] == 9_949.5
    assert np.isnan(low[50]) and np.isnan(high[50]) and np.isfinite(np.delete(low, 50)).all()
    for c in (0, 37, 99):
        part = curve[c * 100:(c + 1) * 100]
        assert (low[c], high[c]) == (part.min(), part.max())


def test_cli_defaults_match_the_library() -> None:
    from dist_ft.cli import aggregate as cli

    assert ",".join(DEFAULT_STATS) == cli.DEFAULT_STATS and ",".join(STATS) == cli.STATS
    assert outputs.csv_header(list(DEFAULT_STATS)) == \
        "group,tag,step,members,nonfinite,mean,std,min,max,label,since_stage\n"
