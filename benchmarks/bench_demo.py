"""Wall time of ``make demo`` per step: the demo's pipeline run end to end in a fresh folder, timed from outside.

Runs ``python -m experiments.main`` (the demo's own config, plus any ``key=value`` overrides) as a child
process in an empty working folder (its own ``mlflow.db``, ``outputs/``, phantoms), its output going to a log
file as in CI (not a TTY), then reads the wall time of every step from the MLflow runs it made: each step is one
run nested under the ``pipeline`` run, so ``end_time - start_time`` of each child is that step's time, and the
parent's time outside its children is the pipeline's own work (phantom generation, comparison, report, viewers).
The load average of the machine before and after is printed beside it: on shared cores the times grow with it.

Target: the whole demo in <= 4 min on 2 idle cores once installed (README, issue 33).

Usage::

    python benchmarks/bench_demo.py [--repo PATH] [--workdir DIR] [--keep] [key=value ...]

``--repo`` times the code of another checkout (e.g. ``git archive main | tar -x -C /tmp/before``: the demo
before a change); ``--workdir`` keeps the run's folder (log ``demo.log``, store, outputs) where you say.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: What a progress bar leaves in a log: carriage returns and terminal escape sequences.
CONTROL = re.compile(r"\r|\x1b\[")


def step_times(db: Path) -> tuple[list[tuple[str, float]], float]:
    """``([(run name, seconds)] of the pipeline's child runs in start order, the pipeline run's seconds)``."""
    with sqlite3.connect(db) as con:
        runs = con.execute("SELECT run_uuid, name, start_time, end_time FROM runs ORDER BY start_time").fetchall()
        parents = dict(con.execute("SELECT run_uuid, value FROM tags WHERE key = 'mlflow.parentRunId'").fetchall())
    by_id = {r[0]: r for r in runs}
    top = [r for r in runs if r[0] not in parents and r[1] == "pipeline"]
    if not top:
        raise RuntimeError(f"no pipeline run in {db}")
    parent = top[-1]
    children = [r for r in runs if parents.get(r[0]) == parent[0]]
    total = ((parent[3] or parent[2]) - parent[2]) / 1000
    steps = [(name, ((end or start) - start) / 1000) for _, name, start, end in children]
    del by_id
    return steps, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose demo is timed (default: this one)")
    parser.add_argument("--workdir", type=Path, default=None, help="run folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary run folder")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of experiments/configs/main.yaml")
    args = parser.parse_args()
    repo = args.repo.resolve()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "STEGO_"))}
    env |= {"PYTHONPATH": str(repo), "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}
    command = [sys.executable, "-m", "experiments.main", "--config", str(repo / "experiments/configs/main.yaml"),
               *args.overrides]
    load_before = os.getloadavg()
    print(f"repo {repo}\nworkdir {work}\ncpus {os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}), load "
          f"average before {load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1/5/15 min)",
          flush=True)
    log_path = work / "demo.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(command, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    load_after = os.getloadavg()
    text = log_path.read_text(errors="replace")
    steps, pipeline = step_times(work / "mlflow.db")
    print(f"exit code {rc}; log {log_path} ({len(text.splitlines())} lines, {len(CONTROL.findall(text))} "
          "progress-bar control characters)")
    width = max([len(n) for n, _ in steps] + [24])
    for name, seconds in steps:
        print(f"  {name:<{width}} {seconds:7.1f} s")
    inside = sum(s for _, s in steps)
    print(f"  {'pipeline (outside steps)':<{width}} {pipeline - inside:7.1f} s")
    print(f"  {'process start and exit':<{width}} {wall - pipeline:7.1f} s")
    print(f"demo_wall_s={wall:.1f} ({wall / 60:.2f} min)")
    print(f"load average after {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}")
    if args.workdir is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
