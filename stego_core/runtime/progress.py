"""Progress of long loops as plain log lines when nobody watches a terminal.

On a terminal the loops show tqdm bars (``disable=None``: tqdm turns itself off when its stream is not a TTY); in
a log file a bar is a long line of carriage returns. :class:`PlainProgress` writes instead, when ``stderr`` is not
a TTY, one log line every ``every_s`` seconds and one at the end::

    12:04:31 INFO stego_core.features.pretraining: pretrain: step 120/300 (40 %), loss 3.214, 35 s, ~52 s left
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["PlainProgress", "on_terminal"]


def on_terminal() -> bool:
    """Whether ``stderr`` (where bars and log lines go) is a terminal."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class PlainProgress:
    """Log ``<what>: <unit> done/total (pct), fields, elapsed, ~left`` every ``every_s`` seconds and at the end,
    only when :func:`on_terminal` is false (a bar shows the same on a terminal) and ``enabled``.

    Parameters
    ----------
    what : str
        What progresses (``pretrain``, ``train``), the line's start.
    total : int
        Units to do.
    log : logging.Logger
        Where the lines go.
    unit : str, keyword-only
        The unit's name (``step``, ``volume``).
    every_s : float, keyword-only
        Seconds between two lines.
    enabled : bool, keyword-only
        False writes nothing (a step with ``progress: false``).
    start : int, keyword-only
        Units done before this run (a resumed loop), left out of the time estimate.
    """

    def __init__(self, what: str, total: int, log: logging.Logger, *, unit: str = "step", every_s: float = 20.0,
                 enabled: bool = True, start: int = 0) -> None:
        self.what, self.total, self.log, self.unit = what, int(total), log, unit
        self.every_s, self.start = float(every_s), int(start)
        self.enabled = enabled and not on_terminal()
        self._t0 = self._last = time.monotonic()
        self._said = -1  # the count of the last line written: the end is written once

    def update(self, done: int, *, final: bool = False, **fields: Any) -> None:
        """``done`` units so far; ``fields`` (e.g. ``loss=3.2``) are shown as ``name value``."""
        if not self.enabled or done == self._said:
            return
        now = time.monotonic()
        if not final and done < self.total and now - self._last < self.every_s:
            return
        self._last, self._said = now, done
        elapsed = now - self._t0
        pct = f" ({100 * done / self.total:.0f} %)" if self.total else ""
        extra = "".join(f", {k} {v:.4g}" if isinstance(v, float) else f", {k} {v}" for k, v in fields.items())
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0
        left = f", ~{(self.total - done) / rate:.0f} s left" if rate > 0 and done < self.total else ""
        self.log.info("%s: %s %d/%d%s%s, %.0f s%s", self.what, self.unit, done, self.total, pct, extra, elapsed, left)
