"""benchmarks/bench_demo.py reads each step's wall time from the runs the demo made (a real SQLite store)."""

from __future__ import annotations

import importlib.util
import time

from conftest import REPO_ROOT

from stego_core.platform import tracking


def _bench():
    spec = importlib.util.spec_from_file_location("bench_demo", REPO_ROOT / "benchmarks" / "bench_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_times_are_the_pipeline_children_in_order(mlflow_store, tmp_path):
    with tracking.start_run("bench", run_name="pipeline"):
        for name in ("prepare", "otsu"):
            with tracking.start_run("bench", run_name=name, nested=True):
                time.sleep(0.05)
    with tracking.start_run("bench", run_name="otsu"):  # a run of another entry point: not a step
        pass
    steps, total = _bench().step_times(tmp_path / "mlflow.db")
    assert [name for name, _ in steps] == ["prepare", "otsu"]
    assert all(0.04 <= seconds < 30 for _, seconds in steps)
    assert total >= sum(seconds for _, seconds in steps)
