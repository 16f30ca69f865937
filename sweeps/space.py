"""Sweep configuration and search spaces: ``SweepConfig`` (a frozen dataclass loaded from YAML) and ``suggest``.

A search space maps config keys of the swept entry point (``train`` or ``baseline``) to parameter specs::

    space:
      slicing.patch_size: {type: categorical, choices: [16, 32]}
      model.n_clusters: {type: int, low: 2, high: 4}
      train.lr_head: {type: float, low: 1.0e-4, high: 1.0e-3, log: true}
      settings.sigmas_vox: {type: categorical, choices: [[1, 2], [1, 2, 3]]}

``suggest(trial, specs)`` draws one value per key and returns the config overrides of the trial. Categorical
choices that Optuna cannot store (lists, mappings) are offered to Optuna as their YAML text (``"[1, 2]"``) and
mapped back to the value. Seeds are not a parameter: they are repeats inside each trial (``seeds``).

>>> specs = parse_space({"model.n_clusters": {"type": "int", "low": 2, "high": 4},
...                      "settings.sigmas_vox": {"type": "categorical", "choices": [[1, 2], [1, 2, 3]]}})
>>> specs["settings.sigmas_vox"].labels
('[1, 2]', '[1, 2, 3]')
>>> grid_search_space(specs)
{'model.n_clusters': [2, 3, 4], 'settings.sigmas_vox': ['[1, 2]', '[1, 2, 3]']}
"""

from __future__ import annotations

import difflib
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from stego_core._checks import check_choice, check_range
from stego_core.evaluation.metrics import OBJECTIVE_KEYS

PARAM_TYPES = ("categorical", "int", "float")
TARGETS = ("stego", "baseline")
OBJECTIVES = OBJECTIVE_KEYS
DIRECTIONS = ("maximize", "minimize")
SAMPLERS = ("tpe", "random", "grid")
PRUNERS = ("none", "median", "percentile", "hyperband", "successive_halving", "threshold")
#: Entry-point YAML each target starts from when ``base_config`` is "" (relative to the repository).
DEFAULT_BASE_CONFIGS = {"stego": "experiments/configs/train_cpu.yaml", "baseline": "experiments/configs/baseline.yaml"}
#: Where each target's seed repeat goes when ``seed_key`` is not given ("" = no repeats: one run per trial).
DEFAULT_SEED_KEYS = {"stego": "train.seed", "baseline": ""}
#: Every field a parameter spec may have.
SPEC_FIELDS = ("type", "choices", "low", "high", "step", "log")
_SPEC_KEYS = {"categorical": ("type", "choices"), "int": ("type", "low", "high", "step", "log"),
              "float": ("type", "low", "high", "step", "log")}


@dataclass(frozen=True)
class ParamSpec:
    """One swept config key: ``categorical`` (``choices``), ``int`` or ``float`` (``low``..``high`` inclusive,
    optional ``step`` or ``log``)."""

    name: str
    type: str
    choices: tuple = ()
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def labels(self) -> tuple:
        """What Optuna stores for each choice: the choice itself when it is a scalar, else its YAML text."""
        return tuple(_label(c) for c in self.choices)

    def value_of(self, suggested: Any) -> Any:
        """The config value of an Optuna-suggested value (maps a categorical label back to its choice)."""
        if self.type != "categorical":
            return suggested
        return self.choices[self.labels.index(suggested)]

    def grid(self) -> list:
        """The values a grid search visits (categorical choices, or every ``int`` from ``low`` to ``high``)."""
        if self.type == "categorical":
            return list(self.labels)
        if self.type == "int" and not self.log:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        raise ValueError(f"space.{self.name}: sampler 'grid' needs categorical or linear int parameters; "
                         f"got type {self.type!r}{' with log' if self.log else ''}")


def _label(choice: Any) -> Any:
    if choice is None or isinstance(choice, (bool, int, float, str)):
        return choice
    return yaml.safe_dump(choice, default_flow_style=True, width=10_000).strip()


def parse_param(name: str, spec: Any) -> ParamSpec:
    """Check one search-space entry and return its :class:`ParamSpec`; errors name ``space.<name>``."""
    where = f"space.{name}"
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a mapping like {{type: int, low: 2, high: 4}}, got {spec!r}")
    kind = spec.get("type")
    check_choice(kind, f"{where}.type", PARAM_TYPES)
    unknown = [k for k in spec if k not in _SPEC_KEYS[kind]]
    if unknown:
        close = difflib.get_close_matches(unknown[0], _SPEC_KEYS[kind], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{where} has unknown key {unknown[0]!r}{hint}; a {kind} parameter takes "
                         f"{', '.join(_SPEC_KEYS[kind])}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, (list, tuple)) or not choices:
            raise ValueError(f"{where}.choices must be a non-empty list, got {choices!r}")
        labels = [_label(c) for c in choices]
        if len(set(map(repr, labels))) != len(labels):
            raise ValueError(f"{where}.choices has duplicates: {choices!r}")
        return ParamSpec(name, kind, choices=tuple(choices))
    if "low" not in spec or "high" not in spec:
        raise ValueError(f"{where} needs low and high")
    num = int if kind == "int" else float
    try:
        low, high = num(spec["low"]), num(spec["high"])
        step = None if spec.get("step") is None else num(spec["step"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: low, high and step must be {num.__name__}s, got {spec!r}") from None
    if kind == "int" and any(isinstance(spec.get(k), float) and not float(spec[k]).is_integer()
                             for k in ("low", "high", "step")):
        raise ValueError(f"{where}: an int parameter needs integer low/high/step, got {spec!r}")
    log = bool(spec.get("log", False))
    if low > high:
        raise ValueError(f"{where}: low={low} is above high={high}")
    if step is not None and step <= 0:
        raise ValueError(f"{where}.step must be positive, got {step}")
    if log and low <= 0:
        raise ValueError(f"{where}: log=true needs low > 0, got low={low}")
    if log and step is not None and not (kind == "int" and step == 1):
        raise ValueError(f"{where}: step and log=true cannot be combined")
    return ParamSpec(name, kind, low=low, high=high, step=step, log=log)


def parse_space(space: dict[str, Any]) -> dict[str, ParamSpec]:
    """Check a whole search space (``{config_key: spec}``) and return ``{config_key: ParamSpec}``."""
    if not isinstance(space, dict):
        raise ValueError(f"space must be a mapping of config keys to specs, got {space!r}")
    return {str(name): parse_param(str(name), spec) for name, spec in space.items()}


def suggest(trial: Any, specs: dict[str, ParamSpec]) -> dict[str, Any]:
    """Draw the trial's value of every parameter and return them as config overrides ``{"a.b": value}``.

    Every ``trial.suggest_*`` call of a sweep happens here (Optuna records the parameter under its config key).
    """
    overrides = {}
    for name, spec in specs.items():
        if spec.type == "categorical":
            value = spec.value_of(trial.suggest_categorical(name, list(spec.labels)))
        elif spec.type == "int":
            value = trial.suggest_int(name, int(spec.low), int(spec.high), step=int(spec.step or 1), log=spec.log)
        else:
            value = trial.suggest_float(name, spec.low, spec.high, step=spec.step, log=spec.log)
        overrides[name] = value
    return overrides


def grid_search_space(specs: dict[str, ParamSpec]) -> dict[str, list]:
    """The ``search_space`` of ``optuna.samplers.GridSampler`` (Optuna labels of every grid value)."""
    return {name: spec.grid() for name, spec in specs.items()}


def _check_kwargs(kind: str, name: str, settings: dict, target: Any) -> None:
    if not isinstance(settings, dict):
        raise ValueError(f"{kind}_settings must be a mapping of keyword arguments, got {settings!r}")
    params = inspect.signature(target).parameters
    valid = [p for p in params if p not in ("self", "search_space", "seed")]
    for key in settings:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{kind}_settings has {key!r}, which {kind} {name!r} does not take{hint}; "
                             f"valid: {', '.join(valid)}")


@dataclass(frozen=True)
class SweepConfig:
    """An Optuna study over one entry point (``target``), every trial an MLflow run nested under the sweep's.

    Attributes
    ----------
    study_name, storage
        The Optuna study; a study of that name in ``storage`` is resumed (``sqlite:///optuna.db`` for one
        machine, ``postgresql://user:password@host:5432/db`` for many workers, or ``journal:<path>`` for an
        Optuna journal file). Logged with the password masked.
    target : {"stego", "baseline"}
        Which entry point each trial runs: ``run_train`` (objective ``val/<objective>`` of the final
        validation reconstruction) or ``run_baseline`` (objective ``<objective>_mean`` over held-out volumes).
    base_config, base_overrides
        The entry point's YAML ("" = ``experiments/configs/train_cpu.yaml`` for stego, ``baseline.yaml`` for
        baselines; a relative path is looked up in the working folder, then in the repository) and
        ``section.key=value`` overrides applied before the trial's values.
    space : mapping
        ``{config_key: spec}``, see :func:`parse_param`.
    seeds, seed_key
        Repeats of every trial: one run per seed with ``seed_key`` (default ``train.seed`` for stego, none for
        baselines, which then run once per trial) set to it; the objective is the mean over seeds.
    objective, direction
        ``cldice`` (default) or ``dice``, maximised.
    n_trials, timeout_s
        The study's total number of trials (trials already in the study count; a heartbeat-stale trial that
        is retried counts once) and each process's time limit in seconds (None: no limit).
    sampler, sampler_seed, sampler_settings
        ``tpe``, ``random`` or ``grid`` (categorical / linear int parameters only), seeded, plus keyword
        arguments of the Optuna sampler (e.g. ``{n_startup_trials: 3, constant_liar: true}``).
    pruner, pruner_settings
        ``median`` (default), ``percentile``, ``hyperband``, ``successive_halving``, ``threshold`` or ``none``,
        plus keyword arguments of the Optuna pruner (e.g. ``{n_startup_trials: 2, n_warmup_steps: 50}``;
        ignored by ``none``).
    heartbeat_interval_s, grace_period_s, retry_stale_trials
        RDB storages only: a running trial beats every ``heartbeat_interval_s`` seconds; one silent for
        ``grace_period_s`` (default 2 x interval) is failed by the next worker that starts a trial, and
        re-queued up to ``retry_stale_trials`` times. ``heartbeat_interval_s: 0`` turns heartbeats off.
    experiment
        MLflow experiment of the sweep and all its runs ("" = the base config's ``experiment``).
    log_plots
        Log Optuna's plots on the parent run at the end of each process.
    """

    study_name: str = "stego-sweep"
    storage: str = "sqlite:///optuna.db"
    target: str = "stego"
    base_config: str = ""
    base_overrides: tuple[str, ...] = ()
    space: dict = field(default_factory=dict)
    seeds: tuple[int, ...] = (0, 1)
    seed_key: str | None = None
    objective: str = "cldice"
    direction: str = "maximize"
    n_trials: int = 6
    timeout_s: float | None = None
    sampler: str = "tpe"
    sampler_seed: int | None = 0
    sampler_settings: dict = field(default_factory=dict)
    pruner: str = "median"
    pruner_settings: dict = field(default_factory=dict)
    heartbeat_interval_s: int = 60
    grace_period_s: int | None = None
    retry_stale_trials: int = 0
    experiment: str = ""
    log_plots: bool = True

    def __post_init__(self) -> None:
        if not self.study_name.strip():
            raise ValueError("study_name must not be empty")
        if not self.storage.strip():
            raise ValueError("storage must not be empty (e.g. sqlite:///optuna.db)")
        check_choice(self.target, "target", TARGETS)
        check_choice(self.objective, "objective", OBJECTIVES)
        check_choice(self.direction, "direction", DIRECTIONS)
        check_choice(self.sampler, "sampler", SAMPLERS)
        check_choice(self.pruner, "pruner", PRUNERS)
        specs = parse_space(self.space)
        if not specs:
            raise ValueError("space is empty; give at least one parameter, e.g. "
                             "space: {model.n_clusters: {type: int, low: 2, high: 4}}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one seed, e.g. [0]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds has duplicates: {list(self.seeds)}")
        if self.resolved_seed_key and self.resolved_seed_key in specs:
            raise ValueError(f"{self.resolved_seed_key} is set by seeds (repeats inside a trial); "
                             "remove it from space")
        check_range(self.n_trials, "n_trials", 1)
        if self.timeout_s is not None:
            check_range(self.timeout_s, "timeout_s", 0.0, low_inclusive=False)
        check_range(self.heartbeat_interval_s, "heartbeat_interval_s", 0)
        if self.grace_period_s is not None:
            check_range(self.grace_period_s, "grace_period_s", 1)
        check_range(self.retry_stale_trials, "retry_stale_trials", 0)
        if self.sampler == "grid":
            grid_search_space(specs)  # raises naming a parameter a grid cannot hold
        _check_kwargs("sampler", self.sampler, self.sampler_settings, sampler_class(self.sampler))
        if self.pruner != "none":  # ``pruner=none`` on the command line ignores the YAML's pruner_settings
            _check_kwargs("pruner", self.pruner, self.pruner_settings, pruner_class(self.pruner))

    @property
    def specs(self) -> dict[str, ParamSpec]:
        return parse_space(self.space)

    @property
    def resolved_base_config(self) -> str:
        """``base_config``, or the target's default when it is empty."""
        return self.base_config or DEFAULT_BASE_CONFIGS[self.target]

    @property
    def resolved_seed_key(self) -> str:
        """Config key that receives each seed ("" = no repeats)."""
        return DEFAULT_SEED_KEYS[self.target] if self.seed_key is None else self.seed_key

    @property
    def repeat_seeds(self) -> tuple[int | None, ...]:
        """The seeds a trial runs (``(None,)``: one run, no seed override)."""
        return tuple(self.seeds) if self.resolved_seed_key else (None,)

    @property
    def grace_period(self) -> int:
        return self.grace_period_s if self.grace_period_s is not None else 2 * self.heartbeat_interval_s


def sampler_class(name: str) -> Any:
    import optuna

    return {"tpe": optuna.samplers.TPESampler, "random": optuna.samplers.RandomSampler,
            "grid": optuna.samplers.GridSampler}[name]


def pruner_class(name: str) -> Any:
    import optuna

    return {"none": optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
            "percentile": optuna.pruners.PercentilePruner, "hyperband": optuna.pruners.HyperbandPruner,
            "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
            "threshold": optuna.pruners.ThresholdPruner}[name]


def is_finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


__all__ = ["ParamSpec", "SweepConfig", "grid_search_space", "parse_param", "parse_space", "suggest",
           "sampler_class", "pruner_class", "PARAM_TYPES", "SAMPLERS", "PRUNERS", "TARGETS", "OBJECTIVES"]
