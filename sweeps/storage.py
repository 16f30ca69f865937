"""Where a sweep's study lives: the storage URL and its driver, opening the storage (heartbeats, retries of a
race on a fresh database), creating or loading the study, and closing the MLflow runs of trials whose worker
was lost (heartbeat stale).

RDB storages (SQLite, PostgreSQL, MySQL) run with heartbeats: a worker killed mid-trial leaves its trial
RUNNING until it has been silent for the grace period; the next trial started by any worker then marks it FAIL,
and :func:`close_stale_runs` ends its MLflow runs FAILED. ``journal:<path>`` is a journal file (no heartbeats).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from stego_core.platform import tracking
from stego_core.runtime import faults
from sweeps.space import SweepConfig

__all__ = ["RUN_ATTR", "close_stale_runs", "make_storage", "open_study"]

#: Trial user attribute holding the trial's MLflow run id.
RUN_ATTR = "mlflow_run_id"


def make_storage(url: str, *, heartbeat_interval_s: int = 60, grace_period_s: int | None = None,
                 retry_stale_trials: int = 0) -> optuna.storages.BaseStorage:
    """Open an Optuna storage: an RDB URL (SQLite, PostgreSQL, MySQL) or ``journal:<path>`` (a journal file).

    RDB storages get heartbeats when ``heartbeat_interval_s > 0``: a trial silent for ``grace_period_s``
    (default 2 x interval) is failed by the next trial start, and re-queued ``retry_stale_trials`` times.
    """
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = url[len("journal:"):]
        if not path:
            raise ValueError("storage='journal:' needs a file path, e.g. journal:optuna.log")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise ValueError(f"storage={tracking.mask_secrets(url)!r} is not a database URL; use e.g. "
                         "sqlite:///optuna.db, postgresql://user:password@host:5432/db or journal:optuna.log")
    url = faults.sqlalchemy_url(faults.check_url(url, "storage"))
    engine_kwargs: dict[str, Any] = ({"connect_args": {"timeout": 60}} if url.startswith("sqlite")
                                     else {"pool_pre_ping": True})
    heartbeat: dict[str, Any] = {}
    if heartbeat_interval_s > 0:
        heartbeat = {"heartbeat_interval": int(heartbeat_interval_s),
                     "grace_period": int(grace_period_s or 2 * heartbeat_interval_s)}
        if retry_stale_trials:
            heartbeat["heartbeat_stale_trial_callback"] = optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=retry_stale_trials)
    import sqlalchemy.exc

    for attempt in range(6):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                with faults.store_lock(url):  # serialise creating the tables of a new SQLite file
                    return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)
        except ImportError:
            raise
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as exc:
            # Workers starting together on a fresh database race to create Optuna's tables: wait and retry.
            error = exc
            time.sleep(0.5 + attempt)
        except Exception as exc:  # connection errors and the like
            error = exc
            break
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""  # never echo the unmasked URL
    raise RuntimeError(f"cannot open Optuna storage {tracking.mask_secrets(url)}: "
                       f"{type(error).__name__}: {tracking.mask_secrets(first)}") from None


def open_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists (``created`` False). Creation is atomic in the storage,
    so of several processes starting together exactly one creates it."""
    identity = {"objective": cfg.objective, "target": cfg.target}
    try:
        study = optuna.create_study(study_name=cfg.study_name, storage=storage, direction=cfg.direction,
                                    load_if_exists=False)
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_metric_names([cfg.objective])  # Optuna's plots name the axis after the objective
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=cfg.study_name, storage=storage)
    have = {"direction": study.direction.name.lower(), **{k: study.user_attrs.get(k, v) for k, v in identity.items()}}
    for key, value in {"direction": cfg.direction, **identity}.items():
        if have[key] != value:
            raise ValueError(f"study {cfg.study_name!r} exists with {key}={have[key]!r}, not {value!r}: its "
                             "trials would not be comparable; choose another study_name")
    return study, False


def close_stale_runs(study: optuna.Study) -> int:
    """End FAILED the MLflow runs of trials that Optuna failed while their worker was gone (heartbeat lost).

    Returns the number of trial runs closed.
    """
    client = tracking.client()
    closed = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = trial.user_attrs.get(RUN_ATTR)
        if not run_id:
            continue
        try:
            run = client.get_run(run_id)
        except Exception:
            continue
        if run.info.status != "RUNNING":
            continue
        children = client.search_runs([run.info.experiment_id], filter_string=(
            f"tags.mlflow.parentRunId = '{run_id}' and attributes.status = 'RUNNING'"))
        with faults.deferred_signals():  # a trial's runs are closed whole, as tracking's own writes are
            for child in children:
                client.set_tag(child.info.run_id, "end_reason", "worker lost (Optuna heartbeat stale)")
                client.set_terminated(child.info.run_id, "FAILED")
            client.set_tag(run_id, "trial_state", "FAIL")
            client.set_tag(run_id, "end_reason", "worker lost (Optuna heartbeat stale)")
            client.set_terminated(run_id, "FAILED")
        closed += 1
    return closed
