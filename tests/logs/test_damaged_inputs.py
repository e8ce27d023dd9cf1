"""``dist-ft aggregate`` given empty or corrupt event files, or an --out that overlaps an input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from dist_ft.logs.events import _record, read_event_file, read_run
from dist_ft.logs.outputs import write_event_file
from dist_ft.logs.runs import MARKER

NOISE = b"\xa5" + random.Random(0).randbytes(499)


def good_run(folder: Path) -> Path:
    """A run folder whose tb/ holds one readable event file (train/loss at steps 0-4)."""
    write_event_file(folder / "tb", {"train/loss": (np.arange(5), np.linspace(1.0, 0.5, 5))})
    (folder / "recipe.yaml").write_text("optim: {lr: 0.001}\n")
    return folder


@pytest.mark.parametrize("verify", [True, False])
def test_empty_and_random_files_are_named_corrupt(tmp_path: Path, verify: bool) -> None:
    empty = tmp_path / "events.out.tfevents.1.host"
    empty.write_bytes(b"")
    noise = tmp_path / "events.out.tfevents.2.host"
    noise.write_bytes(NOISE)
    not_an_event = tmp_path / "events.out.tfevents.3.host"
    not_an_event.write_bytes(_record(b"\xff\xff\xff\xff"))  # framed, checksummed, not protobuf
    got = {p: read_event_file(p, verify_crc=verify) for p in (empty, noise, not_an_event)}
    assert all(not f.readable and len(f.problems) == 1 for f in got.values())
    assert got[empty].problems == [f"{empty}: corrupt event file, nothing readable: empty file "
                                   "(0 bytes): a writer that never flushed, or not a log"]
    why = "checksum mismatch in the record header at byte 0" if verify else "at byte 0"
    assert got[noise].problems[0].startswith(f"{noise}: corrupt event file, nothing readable: ")
    assert why in got[noise].problems[0]
    assert "the record at byte 0 is not a TensorBoard Event" in got[not_an_event].problems[0]
    run = read_run(tmp_path, verify_crc=verify)
    assert sorted(run.unreadable) == sorted(got) and run.points_read == 0


def test_only_corrupt_files_is_an_error_naming_each(run_cli, tmp_path: Path) -> None:
    empty, noise = tmp_path / "a" / "tb", tmp_path / "b" / "tb"
    for folder, data in ((empty, b""), (noise, NOISE)):
        folder.mkdir(parents=True)
        (folder / "events.out.tfevents.1.host").write_bytes(data)
    out = tmp_path / "agg"
    result = run_cli("aggregate", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out))
    assert result.code == 1
    assert "no scalar could be read from any event file; damaged files:" in result.err
    assert f"{empty}/events.out.tfevents.1.host: corrupt event file, nothing readable: empty " \
           "file (0 bytes)" in result.err
    assert f"{noise}/events.out.tfevents.1.host: corrupt event file, nothing readable: " \
           "checksum mismatch" in result.err
    assert "no scalar matched" not in result.err
    assert not out.exists()


def test_a_corrupt_file_among_good_ones_is_a_warning(run_cli, tmp_path: Path) -> None:
    run = good_run(tmp_path / "run")
    bad = run / "tb" / "events.out.tfevents.0.host.bad"
    bad.write_bytes(NOISE)
    (run / "tb" / "events.out.tfevents.0.host.empty").write_bytes(b"")
    out = tmp_path / "agg"
    result = run_cli("aggregate", str(run), "--out", str(out), "--json")
    assert result.code == 0, result.err
    summary = json.loads(result.out)
    assert len(summary["problems"]) == 2
    assert f"warning: {bad}: corrupt event file, nothing readable" in result.err
    assert summary["groups"]["run"]["train/loss"]["final"]["value"] == pytest.approx(0.5)
    assert (out / "scalars.csv").is_file()


def test_an_output_that_is_in_or_holds_an_input_is_refused(run_cli, tmp_path: Path) -> None:
    run = good_run(tmp_path / "runs" / "run")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    cases = [(run, "is the input"), (tmp_path / "runs", "holds the input"),
             (run / "tb", "is inside the input"), (run / "agg", "is inside the input")]
    for out, said in cases:
        result = run_cli("aggregate", str(run), "--out", str(out))
        assert result.code == 2, result.err
        assert f"--out {out}" in result.err and said in result.err and str(run) in result.err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert not list(tmp_path.rglob(MARKER))


def test_an_output_left_inside_a_run_by_older_versions_is_never_read_back(
    run_cli, tmp_path: Path
) -> None:
    run = good_run(tmp_path / "run")
    first = run_cli("aggregate", str(run), "--out", str(tmp_path / "agg"))
    assert first.code == 0, first.err
    (tmp_path / "agg").rename(run / "agg")  # as `--out RUN/agg` used to leave it
    result = run_cli("aggregate", str(run), "--out", str(tmp_path / "again"), "--json")
    assert result.code == 0, result.err
    assert json.loads(result.out)["members"] == 1  # the old output is not read as a run
