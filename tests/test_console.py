"""What a person running an entry point reads (``stego_core.platform.console``, ``stego_core.runtime.progress``):
plain progress lines only when nobody watches a terminal, a banner and the elapsed time of every step, the
libraries' chatter quiet, and the last block of a pipeline."""

from __future__ import annotations

import logging
import os
import re

import pytest

from stego_core.platform import console
from stego_core.runtime import progress
from stego_core.runtime.progress import PlainProgress


@pytest.fixture
def not_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "on_terminal", lambda: False)


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def test_plain_progress_writes_every_interval_and_the_end_once(not_a_terminal, caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        plain = PlainProgress("pretrain", 10, log, every_s=0.0)
        for step in range(1, 11):
            plain.update(step, loss=3.25)
        plain.update(10, final=True, loss=3.0)  # the loop's closing call after its last step: no second line
    lines = _lines(caplog)
    assert len(lines) == 10
    assert lines[0].startswith("pretrain: step 1/10 (10 %), loss 3.25, ") and lines[0].endswith("s left")
    assert lines[-1].startswith("pretrain: step 10/10 (100 %)") and "left" not in lines[-1]
    assert not any("\r" in line or "\x1b" in line for line in lines)


def test_plain_progress_waits_between_lines_and_is_silent_when_off(not_a_terminal, caplog):
    log = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        slow = PlainProgress("train", 100, log, every_s=3600)
        for step in range(1, 100):
            slow.update(step)
        assert _lines(caplog) == []  # not an hour yet
        slow.update(100)  # the end is always written
        assert len(_lines(caplog)) == 1
        off = PlainProgress("train", 5, log, every_s=0.0, enabled=False)
        off.update(5, final=True)
    assert len(_lines(caplog)) == 1


def test_plain_progress_leaves_a_terminal_to_the_bars(monkeypatch, caplog):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    with caplog.at_level(logging.INFO, logger="test.progress"):
        PlainProgress("features", 4, logging.getLogger("test.progress"), every_s=0.0).update(4, final=True)
    assert _lines(caplog) == []


def test_step_clock_banners_and_times(caplog):
    clock = console.StepClock(2, logging.getLogger("test.clock"))
    with caplog.at_level(logging.INFO, logger="test.clock"):
        with clock.step("prepare", "the volumes"):
            pass
        with pytest.raises(RuntimeError), clock.step("otsu"):
            raise RuntimeError("boom")  # a failing step still says how long it took
    lines = _lines(caplog)
    assert lines[0] == "==== [1/2] prepare: the volumes ===="
    assert re.fullmatch(r"---- \[1/2\] prepare done in \d+\.\d s \(total \d+\.\d s\) ----", lines[1])
    assert lines[2] == "==== [2/2] otsu ====" and lines[3].startswith("---- [2/2] otsu done in ")
    assert [name for name, _ in clock.times] == ["prepare", "otsu"]
    assert clock.summary().startswith("prepare ") and ", otsu " in clock.summary()


def test_closing_block_names_the_run_the_report_and_make_ui(tmp_path):
    clock = console.StepClock(1, logging.getLogger("test.clock"))
    with clock.step("prepare"):
        pass
    text = console.closing_block("abc123", "stego-vessels", f"file://{tmp_path}/report.html", clock=clock)
    lines = text.splitlines()
    assert lines[0].startswith("==== done in ") and "prepare " in lines[0]
    assert lines[1] == "pipeline run  abc123 (experiment stego-vessels)"
    assert lines[2] == f"report        {tmp_path}/report.html (one self-contained page: open it in a browser)"
    assert "make ui" in lines[3]
    remote = console.closing_block("abc123", "e", "mlflow-artifacts:/1/abc123/artifacts/report.html")
    assert "(artifact report.html of the run)" in remote


def test_setup_logging_time_stamps_and_quiets_the_libraries(monkeypatch):
    monkeypatch.setattr(console, "on_terminal", lambda: False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "")  # recorded, so the test's value is undone
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        for h in list(root.handlers):
            root.removeHandler(h)
        console.setup_logging()
        formatter = root.handlers[0].formatter
        record = logging.LogRecord("stego_core.x", logging.INFO, __file__, 1, "hello", None, None)
        assert re.fullmatch(r"\d\d:\d\d:\d\d INFO stego_core.x: hello", formatter.format(record))
        assert not logging.getLogger("faiss.loader").isEnabledFor(logging.INFO)  # "ModuleNotFoundError" lines
        assert not logging.getLogger("lightning.pytorch.utilities.rank_zero").isEnabledFor(logging.INFO)  # tips
        assert logging.getLogger("faiss.loader").isEnabledFor(logging.WARNING)
        assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # no bars in a log file
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        root.setLevel(level)
        for name in console.QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.NOTSET)


def test_duration():
    assert console.duration(0.04) == "0.0 s" and console.duration(59.94) == "59.9 s"
    assert console.duration(60) == "1 min 00 s" and console.duration(3725) == "62 min 05 s"
