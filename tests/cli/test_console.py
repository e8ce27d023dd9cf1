"""What a user sees on stderr: log lines beside the bar, other libraries' chatter, progress in a
log file, -v/-q anywhere, help that shows defaults."""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dist_ft import console
from dist_ft.cli.main import build_parser
from tests.conftest import CONFIGS, REPO, CliResult, plain_env

SMOKE = CONFIGS / "chestxray14_smoke.yaml"
TINY = ["data.image_size=32", "data.load_size=32", "data.batch_size=8", "trainer.max_steps=4",
        "logging.every_steps=1", "data.val_fraction=0.3", "trainer.backend=ddp"]
PROGRESS = re.compile(r"^dist-ft: (prepare|synth): \d+/\d+ \(\d+%\) [\d.]+ img/s, "
                      r"(ETA|in) \d+(s|m\d\ds)$")


def dist_ft(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m dist_ft ARGS`` as a user runs it, stderr a pipe (not a terminal)."""
    base = {k: v for k, v in plain_env().items()
            if k not in (console.VERBOSITY_ENV, console.PROGRESS_ENV)}
    return subprocess.run([sys.executable, "-m", "dist_ft", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=300, env={**base, **env})


def screen_lines(stderr: str) -> list[str]:
    """stderr cut where a terminal starts a line anew (``\\r`` or ``\\n``)."""
    return re.split(r"[\r\n]", stderr)


# ---------------------------------------------------------------- (a) a short train
@pytest.mark.multiprocess
def test_train_log_lines_never_follow_bar_text_and_other_libraries_stay_quiet(
    tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    # tqdm draws on a pipe too; the bar is forced so that the test sees what a terminal shows.
    result = dist_ft("train", str(SMOKE), f"data.root={tiny_cxr14_session}",
                     f"output_dir={tmp_path}", *TINY, DIST_FT_PROGRESS="bar")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = screen_lines(result.stderr)
    assert any(re.search(r" \d+%\|", x) for x in lines), result.stderr[-2000:]  # a bar
    assert any(x.startswith("dist-ft: epoch 1 step 3: val loss") for x in lines)
    glued = [x for x in lines if "dist-ft:" in x and not x.startswith("dist-ft:")]
    assert not glued, glued
    chatter = [x for x in lines if re.match(r"(INFO|DEBUG) ", x)]
    assert not chatter, chatter  # e.g. INFO accelerate.checkpointing: ... Model weights saved


# ---------------------------------------------------------------- (b) progress in a log file
def test_prepare_and_synth_print_progress_lines_on_a_pipe(
    tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    prepare = dist_ft("data", "prepare", str(tiny_cxr14_session), "--out", str(tmp_path / "c"),
                      "--size", "16", "--shard-size", "4")
    synth = dist_ft("data", "synth", str(tmp_path / "s"), "--images", "200", "--size", "16")
    for result in (prepare, synth):
        assert result.returncode == 0, result.stderr[-2000:]
        assert "\r" not in result.stderr  # no bar redrawn in a log file
        lines = [x for x in result.stderr.splitlines() if PROGRESS.match(x)]
        assert any(", ETA " in x for x in lines), result.stderr
        assert ", in " in lines[-1], result.stderr


# ---------------------------------------------------------------- (c) -v / -q anywhere
def test_quiet_after_the_subcommand_silences_progress(
    tiny_cxr14_session: Path, tmp_path: Path
) -> None:
    result = dist_ft("data", "prepare", str(tiny_cxr14_session), "--out", str(tmp_path / "c"),
                     "--size", "16", "--shard-size", "4", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "cache" in result.stdout


@pytest.mark.parametrize(("flags", "level"), [
    (["-q"], -1), (["-v"], 1), (["-vv"], 2), (["--verbose", "-v"], 2), (["--quiet"], -1)])
def test_verbosity_flags_after_the_subcommand_set_the_levels(
    flags: list[str], level: int, run_cli: Callable[..., CliResult],
    restore_logging: None
) -> None:
    result = run_cli("plan", str(SMOKE), *flags)
    assert result.code == 0, result.err
    assert os.environ[console.VERBOSITY_ENV] == str(level)  # what launched workers inherit
    assert logging.getLogger("dist_ft").level == console.dist_ft_level(level)
    assert logging.getLogger().level == console.other_level(level)


def test_flags_before_and_after_the_subcommand_add_up_and_contradictions_are_refused(
    run_cli: Callable[..., CliResult], restore_logging: None
) -> None:
    assert run_cli("-v", "plan", str(SMOKE), "-v").code == 0
    assert os.environ[console.VERBOSITY_ENV] == "2"
    result = run_cli("-q", "plan", str(SMOKE), "-v")
    assert result.code == 2 and "-q/--quiet and -v/--verbose contradict" in result.err


def test_the_trainers_logging_takes_the_inherited_level(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_logging: None
) -> None:
    from dist_ft.rundir import RunDir
    from dist_ft.train.reporting import setup_logging

    monkeypatch.setenv(console.VERBOSITY_ENV, "-1")  # as `dist-ft train ... -q` passes it on
    setup_logging(RunDir(tmp_path), rank=0, main=True)
    ours = logging.getLogger("dist_ft")
    levels = {type(h).__name__: h.level for h in ours.handlers}
    assert levels == {"FileHandler": logging.NOTSET, "StreamHandler": logging.WARNING}
    assert ours.level == logging.INFO  # the rank log keeps INFO under -q
    for h in ours.handlers:
        h.close()


def test_deepspeed_build_is_announced_only_when_the_op_is_not_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    from deepspeed.accelerator import get_accelerator

    from dist_ft.train.runtime import deepspeed_cpu_op_pending

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None:
        pytest.skip("DeepSpeed's accelerator here has no CPU comm op")
    assert deepspeed_cpu_op_pending()  # an empty extensions folder: it will build
    folder = tmp_path / builder.NAME
    folder.mkdir(exist_ok=True)
    sources = [os.path.abspath(builder.deepspeed_src_path(s)) for s in builder.sources()]
    (folder / "build.ninja").write_text("\n".join(f"build x.o: compile {s}" for s in sources))
    (folder / f"{builder.NAME}.so").write_bytes(b"")
    assert not deepspeed_cpu_op_pending()  # built from these sources: ninja has nothing to do
    (folder / "build.ninja").write_text("build x.o: compile /other/venv/shm.cpp")
    assert deepspeed_cpu_op_pending()  # another install's build: ninja rebuilds


# ---------------------------------------------------------------- (d) help
def all_parsers() -> list[argparse.ArgumentParser]:
    found, todo = [], [build_parser()]
    while todo:
        parser = todo.pop()
        found.append(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo += list(dict.fromkeys(action.choices.values()))
    return found


def test_every_option_of_every_command_has_help() -> None:
    parsers = all_parsers()
    assert len(parsers) > 20  # the walk reached the subcommands' subcommands
    missing = [f"{p.prog} {'/'.join(a.option_strings) or a.dest}" for p in parsers
               for a in p._actions
               if not isinstance(a, argparse._SubParsersAction) and not (a.help or "").strip()]
    assert not missing, missing
    for p in parsers[1:]:  # -v/-q are accepted after every subcommand
        assert {"-v", "-q"} <= set(p._option_string_actions), p.prog


def test_help_shows_defaults_and_keeps_the_examples_as_written() -> None:
    texts = {p.prog: p.format_help() for p in all_parsers()}
    synth = texts["dist-ft data synth"]
    assert "(default: 600)" in synth and "(default: 2017)" in synth
    assert "\nexamples:\n  dist-ft data synth data/cxr14_synth --images 600" in synth
    assert "(default: ddp zero2)" in " ".join(texts["dist-ft bench trainer"].split())
    shown = "\n".join(texts.values())
    for nothing in ("(default: None)", "(default: False)", "(default: [])", "(default: )"):
        assert nothing not in shown
