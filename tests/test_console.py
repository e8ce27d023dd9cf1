"""The console owner (dist_ft.console): levels, progress as a bar or as log lines."""

from __future__ import annotations

import logging
import re

import pytest

from dist_ft import console

LINE = re.compile(r"^prepare: (\d+)/40 \((\d+)%\) [\d.]+ img/s, (ETA \d+s|in \d+s)$")


@pytest.fixture(autouse=True)
def clean_console(restore_logging: None) -> None:
    """Every test here starts from the default console (tests/conftest.py)."""


def progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dist_ft.progress"]


def test_line_format_has_count_rate_and_eta() -> None:
    assert console.progress_line("prepare", 11212, 112120, "img", elapsed=60.6, done=11212) \
        == "prepare: 11212/112120 (10%) 185 img/s, ETA 9m05s"
    assert console.progress_line("train", 40, 40, "step", elapsed=7322, done=30,
                                 postfix="loss=0.4") \
        == "train: 40/40 (100%) 0.0041 step/s, in 2h02m, loss=0.4"
    assert console.progress_line("read events", 3, None, "folder", elapsed=0.0, done=0) \
        == "read events: 3"


def test_lines_mode_logs_one_line_per_ten_percent_and_a_last_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    caplog.set_level(logging.INFO, logger="dist_ft")
    bar = console.progress(total=40, desc="prepare", unit="img")
    for _ in range(20):
        bar.update(2)  # every other update crosses a 10 % mark
    bar.close()
    lines = progress_lines(caplog)
    assert [int(LINE.match(x).group(2)) for x in lines] == list(range(10, 101, 10)), lines
    assert lines[-1].endswith("s") and ", in " in lines[-1]
    assert all(", ETA " in x for x in lines[:-1])


def test_lines_mode_also_logs_by_time_and_closes_a_partial_run(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    monkeypatch.setattr(console, "LINE_SECONDS", 0.0)  # every update is a minute late
    caplog.set_level(logging.INFO, logger="dist_ft")
    with console.progress(total=1000, desc="prepare", unit="img") as bar:
        bar.update(1)
        bar.update(1)
    assert [x.split(" (")[0] for x in progress_lines(caplog)] == ["prepare: 1/1000",
                                                                 "prepare: 2/1000"]


def test_iterating_in_lines_mode_counts_every_item(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(console.PROGRESS_ENV, "lines")
    caplog.set_level(logging.INFO, logger="dist_ft")
    assert list(console.progress(iter(range(5)), total=5, desc="eval val", unit="batch")) \
        == list(range(5))
    assert progress_lines(caplog)[-1].startswith("eval val: 5/5 (100%)")


@pytest.mark.parametrize("how", ["quiet", "not main", "off"])
def test_quiet_other_ranks_and_off_show_nothing(
    how: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(console.PROGRESS_ENV, "off" if how == "off" else "lines")
    if how == "quiet":
        monkeypatch.setenv(console.VERBOSITY_ENV, "-1")
    caplog.set_level(logging.INFO, logger="dist_ft")
    with console.progress(total=10, desc="prepare", unit="img",
                          enabled=how != "not main") as bar:
        bar.update(10)
    assert progress_lines(caplog) == [] and capsys.readouterr().err == ""


def test_a_bar_writes_log_lines_through_tqdm_and_restores_the_handlers(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys

    monkeypatch.setenv(console.PROGRESS_ENV, "bar")
    ours = logging.getLogger("dist_ft")
    screen = logging.StreamHandler(sys.stderr)  # as train's setup_logging makes it
    screen.setFormatter(console.ConsoleFormatter())
    ours.handlers, ours.propagate = [screen], False
    ours.setLevel(logging.INFO)
    bar = console.progress(total=3, desc="train", unit="step")
    bar.update(1)
    logging.getLogger("dist_ft.train").info("epoch 1 step 1: val loss 0.5")
    bar.update(2)
    bar.close()
    assert ours.handlers == [screen]
    segments = re.split(r"[\r\n]", capsys.readouterr().err)
    assert any(s.startswith("train:  33%|") for s in segments), segments  # a bar was drawn
    logged = [s for s in segments if "dist-ft:" in s]
    assert logged == ["dist-ft: epoch 1 step 1: val loss 0.5"], segments


def test_levels_follow_the_verbosity(monkeypatch: pytest.MonkeyPatch) -> None:
    for level, ours, others in [(-1, logging.WARNING, logging.WARNING),
                                (0, logging.INFO, logging.WARNING),
                                (1, logging.DEBUG, logging.INFO),
                                (2, logging.DEBUG, logging.DEBUG)]:
        console.configure_logging(level)
        assert console.verbosity() == level
        assert logging.getLogger("dist_ft").level == ours
        assert logging.getLogger().level == others
    marked = [h for h in logging.getLogger().handlers if getattr(h, "dist_ft_console", False)]
    assert len(marked) == 1  # each call replaces its handler


def test_formatter_tells_dist_ft_lines_from_other_libraries() -> None:
    def line(name: str, level: int, msg: str) -> str:
        record = logging.LogRecord(name, level, __file__, 1, msg, None, None)
        return console.ConsoleFormatter().format(record)

    assert line("dist_ft.train", logging.INFO, "run x") == "dist-ft: run x"
    assert line("dist_ft.data", logging.WARNING, "odd") == "dist-ft: warning: odd"
    assert line("accelerate.utils", logging.WARNING, "hm\n") == "WARNING accelerate.utils: hm"


@pytest.mark.parametrize(("var", "value"), [(console.PROGRESS_ENV, "fancy"),
                                            (console.VERBOSITY_ENV, "loud")])
def test_bad_settings_name_the_variable(var: str, value: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=f"{var}='{value}'"):
        console.progress_mode()


def test_a_repeated_python_warning_reaches_the_console_once() -> None:
    once = console.WarningsOnce()

    def record(name: str, text: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, text, None,
                                        None)

    note = "torch/distributed/c10d_logger.py:83: FutureWarning: deprecated"
    assert once.filter(record("py.warnings", note))
    assert not once.filter(record("py.warnings", note))  # the same warning, next step
    assert once.filter(record("py.warnings", note + " (another)"))
    assert once.filter(record("dist_ft.train", "a log line")) and once.filter(
        record("dist_ft.train", "a log line"))  # log lines are never deduplicated


def test_other_libraries_future_warnings_only_with_verbose() -> None:
    import warnings

    def warn_from(module: str) -> None:
        warnings.warn_explicit(f"{module} api is deprecated", FutureWarning, "x.py", 1,
                               module=module, registry={})

    with warnings.catch_warnings():  # the filters are put back after the test
        console.configure_logging(0)
        with warnings.catch_warnings(record=True) as seen:  # keeps the filters, records
            warn_from("torch.distributed.c10d_logger")
            warn_from("dist_ft.train.trainer")
        assert [str(w.message) for w in seen] == ["dist_ft.train.trainer api is deprecated"]
        console.configure_logging(1)
        with warnings.catch_warnings(record=True) as seen:
            warn_from("torch.distributed.c10d_logger")
        assert [str(w.message) for w in seen] == \
            ["torch.distributed.c10d_logger api is deprecated"]
