"""One more worker on an existing (or new) sweep: start one per process, on any machine that reaches the storage.

    STEGO_OPTUNA_STORAGE=postgresql://user:password@db-host:5432/optuna python -m sweeps.worker --study-name my-sweep \\
        [--config sweeps/configs/sweep.yaml] [key=value ...]

``--storage`` defaults to the environment variable ``STEGO_OPTUNA_STORAGE``, the only place a password is
accepted (a ``--storage`` with one is refused: it would show in the process list). Workers share the study
through the database: Optuna hands each a different trial, heartbeats let the others fail the trial of a
worker that died, and every trial nests under the sweep's one MLflow parent run (point all workers at the same
tracking server with ``MLFLOW_TRACKING_URI``). A worker stops when the study
holds ``n_trials`` trials. Its sampler seed is drawn fresh, so workers never propose the same points.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from stego_core.runtime.faults import STORAGE_ENV, has_password
from sweeps.run import DEFAULT_CONFIG, launch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=None,
                        help="Optuna storage URL without a password (default: $STEGO_OPTUNA_STORAGE, the only "
                             "place for one; or PGPASSWORD / ~/.pgpass)")
    parser.add_argument("--study-name", required=True, help="the study to join (created if missing)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="sweep YAML (default: %(default)s)")
    parser.add_argument("--extra", default="", help="more overrides in one string, split like a shell line")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override any sweep config key")
    parser.add_argument("--print-config", action="store_true", help="print the resolved plan as YAML and exit")
    args = parser.parse_args(argv)
    if args.storage and has_password(args.storage):
        parser.error(f"--storage holds a password, visible in the process list; export {STORAGE_ENV} instead "
                     "(or use a URL without password plus PGPASSWORD / ~/.pgpass)")
    args.storage = args.storage or os.environ.get(STORAGE_ENV)
    if not args.storage:
        parser.error(f"--storage is required (or set {STORAGE_ENV})")
    items = [o for o in list(args.overrides) + shlex.split(args.extra) if not o.endswith("=")]
    return launch(args.config, items, worker=True, extra={"storage": args.storage, "study_name": args.study_name},
                  print_config=args.print_config)


if __name__ == "__main__":
    sys.exit(main())
