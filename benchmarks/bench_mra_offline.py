"""Wall time of the offline real-data preset (``experiments/configs/mra_offline.yaml``) on one volume.

Runs the ``main`` pipeline with that preset on ``--root`` (a folder holding one case, e.g. a folder with a link to
``../shared/data/mra_mni_0656``), then reads every nested run's start and end from MLflow and prints the wall
time of each step and in all, against the issue's budget (20 minutes for one 320 x 320 x 247 volume on 2 CPU
cores). Extra ``key=value`` overrides are passed to the preset.

    MLFLOW_TRACKING_URI=sqlite:///bench.db python benchmarks/bench_mra_offline.py --root data/mra_0656

Last line (machine-readable): ``mra_offline_minutes=<total>``.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from stego_core.config import load_config
from stego_core.platform import tracking
from stego_core.steps.pipeline import MainConfig, run_main

PRESET = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "mra_offline.yaml"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", required=True, help="folder of the case(s) to run on")
    p.add_argument("--output", default="outputs/bench_mra_offline")
    p.add_argument("--experiment", default="bench-mra-offline")
    p.add_argument("--budget-minutes", type=float, default=20.0)
    p.add_argument("overrides", nargs="*", help="key=value overrides of the preset")
    args = p.parse_args()
    cfg = load_config(MainConfig, PRESET, [f"data.root={args.root}", f"output={args.output}",
                                           f"experiment={args.experiment}", *args.overrides])
    print(f"preset {PRESET.name} on {args.root}; torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, {os.cpu_count()} CPUs")
    t0 = time.perf_counter()
    print(run_main(cfg))
    total = time.perf_counter() - t0

    client = tracking.client()
    experiment = client.get_experiment_by_name(args.experiment)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.info.run_name == "pipeline")
    steps = sorted((r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id),
                   key=lambda r: r.info.start_time)
    print("| step | wall time (min) |\n|---|---|")
    for r in steps:
        print(f"| {r.info.run_name} | {(r.info.end_time - r.info.start_time) / 60000:.2f} |")
    print(f"| all (pipeline run) | {total / 60:.2f} |")
    verdict = "within" if total / 60 <= args.budget_minutes else "OVER"
    print(f"{verdict} the {args.budget_minutes:g}-minute budget")
    print(f"mra_offline_minutes={total / 60:.2f}")


if __name__ == "__main__":
    main()
