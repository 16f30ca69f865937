"""One trial of a sweep: the entry point's config of each run, the objective over the seeds, pruning reports.

:class:`Objective` is what Optuna calls: it suggests the trial's values (:func:`sweeps.space.suggest`), opens the
trial's MLflow run, runs every seed of ``seeds`` as an ordinary nested training or evaluation run
(:func:`trial_config` builds its config from the base config, ``base_overrides``, the trial's values and the
seed) and returns the mean objective (std and per-seed values logged). Seeds are repeats: only the first seed
reports intermediate values to Optuna (``trial.report`` at the training step of each validation), so the pruner
compares curves of the same seed across trials; a pruned trial raises :class:`TrialPrunedRun` and its runs end
KILLED, a failing one FAIL.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from stego_core.config import PROJECT_ROOT, flatten, load_config, parse_overrides
from stego_core.data.cases import ensure_cases
from stego_core.platform import tracking
from sweeps.space import SweepConfig, is_finite, suggest
from sweeps.storage import RUN_ATTR

__all__ = ["Objective", "TrialPrunedRun", "check_space_keys", "config_class", "resolve_base_config",
           "trial_config"]


class TrialPrunedRun(optuna.TrialPruned, tracking.RunKilled):
    """The pruner stopped a trial: Optuna records it PRUNED and its MLflow runs end KILLED."""


def resolve_base_config(path: str) -> Path:
    """``base_config`` as given (absolute or relative to the working folder), else relative to the repository."""
    given = Path(path)
    if given.is_file():
        return given
    if not given.is_absolute() and (PROJECT_ROOT / given).is_file():
        return PROJECT_ROOT / given
    raise FileNotFoundError(f"base_config {path} not found (looked in {Path.cwd()} and {PROJECT_ROOT})")


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
