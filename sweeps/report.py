"""What a sweep reports on its parent run: progress per trial, and at the end the counts by state, the best
trial (``best_trial.json`` with the command that retrains it), ``trials.csv``, the note with the best trials'
table, the comparison of the best trials (by case, else by seed) and Optuna's plots."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

from stego_core._markdown import cell
from stego_core._markdown import row as md_row
from stego_core.config import parse_overrides
from stego_core.platform import tracking
from sweeps.objective import resolve_base_config
from sweeps.space import SweepConfig
from sweeps.storage import RUN_ATTR, close_stale_runs

__all__ = ["TOP_TRIALS", "SweepResult", "compare_best_trials", "log_plots", "log_progress", "retrain_command",
           "summarize", "sweep_note", "trial_scores", "trial_scores_by_seed"]

log = logging.getLogger(__name__)


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


def log_progress(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna callback: log the trial's value and the best value so far on the (active) parent run."""
    metrics = {}
    if trial.state == TrialState.COMPLETE and trial.value is not None:
        metrics["trial_value"] = trial.value
    with contextlib.suppress(ValueError):  # no completed trial yet
        metrics["best_value"] = study.best_value
    if metrics:
        tracking.log_metrics(metrics, step=trial.number)


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
