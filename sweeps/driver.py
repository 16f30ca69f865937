"""The sweep driver: one Optuna study, one MLflow parent run, one nested MLflow run per trial and per seed.

Run layout in MLflow (experiment ``SweepConfig.experiment``)::

    <study_name>                      parent (sweep_role=parent): sweep params, progress, best trial, plots
      trial-000                       trial (sweep_role=trial): params, objective mean/std, trial_state tag
        trial-000-seed-0              the entry point's own run (run_train / run_baseline), nested
        trial-000-seed-1
      trial-001 ...

Decisions (documented in the README):

- Seeds are repeats: each trial runs every seed of ``seeds`` and returns the mean objective (std and per-seed
  values logged). Only the first seed reports intermediate values to Optuna (``trial.report`` at the training
  step of each validation), so the pruner compares curves of the same seed across trials; later seeds run only
  if the first one survives.
- Pruned trials end their MLflow runs KILLED (tag ``trial_state=PRUNED``), failed ones FAILED
  (``trial_state=FAIL``, ``error.txt``), completed ones FINISHED (``trial_state=COMPLETE``). A failing trial
  never stops the sweep (``catch=(Exception,)``).
- ``n_trials`` is the study's total: every trial already in the study counts (COMPLETE, PRUNED, FAIL and
  RUNNING in other workers), except a heartbeat-stale trial that was re-queued (its retry counts instead).
  A process runs at most the remaining number and stops as soon as the study reaches it; concurrent workers
  that start at the same moment may overshoot by at most one trial each.
- Resuming (same ``study_name`` and ``storage``) reuses the parent run: the process that creates the study
  opens it and stores its id in the study's user attribute ``mlflow_parent_run_id``; every later process
  (a resume, or an extra worker) nests its trials under that run.
- Workers share a study through an RDB storage with heartbeats: a worker killed mid-trial leaves its trial
  RUNNING until it has been silent for the grace period; the next trial started by any worker then marks it
  FAIL (the parent's summary also closes its MLflow runs as FAILED).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from stego_core._markdown import cell
from stego_core._markdown import row as md_row
from stego_core.config import (
    flatten,
    load_config,
    parse_overrides,
    save_config,
    to_dict,
)
from stego_core.data.cases import ensure_cases
from stego_core.platform import tracking
from stego_core.runtime import faults
from sweeps.space import (
    SweepConfig,
    grid_search_space,
    is_finite,
    pruner_class,
    sampler_class,
    suggest,
)

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Study user attribute holding the MLflow parent run id of the sweep.
PARENT_ATTR = "mlflow_parent_run_id"
#: Trial user attribute holding the trial's MLflow run id.
RUN_ATTR = "mlflow_run_id"
#: How long a process that did not create the study waits for its creator to record the parent run.
PARENT_WAIT_S = 60.0
_PARAM_VALUE_MAX = 6000  # MLflow's param length limit, as in stego_core.platform.tracking.log_params


class TrialPrunedRun(optuna.TrialPruned, tracking.RunKilled):
    """The pruner stopped a trial: Optuna records it PRUNED and its MLflow runs end KILLED."""


@dataclass
class SweepResult:
    """What a sweep process leaves behind (the study itself lives in the storage)."""

    study_name: str
    storage: str  # password masked
    parent_run_id: str
    n_trials: int
    states: dict[str, int]
    best_trial_number: int | None = None
    best_value: float | None = None
    best_params: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        states = ", ".join(f"{k}={v}" for k, v in self.states.items() if v)
        best = (f"best trial {self.best_trial_number}: {self.best_value:.4f} {self.best_params}"
                if self.best_trial_number is not None else "no completed trial")
        return (f"study {self.study_name!r} ({self.storage}): {self.n_trials} trials ({states}); {best}; "
                f"MLflow parent run {self.parent_run_id}")


# --------------------------------------------------------------------------------------------- Optuna pieces


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


def make_sampler(cfg: SweepConfig, *, seed: int | None) -> optuna.samplers.BaseSampler:
    """The configured sampler, seeded with ``seed``."""
    kwargs = dict(cfg.sampler_settings)
    if cfg.sampler == "grid":
        kwargs["search_space"] = grid_search_space(cfg.specs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return sampler_class(cfg.sampler)(seed=seed, **kwargs)


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return pruner_class(cfg.pruner)(**(cfg.pruner_settings if cfg.pruner != "none" else {}))


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


def trials_used(study: optuna.Study) -> int:
    """Trials that count toward ``n_trials``: all but WAITING ones and stale trials that were re-queued."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    return sum(1 for t in trials if t.state != TrialState.WAITING
               and not (t.state == TrialState.FAIL and t.number in retried))


class StopAtBudget:
    """Optuna callback: stop this process once the study holds ``n_trials`` counted trials."""

    def __init__(self, n_trials: int) -> None:
        self.n_trials = n_trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if trials_used(study) >= self.n_trials:
            study.stop()


def log_progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna callback: log the trial's value and the best value so far on the (active) parent run."""
    metrics = {}
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        metrics["trial_value"] = trial.value
    with contextlib.suppress(ValueError):  # no completed trial yet
        metrics["best_value"] = study.best_value
    if metrics:
        tracking.log_metrics(metrics, step=trial.number)


# --------------------------------------------------------------------------------------------- configs


def resolve_base_config(path: str) -> Path:
    """``base_config`` as given (absolute or relative to the working folder), else relative to the repository."""
    given = Path(path)
    if given.is_file():
        return given
    if not given.is_absolute() and (REPO_ROOT / given).is_file():
        return REPO_ROOT / given
    raise FileNotFoundError(f"base_config {path} not found (looked in {Path.cwd()} and {REPO_ROOT})")


def config_class(target: str) -> type:
    if target == "stego":
        from stego_core.steps.training import TrainConfig

        return TrainConfig
    from stego_core.steps.evaluation import BaselineConfig

    return BaselineConfig


def trial_config(cfg: SweepConfig, overrides: dict[str, Any], seed: int | None, *, experiment: str | None = None
                 ) -> Any:
    """The entry point's config of one run: base config, ``base_overrides``, the trial's values, the seed."""
    items = dict(parse_overrides(list(cfg.base_overrides)))
    items.update(overrides)
    if seed is not None:
        items[cfg.resolved_seed_key] = seed
    if experiment:
        items["experiment"] = experiment
    return load_config(config_class(cfg.target), resolve_base_config(cfg.resolved_base_config), items)


def check_space_keys(base: Any, names: list[str]) -> None:
    """Raise ``ValueError`` naming a swept key that is not a value of the entry point's config."""
    valid = list(flatten(base))
    for name in names:
        node = base
        for part in name.split("."):
            if isinstance(node, dict):  # a free-form mapping such as a baseline's ``settings``
                node = None
                break
            if not dataclasses.is_dataclass(node) or part not in {f.name for f in dataclasses.fields(node)}:
                import difflib

                close = difflib.get_close_matches(name, valid, n=1)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise ValueError(f"space.{name} is not a key of {type(base).__name__}{hint}")
            node = getattr(node, part)
        if dataclasses.is_dataclass(node):
            raise ValueError(f"space.{name} is a config section, not a value; sweep one of its keys")


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# --------------------------------------------------------------------------------------------- objective


class Objective:
    """``objective(trial) -> float``: suggest, run every seed of the trial as a nested run, return the mean.

    ``train_fn`` / ``baseline_fn`` default to :func:`stego_core.steps.training.run_train` and
    :func:`stego_core.steps.evaluation.run_baseline` (injectable for tests).
    """

    def __init__(self, cfg: SweepConfig, *, experiment: str, tags: dict[str, Any],
                 train_fn: Callable[..., Any] | None = None, baseline_fn: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self.specs = cfg.specs
        self.experiment = experiment
        self.tags = tags
        self.train_fn = train_fn
        self.baseline_fn = baseline_fn
        self.key = f"val/{cfg.objective}" if cfg.target == "stego" else f"{cfg.objective}_mean"

    def __call__(self, trial: optuna.Trial) -> float:
        overrides = suggest(trial, self.specs)
        trial.set_user_attr("overrides", _jsonable(overrides))
        tags = {**self.tags, "sweep_role": "trial", "optuna_trial_number": trial.number}
        tags["optuna_seeds"] = ",".join(map(str, self.cfg.seeds)) if self.cfg.resolved_seed_key else "none"
        description = (f"Optuna trial {trial.number} of study {self.cfg.study_name}: "
                       + ", ".join(f"{k}={v}" for k, v in overrides.items())
                       + f"; `objective` = mean {self.cfg.objective} over the seeds.")
        with tracking.start_run(self.experiment, run_name=f"trial-{trial.number:03d}", nested=True,
                                tags=tags, description=description) as run:
            trial.set_user_attr(RUN_ATTR, run.run_id)
            # Only the swept parameters, under their plain names: Compare's axes default to them.
            tracking.log_params(overrides)
            intermediate: list[tuple[int, float]] = []
            try:
                per_seed = []
                for i, seed in enumerate(self.cfg.repeat_seeds):
                    report = self._reporter(trial, intermediate) if i == 0 and self.cfg.target == "stego" else None
                    metrics = self._run_seed(trial, overrides, seed, report)
                    per_seed.append(metrics)
                    if seed is not None:
                        tracking.log_metrics({f"seed_{seed}/objective": metrics[self.key]})
                value = self._aggregate(trial, per_seed)
            except optuna.TrialPruned as exc:
                tracking.set_tags({"trial_state": "PRUNED"})
                if isinstance(exc, tracking.RunKilled):
                    raise
                raise TrialPrunedRun(str(exc)) from exc
            except Exception:
                tracking.set_tags({"trial_state": "FAIL"})
                raise
            finally:
                for step, v in intermediate:
                    tracking.log_metrics({f"intermediate/{self.key}": v}, step=step)
            tracking.set_tags({"trial_state": "COMPLETE"})
            return value

    def _reporter(self, trial: optuna.Trial, intermediate: list[tuple[int, float]]
                  ) -> Callable[[int, dict[str, float]], None]:
        key = self.key

        def report(step: int, metrics: dict[str, float]) -> None:
            value = metrics.get(key)
            if not is_finite(value):
                return
            intermediate.append((int(step), float(value)))
            trial.report(float(value), int(step))
            if trial.should_prune():
                raise TrialPrunedRun(f"trial {trial.number} pruned at step {step}: {key}={float(value):.4f}")

        return report

    def _run_seed(self, trial: optuna.Trial, overrides: dict[str, Any], seed: int | None,
                  report: Callable[[int, dict[str, float]], None] | None) -> dict[str, float]:
        cfg = trial_config(self.cfg, overrides, seed, experiment=self.experiment)
        ensure_cases(cfg.data)
        tags = {"study_name": self.cfg.study_name, "sweep_role": "seed", "optuna_trial_number": str(trial.number),
                "sweep_seed": str(seed)}
        if self.cfg.target == "stego":
            fn = self.train_fn
            if fn is None:
                from stego_core.steps.training import run_train as fn
            name = f"trial-{trial.number:03d}-seed-{seed}"
            result = fn(cfg, report=report, nested=True, run_name=name, tags=tags)
            metrics = dict(result.metrics)
        else:
            fn = self.baseline_fn
            if fn is None:
                from stego_core.steps.evaluation import run_baseline as fn
            result = fn(cfg, nested=True, tags=tags)
            metrics = dict(result.summary)
        if self.key not in metrics:
            raise ValueError(f"run {result.run_id} reported no {self.key!r} (the held-out volume needs a label); "
                             f"it reported {sorted(metrics)}")
        if not is_finite(metrics[self.key]):
            raise ValueError(f"run {result.run_id}: objective {self.key}={metrics[self.key]} is not finite")
        trial.set_user_attr(f"run_id/seed_{seed}" if seed is not None else "run_id/single", result.run_id)
        return metrics

    def _aggregate(self, trial: optuna.Trial, per_seed: list[dict[str, float]]) -> float:
        values = np.array([m[self.key] for m in per_seed], dtype=float)
        value, std = float(values.mean()), float(values.std())
        summary = {"objective": value, "objective_std": std}
        for key in per_seed[0]:
            column = [m.get(key) for m in per_seed]
            if all(is_finite(v) for v in column):
                summary[f"mean/{key}"] = float(np.mean(column))
                summary[f"std/{key}"] = float(np.std(column))
        tracking.log_metrics(summary)
        trial.set_user_attr("objective_std", std)
        if self.cfg.resolved_seed_key:
            trial.set_user_attr("objective_per_seed", {str(s): float(v) for s, v in zip(self.cfg.repeat_seeds, values)})
        return value


# --------------------------------------------------------------------------------------------- parent run


def _param_text(value: Any) -> str:
    text = str(value)
    return (tracking.mask_secrets(text) if "://" in text else text)[:_PARAM_VALUE_MAX]


def _log_sweep_params(run_id: str, cfg: SweepConfig) -> None:
    """Sweep settings as ``sweep.<key>`` params (apart from the trials' config keys and from the parameters
    ``mlflow run`` logs). MLflow params cannot change: when a resumed sweep changes one (``n_trials``), the new
    value goes to the tag ``resumed_with.<key>``."""
    params = {f"sweep.{k}": _param_text(v) for k, v in flatten(cfg).items()}
    existing = tracking.client().get_run(run_id).data.params
    new = {k: v for k, v in params.items() if k not in existing}
    changed = {f"resumed_with.{k.removeprefix('sweep.')}": v for k, v in params.items()
               if k in existing and existing[k] != v}
    if new:
        tracking.log_params(new)
    if changed:
        tracking.set_tags(changed)


def _run_exists(run_id: str) -> bool:
    try:
        tracking.client().get_run(run_id)
        return True
    except Exception:  # MlflowException (no such run in this tracking store)
        return False


def _find_parent(study: optuna.Study, cfg: SweepConfig, experiment: str) -> str | None:
    """The parent run of an existing study: its user attribute (waiting for a creator that is still starting),
    else the latest run of the experiment tagged with this ``study_name``, ``optuna_storage`` and
    ``sweep_role=parent``."""
    deadline = time.monotonic() + (PARENT_WAIT_S if not study.get_trials(deepcopy=False) else 0.0)
    run_id = study.user_attrs.get(PARENT_ATTR)
    while not run_id and time.monotonic() < deadline:
        time.sleep(0.5)
        run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id and _run_exists(run_id):
        return run_id
    if run_id:
        log.warning("parent run %s of study %s is not in tracking store %s; opening a new parent run", run_id,
                    cfg.study_name, tracking.mask_secrets(tracking.tracking_uri()))
        return None
    exp = tracking.client().get_experiment_by_name(experiment)
    storage_text = tracking.mask_secrets(cfg.storage)
    if exp is None or "'" in cfg.study_name + storage_text:
        return None
    runs = tracking.client().search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"],
                                         filter_string=f"tags.study_name = '{cfg.study_name}' and "
                                                       f"tags.optuna_storage = '{storage_text}' and "
                                                       "tags.sweep_role = 'parent'", max_results=1)
    return runs[0].info.run_id if runs else None


def _attach_project_run(parent_id: str, tags: dict[str, Any]) -> None:
    """Under ``mlflow run`` (``MLFLOW_RUN_ID`` set) a resumed sweep keeps its earlier parent run; the project's
    own run is then tagged as a ``session`` child of that parent, and taken out of the environment so that
    MLflow does not adopt it as the first trial run."""
    project_run = os.environ.pop("MLFLOW_RUN_ID", None)
    if not project_run or project_run == parent_id:
        return
    client = tracking.client()
    client.set_tag(project_run, "mlflow.parentRunId", parent_id)
    client.set_tag(project_run, "mlflow.runName", f"session-{tags['worker']}")
    for key, value in tags.items():
        client.set_tag(project_run, key, str(value))


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
        for child in children:
            client.set_tag(child.info.run_id, "end_reason", "worker lost (Optuna heartbeat stale)")
            client.set_terminated(child.info.run_id, "FAILED")
        client.set_tag(run_id, "trial_state", "FAIL")
        client.set_tag(run_id, "end_reason", "worker lost (Optuna heartbeat stale)")
        client.set_terminated(run_id, "FAILED")
        closed += 1
    return closed


def _figure_of(axes: Any) -> Any:
    return np.asarray(axes).flat[0].figure if isinstance(axes, np.ndarray) else axes.figure


def log_plots(study: optuna.Study) -> list[str]:
    """Log Optuna's matplotlib plots on the active run; returns the artifact paths logged.

    Parameter importances need two completed trials and a parameter that varies among them.
    """
    from optuna.visualization import matplotlib as ovm

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    plots: dict[str, Callable[[optuna.Study], Any]] = {}
    if complete:
        plots["optimization_history"] = ovm.plot_optimization_history
        plots["parallel_coordinate"] = ovm.plot_parallel_coordinate
    varying = {name for name in {p for t in complete for p in t.params}
               if len({repr(t.params.get(name)) for t in complete}) > 1}
    if len(complete) >= 2 and varying:
        plots["param_importances"] = ovm.plot_param_importances
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
        plots["intermediate_values"] = ovm.plot_intermediate_values
    logged = []
    for name, plot in plots.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # experimental API, degenerate axes of constant parameters
                figure = _figure_of(plot(study))
            figure.set_size_inches(9, 6)
            figure.tight_layout()
            tracking.log_figure(figure, f"plots/{name}.png")
            logged.append(f"plots/{name}.png")
        except Exception as exc:  # a plot must never fail the sweep
            log.warning("plot %s skipped: %s: %s", name, type(exc).__name__, exc)
    return logged


def summarize(study: optuna.Study, cfg: SweepConfig, parent_run_id: str, *, storage_text: str) -> SweepResult:
    """Log the study's state on the active parent run (counts, best trial, trials table, plots)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # trials of dead workers past their grace period -> FAIL
    closed = close_stale_runs(study)
    if closed:
        log.warning("closed %d MLflow trial run(s) whose worker was lost", closed)
    trials = study.get_trials(deepcopy=False)
    states = {s.name: sum(1 for t in trials if t.state == s) for s in TrialState}
    step = max((t.number for t in trials), default=0)
    tracking.log_metrics({f"n_trials_{k.lower()}": v for k, v in states.items()} | {"n_trials": len(trials)},
                         step=step)
    result = SweepResult(cfg.study_name, storage_text, parent_run_id, len(trials), states)
    try:
        best = study.best_trial
    except ValueError:  # no completed trial
        best = None
    if best is not None:
        result.best_trial_number, result.best_value, result.best_params = best.number, best.value, best.params
        tracking.log_metrics({"best_value": best.value, "best_trial_number": best.number}, step=step)
        tracking.set_tags({"best_trial_number": best.number, "best_value": f"{best.value:.6g}",
                           "best_trial_run_id": best.user_attrs.get(RUN_ATTR, ""),
                           **{f"best_params.{k}": v for k, v in best.params.items()}})
        tracking.log_text(json.dumps({
            "study_name": cfg.study_name, "number": best.number, "value": best.value, "objective": cfg.objective,
            "params": best.params, "user_attrs": best.user_attrs, "retrain_command": retrain_command(cfg, best)},
            indent=2, default=str), "best_trial.json")
    with contextlib.suppress(Exception):  # an empty study has no table
        tracking.log_text(study.trials_dataframe().to_csv(index=False), "trials.csv")
    tracking.set_description(sweep_note(study, cfg) + compare_best_trials(study, cfg))
    if best is not None:
        with contextlib.suppress(Exception):  # the best trial's scores as this row's own columns
            metrics = tracking.client().get_run(best.user_attrs[RUN_ATTR]).data.metrics
            tracking.log_metrics({f"best_trial/{k.split('/')[-1]}": v for k, v in metrics.items()
                                  if k in (f"mean/val/{m}" for m in ("dice", "cldice"))
                                  or k in (f"mean/{m}_mean" for m in ("dice", "cldice"))})
    if cfg.log_plots:
        log_plots(study)
    return result


def sweep_note(study: optuna.Study, cfg: SweepConfig, top: int = 10) -> str:
    """The sweep parent's markdown description: the best trial and the best ``top`` trials as a table."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    complete.sort(key=lambda t: t.value, reverse=cfg.direction == "maximize")
    lines = [f"**Optuna study `{cfg.study_name}`**: {len(study.get_trials(deepcopy=False))} trials, objective "
             f"`{cfg.objective}` ({cfg.direction}). Chart view: `trial_value` per trial and `best_value` so far; "
             f"artifacts `plots/`, `trials.csv`, `best_trial.json`.", ""]
    if not complete:
        return "\n".join(lines + ["No completed trial yet."])
    best = complete[0]
    names = list(best.params)
    lines += [f"Best: trial {best.number}, {cfg.objective} = **{best.value:.4f}**, run "
              f"`{best.user_attrs.get(RUN_ATTR, '?')}`.", "",
              md_row(["trial", "objective", *map(cell, names)]), "|---|---|" + "---|" * len(names)]
    for t in complete[:top]:
        lines.append(md_row([str(t.number), f"{t.value:.4f}", *(cell(t.params.get(n, "")) for n in names)]))
    return "\n".join(lines)


def _seed_runs(trial: optuna.trial.FrozenTrial) -> dict[str, str]:
    """The trial's seed runs by seed (``"single"`` without seeds), from its user attributes."""
    return {k.split("/", 1)[1].removeprefix("seed_"): v for k, v in trial.user_attrs.items()
            if k.startswith("run_id/")}


def trial_scores(trial: optuna.trial.FrozenTrial, cfg: SweepConfig) -> tuple[dict[str, dict[str, float]], str]:
    """A trial's scores for :func:`stego_core.steps.comparison.log_comparison`: ``(rows, unit)``.

    A baseline trial's seed runs are evaluations that log per-case scores (``<metric>/<case_id>``): rows are
    cases (``unit = "case"``), each value the mean over the trial's seeds. A STEGO trial validates on one
    held-out volume, so it has no per-case scores: rows are its seeds (``unit = "seed"``), each with the seed
    run's final ``dice`` / ``cldice`` (``val_final/*``, else ``val/*``) or, without them, the objective value
    the trial recorded for that seed.
    """
    from stego_core.steps.comparison import COMPARISON_KEYS

    runs = _seed_runs(trial)
    data = {seed: tracking.client().get_run(run_id).data for seed, run_id in runs.items()}
    metrics = {seed: d.metrics for seed, d in data.items()}
    per_case: dict[str, dict[str, list[float]]] = {}
    for seed, values in metrics.items():
        names = tracking.case_names(data[seed].tags)  # metric keys back to the case ids
        for key, value in values.items():
            name, sep, case = key.partition("/")
            if sep and name in COMPARISON_KEYS and case:
                per_case.setdefault(names.get(case, case), {}).setdefault(name, []).append(float(value))
    if per_case:
        return {case: {k: float(np.mean(v)) for k, v in row.items()} for case, row in per_case.items()}, "case"
    per_seed_objective = trial.user_attrs.get("objective_per_seed", {})
    rows: dict[str, dict[str, float]] = {}
    for seed, values in metrics.items():
        row = {}
        for k in ("dice", "cldice"):
            found = [values[f] for f in (f"val_final/{k}", f"val/{k}", f"{k}_mean") if f in values]
            if found:
                row[k] = float(found[0])
        if cfg.objective not in row and seed in per_seed_objective:
            row[cfg.objective] = float(per_seed_objective[seed])
        rows[f"seed {seed}"] = row
    if not rows and trial.value is not None:
        rows["single"] = {cfg.objective: float(trial.value)}
    return rows, "seed"


#: How many of the best completed trials the sweep parent compares.
TOP_TRIALS = 5


def compare_best_trials(study: optuna.Study, cfg: SweepConfig, top: int = TOP_TRIALS) -> str:
    """Statistics across cases (or seeds) of the ``top`` best completed trials, logged on the active parent run
    (``comparison.csv`` / ``comparison.md`` / the ``comparison/ci`` image); returns the note's section.

    Trials are paired by case when their runs record per-case scores (baseline sweeps), otherwise by seed (a
    STEGO trial validates on one volume): the section says which, and that a seed comparison measures the
    variation over seeds, not over volumes.
    """
    from stego_core.steps.comparison import log_comparison

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    complete.sort(key=lambda t: t.value, reverse=cfg.direction == "maximize")
    best = complete[:top]
    if len(best) < 2:
        return ""
    scored = {f"trial {t.number}": trial_scores(t, cfg) for t in best}
    units = {unit for _, unit in scored.values()}
    unit = "case" if units == {"case"} else "seed"
    if unit == "seed":  # some trials lack per-case scores: compare every trial over its seeds
        scored = {name: (rows, u) if u == "seed" else trial_scores_by_seed(t, cfg)
                  for (name, (rows, u)), t in zip(scored.items(), best)}
    per_case = {name: rows for name, (rows, _) in scored.items()}
    if unit == "case":
        title = f"The {len(best)} best trials across cases (seeds averaged)"
    else:
        title = f"The {len(best)} best trials across seeds"
    section = log_comparison(per_case, unit=unit, title=title,
                             note_keys=tuple(dict.fromkeys((cfg.objective, "dice", "cldice"))))
    if not section:
        return ""
    if unit == "seed":
        section = section.replace(
            "\n\n", "\n\nThe trials record no per-case scores (a STEGO trial validates on one held-out volume): "
            "they are compared over their seeds, paired by seed; this is the variation over training seeds, not "
            "over volumes.\n\n", 1)
    return "\n\n" + section


def trial_scores_by_seed(trial: optuna.trial.FrozenTrial, cfg: SweepConfig
                         ) -> tuple[dict[str, dict[str, float]], str]:
    """A trial's objective per seed (``objective_per_seed``; its value alone without seeds), for a comparison
    of trials over seeds when not all of them have per-case scores."""
    per_seed = trial.user_attrs.get("objective_per_seed") or {"single": trial.value}
    return {f"seed {s}": {cfg.objective: float(v)} for s, v in per_seed.items()}, "seed"


def retrain_command(cfg: SweepConfig, trial: optuna.trial.FrozenTrial) -> str:
    """The entry-point command that reruns ``trial``'s configuration (first seed of the base config)."""
    entry = "train" if cfg.target == "stego" else "baseline"
    values = {**dict(parse_overrides(list(cfg.base_overrides))), **trial.user_attrs.get("overrides", {})}
    words = [f"python -m experiments.{entry}", "--config", str(resolve_base_config(cfg.resolved_base_config)),
             *(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items())]
    return " ".join(shlex.quote(w) if i >= 2 else w for i, w in enumerate(words))


# --------------------------------------------------------------------------------------------- entry


def run_sweep(cfg: SweepConfig, *, worker: bool = False, train_fn: Callable[..., Any] | None = None,
              baseline_fn: Callable[..., Any] | None = None) -> SweepResult:
    """Run (or resume, or join as a worker) the study ``cfg.study_name`` until it holds ``cfg.n_trials`` trials.

    Parameters
    ----------
    cfg : SweepConfig
        The sweep.
    worker : bool
        An extra worker: its sampler seed is drawn fresh (two workers must not propose the same points);
        otherwise the seed is ``sampler_seed`` + the number of trials already in the study (reproducible).
    train_fn, baseline_fn
        Replacements of ``run_train`` / ``run_baseline`` (same signatures), for tests.

    Returns
    -------
    SweepResult
        Counts by trial state and the best trial of the whole study (all workers).
    """
    base = trial_config(cfg, {}, cfg.repeat_seeds[0])
    check_space_keys(base, list(cfg.specs))
    experiment = cfg.experiment or base.experiment
    storage_text = tracking.mask_secrets(cfg.storage)
    storage = make_storage(cfg.storage, heartbeat_interval_s=cfg.heartbeat_interval_s,
                           grace_period_s=cfg.grace_period_s, retry_stale_trials=cfg.retry_stale_trials)
    study, created = open_study(cfg, storage)
    n_existing = len(study.get_trials(deepcopy=False))
    seed = cfg.sampler_seed
    if seed is not None:
        seed = seed + n_existing + (int(np.random.SeedSequence().entropy % 2**30) if worker else 0)
    study.sampler = make_sampler(cfg, seed=seed)
    study.pruner = make_pruner(cfg)
    parent_id = None if created else _find_parent(study, cfg, experiment)
    method = "stego" if cfg.target == "stego" else str(base.method)
    worker_name = f"{socket.gethostname()}:{os.getpid()}"
    tags = {"study_name": cfg.study_name, "method": method, "kind": "sweep", "target": cfg.target}
    if parent_id is not None:
        _attach_project_run(parent_id, {**tags, "sweep_role": "session", "worker": worker_name})
    with tracking.start_run(experiment, run_name=cfg.study_name, run_id=parent_id,
                            description=f"Optuna study {cfg.study_name} ({cfg.target}, objective {cfg.objective}): "
                                        "expand the row (+) for the trials; the summary appears when it ends.",
                            tags={**tags, "sweep_role": "parent", "optuna_storage": storage_text}) as parent:
        if parent_id is None:
            study.set_user_attr(PARENT_ATTR, parent.run_id)
            sweep_yaml = to_dict(cfg) | {"storage": storage_text}
            tracking.log_text(yaml.safe_dump(sweep_yaml, sort_keys=False), tracking.PLAN_ARTIFACT)
            save_config(base, parent.output_dir / "base_config.yaml")
            tracking.log_artifact(parent.output_dir / "base_config.yaml")
        _log_sweep_params(parent.run_id, cfg)
        remaining = cfg.n_trials - trials_used(study)
        log.info("study %s in %s: %d trials, %d to run here (n_trials=%d); MLflow parent run %s",
                 cfg.study_name, storage_text, n_existing, max(remaining, 0), cfg.n_trials, parent.run_id)
        if remaining > 0:
            objective = Objective(cfg, experiment=experiment, train_fn=train_fn,
                                  baseline_fn=baseline_fn,
                                  tags={**tags, "worker": worker_name, "sampler_seed_effective": seed})
            study.optimize(faults.fail_trial_on_interrupt(objective), n_trials=remaining, timeout=cfg.timeout_s,
                           catch=(Exception,),
                           callbacks=[StopAtBudget(cfg.n_trials), log_progress], gc_after_trial=True)
        return summarize(study, cfg, parent.run_id, storage_text=storage_text)


def load_sweep_config(path: str | Path | None, overrides: list[str] | dict | None = None) -> SweepConfig:
    """Load a :class:`SweepConfig` from YAML plus ``key=value`` overrides (``storage`` kept verbatim)."""
    return load_config(SweepConfig, path, overrides)
