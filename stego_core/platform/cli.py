"""Command-line handling shared by the entry points in ``experiments/`` and ``sweeps/`` (no maths, no MLflow
calls): ``--config FILE``, ``--extra "k=v ..."``, ``section.key=value`` overrides and ``--print-config``,
one-line errors."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stego_core.config import load_config, plan_yaml
from stego_core.evaluation.metrics import OBJECTIVE_KEYS
from stego_core.platform.console import setup_logging
from stego_core.runtime import distributed
from stego_core.runtime.faults import Interrupted, handle_signals, mask_logging, mask_secrets

T = TypeVar("T")
#: Metric keys an entry point prints after a run.
_PRINTED = {*OBJECTIVE_KEYS, *(f"{k}_mean" for k in OBJECTIVE_KEYS)}


def parser_for(description: str, default_config: str | Path | None) -> argparse.ArgumentParser:
    """The command line every entry point shares: ``--config``, ``--extra``, ``--print-config`` and overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=str(default_config) if default_config else None,
                        help="YAML config (default: %(default)s)")
    parser.add_argument("--extra", default="",
                        help="more overrides in one string, split like a shell line: \"a.b=1 'c={x: 2}'\"")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config key, e.g. model.n_clusters=3 (empty values are ignored)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the fully resolved plan as YAML and exit (nothing runs, nothing is logged)")
    return parser


def parse_args(argv: list[str] | None, description: str, default_config: str | Path | None
               ) -> tuple[str | None, list[str], bool]:
    """``(config path, overrides, print_config)`` from the command line; empty ``key=`` values are dropped
    (the MLproject passes ``""`` for 'keep the config's value')."""
    args = parser_for(description, default_config).parse_args(argv)
    items = list(args.overrides) + shlex.split(args.extra)
    return args.config, [o for o in items if not o.endswith("=")], args.print_config


def parse(argv: list[str] | None, description: str, default_config: str | Path | None
          ) -> tuple[str | None, list[str]]:
    """``(config path, overrides)`` from the command line; empty ``key=`` values are dropped."""
    config, overrides, _ = parse_args(argv, description, default_config)
    return config, overrides


def run(cls: type[T], fn: Callable[[T], Any], argv: list[str] | None, *, description: str,
        default_config: str | Path | None) -> int:
    """Load ``cls`` from the config and overrides, call ``fn``; bad input exits 2 with a one-line message,
    SIGTERM / SIGINT exit 143 / 130 (see :func:`stego_core.runtime.faults.handle_signals`). ``--print-config`` prints
    the resolved plan and exits 0 without calling ``fn``."""
    setup_logging()  # time-stamped lines, no library chatter, no progress bars in a log file
    mask_logging(capture_warnings=True)  # URL passwords never reach a log line
    config_path, overrides, print_config = parse_args(argv, description, default_config)
    try:
        config = load_config(cls, config_path, overrides)
    except (ValueError, FileNotFoundError) as exc:
        return error(exc)
    if print_config:
        print(mask_secrets(plan_yaml(config)), end="")
        return 0
    try:
        with handle_signals():
            result = fn(config)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as exc:
        return error(exc)
    except Interrupted as exc:  # SIGTERM / SIGINT: the run ended KILLED; exit 143 / 130 like a killed process
        print(f"error: {exc}; the run ended KILLED", file=sys.stderr)
        return exc.exit_code
    if result is not None and distributed.is_main():  # one summary per job, from rank 0
        print(mask_secrets(describe(result)))
    return 0


def error(exc: BaseException, code: int = 2) -> int:
    """Print ``error: <exc>`` on one line (URL passwords masked) to stderr; returns ``code``."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    print(f"error: {mask_secrets(text)}", file=sys.stderr)
    return code


def describe(result: Any) -> str:
    """One readable summary of what a step returned (run id and headline metrics; text as is)."""
    if isinstance(result, str):
        return result
    parts = [f"run {result.run_id}"] if hasattr(result, "run_id") else []
    metrics = getattr(result, "summary", None) or getattr(result, "metrics", None) or {}
    keys = [k for k in metrics if k.split("/")[-1] in _PRINTED]
    parts += [f"{k}={metrics[k]:.4f}" for k in keys]
    warned = getattr(result, "warned", None)
    if warned:
        parts.append(f"domain_warnings={len(warned)}/{len(getattr(result, 'rows', []) or warned)} (cases.csv)")
    for attr in ("model_uri", "dataset_dir", "output_dir"):
        if getattr(result, attr, None):
            parts.append(f"{attr}={getattr(result, attr)}")
    return "  ".join(parts) or repr(result)
