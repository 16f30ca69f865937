"""The MLflow UI for this project (``make ui``): the link that opens the latest comparison report full page, links
that open each experiment's runs table in the model-training view with the per-method columns shown, and a light
local server.

What MLflow 3.17.2's UI does, read from its JavaScript bundle (``mlflow/server/js/build``), and what this module
does about it:

- **GenAI or model-training view.** The UI keeps the mode in the browser's local storage
  (``mlflow.workflowType_v1``, default ``"genai"``); a ``workflowType=machine_learning`` URL parameter overrides it
  for that page only, and in-app links drop the parameter, so the first click returns to GenAI. The mode sticks
  only when the user picks it with the sidebar switch (*GenAI | Model training*), which writes local storage.
  The experiment tag ``mlflow.experimentKind`` is not read by this version's UI (the workflow switch is always
  on), though :func:`stego_core.platform.tracking.start_run` still sets it to ``custom_model_development``. A server
  cannot write a browser's local storage, but a page of its origin can: the server runs MLflow's app with two
  landing pages added (:mod:`stego_core.platform.ui_app`, through MLflow's ``--app-name`` hook), which write the
  storage and then open the runs table (``/stego/open?to=...``) or a run's ``report.html`` full page
  (``/stego/report/<run id>``); the links printed here go through them. The choice then sticks for every click.
- **Columns.** The URL state of the runs table holds only its search facets (``searchFilter``, ``orderByKey``,
  ``orderByAsc``, ``startTime``, ``lifecycleFilter``, ``modelVersionFilter``, ``datasetsFilter``); selected
  columns live in local storage or in a *saved view*: an experiment tag ``mlflow.sharedViewState.<key>`` holding
  ``{"name", "createdAt", "updatedAt", "state"}`` with ``state`` the JSON of the table state
  (``selectedColumns`` as ``metrics.`<key>```...), opened by ``?viewStateShareKey=<key>`` and listed under
  *Views*. :func:`save_methods_view` writes one such view per experiment (the only write ``make ui`` makes).
- **Server.** ``mlflow ui`` starts 4 uvicorn workers and a job runner (huey consumers) by default: 15
  processes, about 3.3 GB on this machine. :func:`server_command` asks for one worker and no job execution
  (``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``): 2 processes, about 0.5 GB.
- **Columns shown.** The saved view starts with a step's own ``cldice_mean`` / ``dice_mean`` (each child row of a
  pipeline, one per method, fills them), then the parent's ``<method>/cldice`` and ``<method>/dice``, the best
  clDice first (the learned methods were last and off-screen in alphabetical order).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
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
#: A step's own scores, shown first: the child rows (one per method) fill them; the parent's per-method columns
#: follow, best clDice first.
_STEP_COLUMNS = ("cldice_mean", "dice_mean")
#: The tag a run with a ``report.html`` carries (:func:`stego_core.steps.comparison.log_comparison`).
REPORT_TAG = "report"


def method_columns(metric_keys: Iterable[str], scores: Mapping[str, float] | None = None) -> list[str]:
    """The runs-table columns of ``metric_keys``: a step's own ``cldice_mean`` / ``dice_mean`` (the child rows,
    one per method, fill them), then ``<method>/cldice`` and ``<method>/dice`` (a pipeline's per-method scores, a
    sweep's ``best_trial/*``) per method, best ``scores`` first (the methods' clDice; by name without), then a
    sweep's ``objective`` and ``best_value`` when present, as ``metrics.`<key>``` names.

    >>> method_columns(["otsu/cldice", "otsu/dice", "val/dice", "dice/case_1", "dice_mean", "objective"])
    ['metrics.`dice_mean`', 'metrics.`otsu/cldice`', 'metrics.`otsu/dice`', 'metrics.`objective`']
    >>> method_columns(["a/cldice", "b/cldice"], {"a": 0.5, "b": 0.7})
    ['metrics.`b/cldice`', 'metrics.`a/cldice`']
    """
    keys = set(metric_keys)
    methods = sorted({m.group(1) for k in keys if (m := _METHOD_METRIC.match(k)) and m.group(1) not in _NOT_METHODS})
    if scores:
        methods.sort(key=lambda m: -scores.get(m, float("-inf")))
    chosen = [k for k in _STEP_COLUMNS if k in keys]
    chosen += [f"{method}/{score}" for method in methods for score in ("cldice", "dice") if f"{method}/{score}" in keys]
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
    runs = client.search_runs([experiment_id], max_results=2000, order_by=["attributes.start_time DESC"])
    scores: dict[str, float] = {}
    for run in runs:  # the latest value of each method's clDice orders the columns
        for metric, value in run.data.metrics.items():
            if (m := _METHOD_METRIC.match(metric)) and m.group(2) == "cldice":
                scores.setdefault(m.group(1), value)
    columns = method_columns((k for run in runs for k in run.data.metrics), scores)
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
    per-method saved view when the experiment has such columns, through the landing page that keeps the UI in its
    model-training view (:func:`open_link`); returns ``(links, missing names)``."""
    client = tracking.client()
    links, missing = [], []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            missing.append(name)
            continue
        columns = save_methods_view(client, exp.experiment_id)
        route = runs_link("", exp.experiment_id, view_key=VIEW_KEY if columns else None).split("#", 1)[1]
        links.append((name, open_link(base, route)))  # the landing page sets the model-training view first
    return links, missing


def server_command(backend_store_uri: str, *, host: str, port: int, workers: int = 1
                   ) -> tuple[list[str], dict[str, str]]:
    """``mlflow ui`` for one local user: ``workers`` uvicorn worker(s), no job runner, and this project's app
    (:data:`APP_NAME`: MLflow's own plus the landing pages of :mod:`stego_core.platform.ui_app`); ``(argv, env)``.
    The store's URI goes in the environment (``MLFLOW_BACKEND_STORE_URI``), not on the command line, which every
    user of the machine can read (``ps``) and which is printed: it may hold a password."""
    argv = [sys.executable, "-m", "mlflow", "ui", "--host", host, "--port", str(port), "--workers", str(workers),
            "--app-name", APP_NAME]
    return argv, {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                  "MLFLOW_BACKEND_STORE_URI": backend_store_uri, **app_entry_point_env()}


HOW_TO_STAY = ("These links open the UI in its model-training view and the browser keeps it (MLflow 3 opens in "
               "GenAI; on a plain `mlflow ui` click 'Model training' in the sidebar switch once).")


#: The ``mlflow.app`` entry point of this project (``pyproject.toml``): ``mlflow ui --app-name stego-vessels``.
APP_NAME = "stego-vessels"
APP_TARGET = "stego_core.platform.ui_app:app"


def app_entry_point_env() -> dict[str, str]:
    """What the server needs to find :data:`APP_NAME` when the installed package does not declare it yet (an
    editable install made before the entry point was added, a checkout on ``PYTHONPATH``): a distribution that
    declares only the entry point, written once to a cache folder put first on ``PYTHONPATH`` (the standard way
    ``importlib.metadata`` finds entry points). ``{}`` when the entry point is installed."""
    from importlib.metadata import entry_points

    if any(e.name == APP_NAME and e.value == APP_TARGET for e in entry_points(group="mlflow.app")):
        return {}
    import tempfile
    from pathlib import Path

    folder = Path(tempfile.gettempdir()) / f"stego-vessels-ui-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    info = folder / "stego_vessels_ui-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: stego-vessels-ui\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[mlflow.app]\n{APP_NAME} = {APP_TARGET}\n")
    here = str(Path(__file__).resolve().parents[2])  # this checkout, for the server's worker to import
    path = os.pathsep.join(p for p in (str(folder), here, os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path}


def report_link(base: str, run_id: str) -> str:
    """The page of :mod:`stego_core.platform.ui_app` that opens run ``run_id``'s ``report.html`` full page.

    >>> report_link("http://127.0.0.1:5000/", "0123")
    'http://127.0.0.1:5000/stego/report/0123'
    """
    return f"{base.rstrip('/')}/stego/report/{run_id}"


def open_link(base: str, route: str) -> str:
    """The landing page that sets the model-training view, then opens ``route`` of the UI.

    >>> open_link("http://127.0.0.1:5000", "/experiments/1/runs?viewStateShareKey=v")
    'http://127.0.0.1:5000/stego/open?to=%2Fexperiments%2F1%2Fruns%3FviewStateShareKey%3Dv'
    """
    return f"{base.rstrip('/')}/stego/open?{urlencode({'to': route})}"


def latest_reports(names: Sequence[str]) -> list[tuple[str, str, str]]:
    """``(experiment, run id, run name)`` of the latest run with a ``report.html`` (tag :data:`REPORT_TAG`) in each
    experiment of ``names`` that exists."""
    client = tracking.client()
    out = []
    for name in names:
        exp = client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage != "active":
            continue
        runs = client.search_runs([exp.experiment_id], f"tags.{REPORT_TAG} = 'report.html'", max_results=1,
                                  order_by=["attributes.start_time DESC"])
        out += [(name, r.info.run_id, r.info.run_name or "") for r in runs]
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m stego_core.platform.ui [--host H] [--port P] [--workers N] [--print-only] [EXPERIMENT ...]``.

    Prints the link that opens the latest ``report.html`` of each existing experiment (default
    :data:`DEFAULT_EXPERIMENTS`) in the store of ``MLFLOW_TRACKING_URI`` (:func:`report_link`), then the runs-table
    link of each, both through the landing pages of :mod:`stego_core.platform.ui_app` (the model-training view
    sticks), then replaces itself with ``mlflow ui --app-name stego-vessels`` (:func:`server_command`) unless
    ``--print-only``.
    """
    parser = argparse.ArgumentParser(prog="python -m stego_core.platform.ui", description=main.__doc__)
    parser.add_argument("experiments", nargs="*", default=list(DEFAULT_EXPERIMENTS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--print-only", action="store_true", help="print the links, do not start the UI")
    args = parser.parse_args(argv)
    base = f"http://{args.host}:{args.port}"
    links, missing = experiment_links(args.experiments, base=base)
    for name, run_id, run_name in latest_reports(args.experiments):  # one click to the comparison
        print(f"report of the latest {run_name or 'parent'} run in {name}: {report_link(base, run_id)}")
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
