"""Faults around a run (no MLflow, no maths): signals, credentials, file locks and process ownership.

- :func:`handle_signals` turns SIGTERM / SIGINT into :class:`Interrupted` (a ``BaseException``, so neither
  ``except Exception`` nor Lightning's ``KeyboardInterrupt`` branch swallows it); entry points exit
  :func:`Interrupted.exit_code` (143 / 130). :func:`deferred_signals` holds them back until a unit of work
  (an optimisation step) is done.
- :func:`resolve_storage` keeps passwords off command lines: a storage URL with a password is taken only from
  the environment (``STEGO_OPTUNA_STORAGE``); ``PGPASSWORD`` / ``~/.pgpass`` serve a URL without one.
- :func:`file_lock` (``fcntl``) serialises the creation of SQLite stores and the logging of datasets into them;
  :func:`owner_tags` and :func:`pid_alive` let :mod:`stego_core.platform.doctor` tell runs whose process died.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

#: Environment variable holding the Optuna storage URL (the only place a password may be given).
STORAGE_ENV = "STEGO_OPTUNA_STORAGE"
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """The process received SIGTERM or SIGINT; runs end KILLED, trials FAIL, the process exits 128 + signum."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(f"interrupted by {signal.Signals(self.signum).name}")

    @property
    def exit_code(self) -> int:
        """``128 + signum``: 143 for SIGTERM, 130 for SIGINT (what shells and schedulers expect)."""
        return 128 + self.signum


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _signal_handlers(handler: Any) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT within the block, the previous handlers after it (a no-op outside the
    main thread, where Python delivers no signal)."""
    try:
        previous = {s: signal.signal(s, handler) for s in _SIGNALS}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, prev in previous.items():
            signal.signal(s, prev)


@contextlib.contextmanager
def handle_signals() -> Iterator[None]:
    """Within the block, SIGTERM and SIGINT raise :class:`Interrupted`; the previous handlers come back after.

    Does nothing outside the main thread (Python only delivers signals there).
    """
    with _signal_handlers(_raise_interrupted):
        yield


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGTERM / SIGINT back until the block ends, then deliver them to the handlers in force before.

    For a unit of work that must not stop half-way, such as one optimisation step (student updated, teacher not
    yet): under :func:`handle_signals` the :class:`Interrupted` is raised when the block is done, so the state
    saved on interruption is that of a whole number of steps. Does nothing outside the main thread.
    """
    received: list[int] = []
    with _signal_handlers(lambda signum, frame: received.append(signum)):
        yield
    if received:
        signal.raise_signal(received[0])


# ----------------------------------------------------------------------------------------------- secrets


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password (``scheme://user:pw@host`` or ``?password=``).

    >>> has_password("postgresql://u:pw@db/x"), has_password("postgresql://u@db/x"), has_password("sqlite:///a.db")
    (True, False, False)
    """
    return bool(re.search(r"://[^:/@]+:[^@/]*@", url) or re.search(r"[?&]password=", url, re.IGNORECASE))


def resolve_storage(configured: str, *, default: str, environ: Mapping[str, str] | None = None) -> str:
    """The Optuna storage URL to use.

    Parameters
    ----------
    configured : str
        The value from the config file and command line (never allowed to hold a password: ``mlflow run``
        prints and logs its parameters).
    default : str
        The config's default; when ``configured`` equals it, ``$STEGO_OPTUNA_STORAGE`` (if set) is used instead.
    environ : Mapping, optional
        The environment (default ``os.environ``).

    Raises
    ------
    ValueError
        ``configured`` holds a password: the message says how to pass it instead.
    """
    env = os.environ if environ is None else environ
    if has_password(configured):
        raise ValueError(
            "storage holds a password; it would be printed and logged with the command line. Pass it in the "
            f"environment instead: export {STORAGE_ENV}='postgresql://user:PASSWORD@host/db' (and leave storage "
            "unset), or give storage=postgresql://user@host/db with PGPASSWORD or a ~/.pgpass file")
    from_env = env.get(STORAGE_ENV, "").strip()
    return from_env if from_env and configured == default else configured


# ----------------------------------------------------------------------------------------------- locks


@contextlib.contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """An exclusive advisory ``fcntl`` lock on ``path`` (created if missing), held for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URL (``None`` for other URLs and in-memory databases).

    >>> str(sqlite_path("sqlite:///a/b.db")), sqlite_path("postgresql://db/x"), sqlite_path("sqlite://")
    ('a/b.db', None, None)
    """
    m = re.match(r"sqlite(\+\w+)?:///(.+)$", url)
    if not m or m.group(2).startswith(":memory:"):
        return None
    return Path(m.group(2).split("?")[0])


@contextlib.contextmanager
def store_lock(url: str) -> Iterator[None]:
    """Hold ``<db>.lock`` beside a SQLite database for the block (no-op for other URLs): while it creates or
    migrates the store, or writes rows that processes started together would otherwise insert twice."""
    path = sqlite_path(url)
    if path is None:
        yield
        return
    with file_lock(path.with_name(path.name + ".lock")):
        yield


# ----------------------------------------------------------------------------------------------- owners


def owner_tags() -> dict[str, str]:
    """``{"owner_host", "owner_pid"}`` of this process, recorded on every run it opens."""
    return {"owner_host": socket.gethostname(), "owner_pid": str(os.getpid())}


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(tags: Mapping[str, str]) -> bool:
    """Whether the run with these tags was opened by a process of this host that still exists."""
    host, pid = tags.get("owner_host"), tags.get("owner_pid", "")
    return host == socket.gethostname() and pid.isdigit() and pid_alive(int(pid))


def owner_dead(tags: Mapping[str, str]) -> bool:
    """Whether the run with these tags was opened by a process of this host that no longer exists."""
    host, pid = tags.get("owner_host"), tags.get("owner_pid", "")
    return host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


_PARTIAL = re.compile(r"\.(\d+)\.partial(\.json|\.npy)*$")


def stale_partials(root: str | Path) -> list[Path]:
    """``*.<pid>.partial*`` files under ``root`` whose writing process is gone."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for path in root.rglob("*.partial*"):
        m = _PARTIAL.search(path.name)
        if m and path.is_file() and not pid_alive(int(m.group(1))):
            out.append(path)
    return sorted(out)


def fail_trial_on_interrupt(objective: Callable[[Any], float]) -> Callable[[Any], float]:
    """Wrap an Optuna objective so an :class:`Interrupted` trial is told FAIL before the signal propagates
    (Optuna leaves a trial RUNNING when a ``BaseException`` other than ``KeyboardInterrupt`` escapes it)."""

    def guarded(trial: Any) -> float:
        try:
            return objective(trial)
        except Interrupted as exc:
            import optuna

            with contextlib.suppress(Exception):
                trial.set_user_attr("fail_reason", str(exc))
                trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise

    return guarded
