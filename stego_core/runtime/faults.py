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
import logging
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


#: Schemes an HTTP client opens: ``requests`` reads their credentials with ``urllib.parse``. Any other
#: ``scheme://`` URL is a database URL, opened by SQLAlchemy (``sqlalchemy.engine.make_url``).
_HTTP_SCHEMES = ("http", "https")


def _password_span(url: str) -> tuple[int, int] | None:
    """Where the password of ``url`` lies as its author may have meant it: from after ``scheme://user:`` to the
    *last* ``@`` of the URL (an unescaped ``@`` or ``/`` in a password makes the libraries end it earlier; this
    reading covers theirs, so masking it hides whatever they would take). None without a password."""
    head = url.find("://")
    if head < 0:
        return None
    start = head + 3
    at = url.rfind("@", start)
    if at < 0:
        return None
    colon = url.find(":", start, at)
    if colon < 0 or "/" in url[start:colon]:  # no password, or the ':' is a port after the host
        return None
    return colon + 1, at


def opener_credentials(url: str) -> tuple[str | None, str | None]:
    """``(user, password)`` of ``url`` as the library that opens it reads them: ``urllib.parse`` for ``http(s)``
    (what ``requests`` uses for a tracking server), SQLAlchemy's ``make_url`` for a database URL; percent-escapes
    decoded. ``(None, None)`` when the library cannot parse it.

    >>> opener_credentials("postgresql://alice:S3cret/PW@db:5432/mlf")
    ('alice', 'S3cret/PW')
    >>> opener_credentials("http://alice:p%40ss@host:5000")
    ('alice', 'p@ss')
    """
    from urllib.parse import unquote, urlsplit

    scheme = url.partition("://")[0].lower()
    try:
        if scheme in _HTTP_SCHEMES:
            parts = urlsplit(url)
            return (None if parts.username is None else unquote(parts.username),
                    None if parts.password is None else unquote(parts.password))
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        return parsed.username, None if parsed.password is None else str(parsed.password)
    except Exception:  # noqa: BLE001 - an unparsable URL has no credentials its opener could use
        return None, None


def _query_password(url: str) -> bool:
    from urllib.parse import parse_qsl

    query = url.partition("?")[2].partition("#")[0]
    return any(k.lower() == "password" for k, _ in parse_qsl(query, keep_blank_values=True))


def has_password(url: str) -> bool:
    """Whether ``url`` carries a password: ``scheme://user:pw@host`` (also with ``/``, ``@`` or ``:`` in ``pw``)
    or ``?password=``.

    >>> has_password("postgresql://u:pw@db/x"), has_password("postgresql://u@db/x"), has_password("sqlite:///a.db")
    (True, False, False)
    >>> has_password("postgresql://u:S3cret/PW@db/x"), has_password("http://host:5000/x")
    (True, False)
    """
    return _password_span(url) is not None or _query_password(url)


def check_url(url: str, name: str) -> str:
    """``url`` when the library that opens it reads the password its author wrote; else ValueError naming
    ``name``: a password with an unescaped ``@`` (any URL) or ``/`` (an ``http`` URL) is split elsewhere by the
    library, which would then send part of it as a host name (and print it in its errors).

    >>> check_url("postgresql://alice:S3cret/PW@db/mlf", "MLFLOW_TRACKING_URI")
    'postgresql://alice:S3cret/PW@db/mlf'
    """
    from urllib.parse import unquote

    span = _password_span(url)
    if span is None:
        return url
    written = unquote(url[span[0]:span[1]])
    if opener_credentials(url)[1] != written:
        raise ValueError(f"{name}: the password in the URL holds a character the URL parser splits at (an "
                         "unescaped '@', or '/' in an http URL); percent-encode it (@ as %40, / as %2F, % as %25)")
    return url


def sqlalchemy_url(url: str) -> str:
    """``postgresql://`` (or ``postgres://``) with the installed driver named: SQLAlchemy 2.1 defaults to
    psycopg 3, while this project pins ``psycopg2-binary``; other URLs unchanged.

    >>> sqlalchemy_url("postgres://u:pw@db/optuna").split("://")[0] in ("postgresql+psycopg2", "postgresql")
    True
    >>> sqlalchemy_url("sqlite:///mlflow.db")
    'sqlite:///mlflow.db'
    """
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres"):
        return url
    try:
        import psycopg  # noqa: F401  (SQLAlchemy's default PostgreSQL driver)

        return f"postgresql{sep}{rest}"
    except ImportError:
        return f"postgresql+psycopg2{sep}{rest}"


def mask_url(url: str) -> str:
    """``url`` with its password (:func:`_password_span`, the widest reading) and any ``password=`` query value
    replaced by ``***``.

    >>> mask_url("postgresql://alice:S3cret/P@W@127.0.0.1:1/mlf")
    'postgresql://alice:***@127.0.0.1:1/mlf'
    """
    span = _password_span(url)
    if span is not None:
        url = url[:span[0]] + "***" + url[span[1]:]
    lower = url.lower()
    for key in ("?password=", "&password="):
        start = lower.find(key)
        while start >= 0:
            value = start + len(key)
            end = url.find("&", value)
            end = len(url) if end < 0 else end
            url = url[:value] + "***" + url[end:]
            lower = url.lower()
            start = lower.find(key, value + 3)
    return url


#: A URL in free text: a scheme, ``://`` and everything up to the next white space (an error message may quote
#: one; the URL itself is read by :func:`mask_url`, not by a pattern).
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S*")


def mask_secrets(text: str) -> str:
    """``text`` with the password of every URL in it replaced by ``***`` (``scheme://user:password@host``, the
    password read up to the URL's last ``@``, so ``/``, ``@`` and ``:`` in it are masked too; ``?password=``).

    >>> mask_secrets("postgresql://optuna:s3cret@db:5432/optuna")
    'postgresql://optuna:***@db:5432/optuna'
    >>> mask_secrets("cannot open postgresql://alice:S3cret/PW@127.0.0.1:1/mlf: refused")
    'cannot open postgresql://alice:***@127.0.0.1:1/mlf: refused'
    >>> mask_secrets("sqlite:///optuna.db")
    'sqlite:///optuna.db'
    """
    return _URL_IN_TEXT.sub(lambda m: mask_url(m.group(0)), str(text))


class SecretFilter(logging.Filter):
    """A handler filter that masks the passwords of URLs (:func:`mask_secrets`) in every record it passes: the
    message and the formatted traceback. MLflow, SQLAlchemy and urllib3 quote URLs in their log lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is logging's business, not ours
            return True
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = mask_secrets(record.exc_text)
        return True


#: Loggers that keep handlers of their own (MLflow configures these four, not propagating to the root).
_OWN_HANDLER_LOGGERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey")


def mask_logging(*, capture_warnings: bool = False) -> None:
    """Add :class:`SecretFilter` to the root logger's handlers and to those of the loggers MLflow configures
    (idempotent; call again once MLflow is imported). ``capture_warnings`` (entry points) routes ``warnings``
    through logging so they pass it too."""
    if capture_warnings:
        logging.captureWarnings(True)
    handlers = list(logging.getLogger().handlers)
    for name in _OWN_HANDLER_LOGGERS:
        handlers += logging.getLogger(name).handlers
    for handler in handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(SecretFilter())


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
            f"environment instead: export {STORAGE_ENV}=<the URL with its password> (and leave storage unset), "
            "or give storage=postgresql://user@host/db with PGPASSWORD or a ~/.pgpass file")
    from_env = env.get(STORAGE_ENV, "").strip()
    return check_url(from_env, STORAGE_ENV) if from_env and configured == default else configured


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
