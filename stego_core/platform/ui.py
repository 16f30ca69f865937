"""The MLflow UI for this project (``make ui``): links that open each experiment's runs table in the
model-training view with the per-method columns shown, and a light local server.

What MLflow 3.17.2's UI does, read from its JavaScript bundle (``mlflow/server/js/build``), and what this module
does about it:

- **GenAI or model-training view.** The UI keeps the mode in the browser's local storage
  (``mlflow.workflowType_v1``, default ``"genai"``); a ``workflowType=machine_learning`` URL parameter overrides it
  for that page only, and in-app links drop the parameter, so the first click returns to GenAI. The mode sticks
  only when the user picks it with the sidebar switch (*GenAI | Model training*), which writes local storage.
  The experiment tag ``mlflow.experimentKind`` is not read by this version's UI (the workflow switch is always
  on), though :func:`stego_core.platform.tracking.start_run` still sets it to ``custom_model_development``. A server
  cannot write a browser's local storage: the links carry the parameter and the README says to click the
  switch once.
- **Columns.** The URL state of the runs table holds only its search facets (``searchFilter``, ``orderByKey``,
  ``orderByAsc``, ``startTime``, ``lifecycleFilter``, ``modelVersionFilter``, ``datasetsFilter``); selected
  columns live in local storage or in a *saved view*: an experiment tag ``mlflow.sharedViewState.<key>`` holding
  ``{"name", "createdAt", "updatedAt", "state"}`` with ``state`` the JSON of the table state
  (``selectedColumns`` as ``metrics.`<key>```...), opened by ``?viewStateShareKey=<key>`` and listed under
  *Views*. :func:`save_methods_view` writes one such view per experiment (the only write ``make ui`` makes).
- **Server.** ``mlflow ui`` starts 4 uvicorn workers and a job runner (huey consumers) by default: 15
  processes, about 3.3 GB on this machine. :func:`server_command` asks for one worker and no job execution
  (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``): 2 processes, about 0.5 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any
from urllib.parse import urlencode

from stego_core.platform import tracking

#: Key of the saved view :func:`save_methods_view` writes (``?viewStateShareKey=``).
VIEW_KEY = "stego-methods"
#: Name of that view in the runs table's *Views* menu.
VIEW_NAME = "Methods: Dice / clDice"
#: Prefix of MLflow's saved-view experiment tags.
SHARED_VIEW_PREFIX = "mlflow.sharedViewState."
#: The browser local-storage entry where MLflow 3.17's UI keeps the GenAI / model-training mode.
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"
#: Experiments ``make ui`` links by default (those that exist).
DEFAULT_EXPERIMENTS = ("stego-vessels", "stego-vessels-sweeps", "stego-vessels-ablation")
#: Metric-key prefixes that are curves or per-seed values, not per-method columns.
_NOT_METHODS = frozenset({"val", "val_final", "mean", "std", "intermediate", "train", "pretrain"})
_METHOD_METRIC = re.compile(r"^([^/]+)/(dice|cldice)$")
#: Sweep summaries shown after the per-method columns, when the experiment has them.
_SUMMARY_COLUMNS = ("objective", "best_value")


def method_columns(metric_keys: Iterable[str]) -> list[str]:
    """The runs-table columns of ``metric_keys``: ``<method>/dice`` and ``<method>/cldice`` (a pipeline's
    per-method scores, a sweep's ``best_trial/*``) per method in sorted order, then a sweep's ``objective`` and
    ``best_value`` when present, as ``metrics.`<key>``` names.

    >>> method_columns(["otsu/cldice", "otsu/dice", "val/dice", "dice/case_1", "dice_mean", "objective"])
    ['metrics.`otsu/dice`', 'metrics.`otsu/cldice`', 'metrics.`objective`']
    """
    keys = set(metric_keys)
    methods = sorted({m.group(1) for k in keys if (m := _METHOD_METRIC.match(k)) and m.group(1) not in _NOT_METHODS})
    chosen = [f"{method}/{score}" for method in methods for score in ("dice", "cldice") if f"{method}/{score}" in keys]
    chosen += [k for k in _SUMMARY_COLUMNS if k in keys]
    return [f"metrics.`{k}`" for k in chosen]


def view_tag(columns: Sequence[str], *, name: str = VIEW_NAME, now_ms: int | None = None) -> str:
    """The value of a saved-view tag (MLflow 3.17's envelope) that shows ``columns`` in the runs table.

    >>> json.loads(json.loads(view_tag(["metrics.`otsu/dice`"], now_ms=1))["state"])["selectedColumns"]
    ['metrics.`otsu/dice`']
    """
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    state = {"selectedColumns": list(columns), "runsExpanded": {}, "orderByKey": "attributes.start_time",
             "orderByAsc": False}
    return json.dumps({"name": name, "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def save_methods_view(client: Any, experiment_id: str, *, key: str = VIEW_KEY) -> list[str]:
    """Write (or refresh) the saved view ``key`` of ``experiment_id`` with its per-method columns.

    Parameters
    ----------
    client : mlflow.tracking.MlflowClient
        A client of the store (:func:`stego_core.platform.tracking.client`).
    experiment_id : str
        An existing experiment.
    key : str, keyword-only
        The view's share key.

    Returns
    -------
    list of str
        The columns shown (nothing is written when the experiment has none of them).
    """
    runs = client.search_runs([experiment_id], max_results=2000)
    columns = method_columns(k for run in runs for k in run.data.metrics)
    if columns:
        tag = f"{SHARED_VIEW_PREFIX}{key}"
        current = client.get_experiment(experiment_id).tags.get(tag)
        if current is None or json.loads(json.loads(current)["state"]).get("selectedColumns") != columns:
            client.set_experiment_tag(experiment_id, tag, view_tag(columns))
    return columns


def runs_link(base: str, experiment_id: str, *, view_key: str | None = None) -> str:
    """The runs table of ``experiment_id`` in the model-training view (with the saved view ``view_key``).

    >>> runs_link("http://127.0.0.1:5000/", "1", view_key="stego-methods")
    'http://127.0.0.1:5000/#/experiments/1/runs?viewStateShareKey=stego-methods&workflowType=machine_learning'
    """
    params = ({"viewStateShareKey": view_key} if view_key else {}) | {"workflowType": "machine_learning"}
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(params)}"


def experiment_links(names: Sequence[str], *, base: str) -> tuple[list[tuple[str, str]], list[str]]:
    """Links to the runs tables of the experiments in ``names`` that exist (none is created), each with the
    per-method saved view when the experiment has such columns; returns ``(links, missing names)``."""
    client = tracking.client()
    links, missing = [], []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            missing.append(name)
            continue
        columns = save_methods_view(client, exp.experiment_id)
        links.append((name, runs_link(base, exp.experiment_id, view_key=VIEW_KEY if columns else None)))
    return links, missing


def server_command(backend_store_uri: str, *, host: str, port: int, workers: int = 1
                   ) -> tuple[list[str], dict[str, str]]:
    """``mlflow ui`` for one local user: ``workers`` uvicorn worker(s) and no job runner; ``(argv, env)``. The
    store's URI goes in the environment (``MLFLOW_BACKEND_STORE_URI``), not on the command line, which every
    user of the machine can read (``ps``) and which is printed: it may hold a password."""
    argv = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", str(workers)]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                  "MLFLOW_BACKEND_STORE_URI": backend_store_uri}


HOW_TO_STAY = ("MLflow 3 opens in its GenAI view and in-app links drop workflowType=machine_learning: click "
               "'Model training' in the sidebar switch once (the browser remembers it), or use these links.")


def main(argv: list[str] | None = None) -> int:
    """``python -m stego_core.platform.ui [--host H] [--port P] [--workers N] [--print-only] [EXPERIMENT ...]``.

    Prints the runs-table link of each existing experiment (default :data:`DEFAULT_EXPERIMENTS`) in the store
    of ``MLFLOW_TRACKING_URI``, then replaces itself with ``mlflow ui`` (:func:`server_command`) unless
    ``--print-only``.
    """
    parser = argparse.ArgumentParser(prog="python -m stego_core.platform.ui", description=main.__doc__)
    parser.add_argument("experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--print-only", action="store_true", help="print the links, do not start the UI")
    args = parser.parse_args(argv)
    links, missing = experiment_links(args.experiments, base=f"http://{args.host}:{args.port}")
    for name, url in links:
        print(f"{name}: {url}")
    for name in missing:
        print(f"{name}: no such experiment in {tracking.mask_secrets(tracking.tracking_uri())} yet (not linked)")
    print(HOW_TO_STAY)
    sys.stdout.flush()
    if args.print_only:
        return 0
    command, env = server_command(tracking.tracking_uri(), host=args.host, port=args.port, workers=args.workers)
    print(f"starting: MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_BACKEND_STORE_URI="
          f"{tracking.mask_secrets(env['MLFLOW_BACKEND_STORE_URI'])} {' '.join(command[1:])}", flush=True)
    os.execvpe(command[0], command, env)
    return 0  # pragma: no cover - exec does not return


if __name__ == "__main__":
    raise SystemExit(main())
