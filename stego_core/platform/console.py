"""What a person running an entry point reads: time-stamped log lines, a banner and the elapsed time of every step,
no noise from libraries, and a last block that says where the results are.

- :func:`setup_logging` (every entry point, :func:`stego_core.platform.cli.run`): ``HH:MM:SS LEVEL logger:
  message`` lines; the libraries' chatter at INFO (faiss's loader trying its AVX builds, Lightning's tips and
  device lines) is raised to WARNING; in a log file (not a terminal) MLflow's artifact progress bars are off
  (``MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false``: they became long lines of carriage returns), as are the
  loops' tqdm bars (they turn themselves off; :class:`stego_core.runtime.progress.PlainProgress` writes plain
  lines instead).
- :class:`StepClock`: ``==== [3/12] otsu: a classical method, evaluated on the held-out volumes ====`` before a
  step and ``---- [3/12] otsu done in 12.3 s (total 1 min 02 s) ----`` after it.
- :func:`closing_block`: the pipeline run's id, where its report is, and ``make ui``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from stego_core.runtime.progress import on_terminal

#: Loggers whose INFO lines are no use to a researcher (their warnings still show).
QUIET_LOGGERS = ("faiss", "faiss.loader", "lightning.pytorch.utilities.rank_zero",
                 "lightning.fabric.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.pytorch.trainer.connectors.checkpoint_connector")  # "`weights_only` was not set"
#: Warnings libraries raise about themselves (not about anything this project does), by message.
LIBRARY_WARNINGS = (r".*isinstance\(treespec, LeafSpec\).*",)
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    """Time-stamped log lines, the libraries' INFO chatter silenced, no progress bars in a log file."""
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt="%H:%M:%S")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if not on_terminal():
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def duration(seconds: float) -> str:
    """``12.3 s``, ``3 min 05 s``.

    >>> duration(12.34), duration(185)
    ('12.3 s', '3 min 05 s')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(round(seconds)), 60)
    return f"{minutes} min {rest:02d} s"


class StepClock:
    """Banners around the steps of a run and their wall times (``times``: ``[(name, seconds)]``).

    >>> clock = StepClock(2, logging.getLogger("doc"))
    >>> with clock.step("prepare"):
    ...     pass
    >>> [name for name, _ in clock.times]
    ['prepare']
    """

    def __init__(self, total: int, log: logging.Logger) -> None:
        self.total, self.log = total, log
        self.times: list[tuple[str, float]] = []
        self.start = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str, what: str = "") -> Iterator[None]:
        number = len(self.times) + 1
        self.log.info("==== [%d/%d] %s%s ====", number, self.total, name, f": {what}" if what else "")
        t0 = time.monotonic()
        try:
            yield
        finally:
            seconds = time.monotonic() - t0
            self.times.append((name, seconds))
            self.log.info("---- [%d/%d] %s done in %s (total %s) ----", number, self.total, name,
                          duration(seconds), duration(time.monotonic() - self.start))

    def summary(self) -> str:
        """``prepare 4.1 s, pretrain 1 min 02 s, ...``."""
        return ", ".join(f"{name} {duration(s)}" for name, s in self.times)


def closing_block(run_id: str, experiment: str, report_path: str, *, clock: StepClock | None = None) -> str:
    """The last lines of a pipeline: its run, where the report is, how to open it in the UI.

    >>> print(closing_block("abc", "stego-vessels", "/tmp/mlruns/1/abc/artifacts/report.html"))
    pipeline run  abc (experiment stego-vessels)
    report        /tmp/mlruns/1/abc/artifacts/report.html (one self-contained page: open it in a browser)
    MLflow UI     make ui  (it prints the link that opens this report)
    """
    lines = []
    if clock is not None:
        lines.append(f"==== done in {duration(time.monotonic() - clock.start)}: {clock.summary()} ====")
    local = report_path.removeprefix("file://")
    where = (f"{local} (one self-contained page: open it in a browser)" if Path(local).is_absolute()
             else f"{report_path} (artifact report.html of the run)")
    lines += [f"pipeline run  {run_id} (experiment {experiment})", f"report        {where}",
              "MLflow UI     make ui  (it prints the link that opens this report)"]
    return "\n".join(lines)
