"""Optuna sweeps over STEGO (and baseline) settings, every trial an MLflow run nested under its sweep.

- :mod:`sweeps.space`: :class:`SweepConfig` (YAML) and ``suggest(trial, specs) -> config overrides``.
- :mod:`sweeps.driver`: :func:`~sweeps.driver.run_sweep`, the flow: study, sampler, pruner, the MLflow parent run.
- :mod:`sweeps.storage`: storage URLs, :func:`~sweeps.storage.make_storage` (heartbeats), opening the study.
- :mod:`sweeps.objective`: one trial (seeds as repeats, pruning reports), each seed an ordinary nested run.
- :mod:`sweeps.report`: the parent run's note, best trial, comparison of the best trials and plots.
- ``python -m sweeps.run`` runs or resumes a sweep; ``python -m sweeps.worker`` adds a worker to it.
"""

from sweeps.space import ParamSpec, SweepConfig, parse_space, suggest

__all__ = ["ParamSpec", "SweepConfig", "parse_space", "suggest"]
