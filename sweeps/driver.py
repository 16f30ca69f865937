"""The sweep driver: one Optuna study, one MLflow parent run, one nested MLflow run per trial and per seed.

:func:`run_sweep` is the flow: the study in its storage (:mod:`sweeps.storage`), sampler and pruner, the parent
run, ``study.optimize`` over the trial objective (:mod:`sweeps.objective`), then the summary on the parent run
(:mod:`sweeps.report`).

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

import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import yaml
from optuna.trial import TrialState

from stego_core.config import flatten, load_config, save_config, to_dict
from stego_core.platform import tracking
from stego_core.runtime import faults
from sweeps.objective import Objective, check_space_keys, trial_config
from sweeps.report import SweepResult, log_progress, summarize
from sweeps.space import SweepConfig, grid_search_space, pruner_class, sampler_class
from sweeps.storage import make_storage, open_study

log = logging.getLogger(__name__)

#: Study user attribute holding the MLflow parent run id of the sweep.
PARENT_ATTR = "mlflow_parent_run_id"
#: How long a process that did not create the study waits for its creator to record the parent run.
PARENT_WAIT_S = 60.0
_PARAM_VALUE_MAX = 6000  # MLflow's param length limit, as in stego_core.platform.tracking.log_params


# --------------------------------------------------------------------------------------------- Optuna pieces


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
