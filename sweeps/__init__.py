"""Optuna sweeps over STEGO (and baseline) settings, every trial an MLflow run nested under its sweep.

- :mod:`sweeps.space`: :class:`SweepConfig` (YAML) and ``suggest(trial, specs) -> config overrides``.
- :mod:`sweeps.driver`: storage, sampler, pruner, the objective (seeds as repeats) and the MLflow run tree.
- ``python -m sweeps.run`` runs or resumes a sweep; ``python -m sweeps.worker`` adds a worker to it.
"""

from sweeps.space import ParamSpec, SweepConfig, parse_space, suggest

__all__ = ["ParamSpec", "SweepConfig", "parse_space", "suggest"]
