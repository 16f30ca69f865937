"""``mlflow run . -e sweep``: an Optuna sweep whose trials are MLflow runs nested under one parent run.

    python -m sweeps.run --config sweeps/configs/sweep.yaml n_trials=12 study_name=my-sweep

Re-running with the same ``study_name`` and ``storage`` resumes the study (trials already done count toward
``n_trials``). More processes or machines join it with ``python -m sweeps.worker`` (see there). Overrides of
sweep keys (``n_trials=12``, ``sampler=random``, ``space.model.n_clusters.high=6``) change the sweep; any other
key (``train.max_steps=60``) is appended to ``base_overrides``, i.e. changes every trial's entry-point config
(see :func:`split_overrides`).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from stego_core.config import parse_overrides, plan_yaml
from stego_core.platform.cli import error, parse_args
from stego_core.platform.tracking import mask_secrets
from stego_core.runtime.faults import Interrupted, handle_signals, mask_logging, resolve_storage
from sweeps.driver import load_sweep_config, run_sweep
from sweeps.space import SPEC_FIELDS, SweepConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "sweep.yaml"
#: The entry point's config (its plan).
CONFIG = SweepConfig
#: Keys whose values are taken verbatim (not read as YAML): URLs and names.
VERBATIM_KEYS = ("storage", "study_name", "experiment")


def split_overrides(items: list[str]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Split ``key=value`` strings into sweep overrides, search-space overrides and entry-point overrides.

    - a key whose first part is a :class:`SweepConfig` field (``n_trials``, ``pruner_settings.n_warmup_steps``)
      is a sweep override; values are read as YAML, except for :data:`VERBATIM_KEYS`;
    - ``space.<config key>.<spec field>=value`` changes one field of a parameter
      (``space.model.n_clusters.high=6``), ``space.<config key>={type: ..., ...}`` adds or replaces a parameter
      and ``space.<config key>=null`` removes it;
    - any other key (``train.max_steps=60``) is appended to ``base_overrides``.
    """
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    sweep: dict[str, Any] = {}
    space: dict[str, Any] = {}
    base: list[str] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if sep and key.startswith("space."):
            space.update(parse_overrides([f"{key[len('space.'):]}={raw}"]))
        elif sep and key.split(".")[0] not in fields:
            base.append(item)
        elif sep and key in VERBATIM_KEYS:
            sweep[key] = raw
        else:
            sweep.update(parse_overrides([item]))
    return sweep, space, base


def apply_space_overrides(space: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``space`` with ``{"model.n_clusters.high": 6, "train.lr_head": None, ...}`` applied."""
    out = {name: dict(spec) if isinstance(spec, dict) else spec for name, spec in space.items()}
    for key, value in overrides.items():
        name, _, last = key.rpartition(".")
        if name and last in SPEC_FIELDS and name in out:
            out[name][last] = value
        elif value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def launch(config: str | Path, items: list[str], *, worker: bool = False, extra: dict[str, str] | None = None,
           print_config: bool = False) -> int:
    """Load the sweep config with ``items`` (``key=value``) and ``extra`` (verbatim values), run it, print the
    summary. Bad input exits 2 with a one-line message; failing trials do not (they are recorded); SIGTERM / SIGINT
    exit 143 / 130. A ``storage`` with a password is refused: it comes from ``$STEGO_OPTUNA_STORAGE`` only."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mask_logging(capture_warnings=True)  # URL passwords never reach a log line
    try:
        sweep_overrides, space_overrides, base_overrides = split_overrides(items)
        cfg = load_sweep_config(config, sweep_overrides)
        # a password is taken from the environment only (the command line is printed and logged)
        storage = resolve_storage(cfg.storage, default=SweepConfig.storage)
        cfg = load_sweep_config(config, {**sweep_overrides, "storage": storage, **(extra or {})})
        if space_overrides:
            cfg = dataclasses.replace(cfg, space=apply_space_overrides(cfg.space, space_overrides))
        if base_overrides:
            cfg = dataclasses.replace(cfg, base_overrides=(*cfg.base_overrides, *base_overrides))
        if print_config:  # the resolved plan (the storage's password masked), nothing run or logged
            print(mask_secrets(plan_yaml(dataclasses.replace(cfg, storage=mask_secrets(cfg.storage)))), end="")
            return 0
        with handle_signals():
            result = run_sweep(cfg, worker=worker)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        return error(exc)
    except Interrupted as exc:  # runs ended KILLED, the running trial FAIL
        print(f"error: {exc}; the sweep's runs ended KILLED and its running trial FAIL", file=sys.stderr)
        return exc.exit_code
    print(mask_secrets(str(result)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m sweeps.run [--config FILE] [--extra "k=v ..."] [k=v ...]`` (empty values are ignored)."""
    config, items, print_config = parse_args(argv, __doc__, None)
    return launch(config or DEFAULT_CONFIG, items, print_config=print_config)


if __name__ == "__main__":
    sys.exit(main())
