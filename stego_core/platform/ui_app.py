"""The MLflow server app of ``make ui``: MLflow's own app plus two same-origin pages that keep the UI in its
model-training view and open a parent run's ``report.html`` full page.

MLflow 3.17.2 keeps the GenAI / model-training choice in the browser's local storage (``mlflow.workflowType_v1``,
holding the JSON string ``"machine_learning"``); no server setting or experiment tag decides it, and a
``workflowType`` URL parameter lasts one page (:mod:`stego_core.platform.ui`). Only a page of the UI's own origin
can write that storage, so this module adds two routes to MLflow's Flask app (behind ``--static-prefix`` like
MLflow's own routes) and the server runs it through MLflow's app hook, ``mlflow ui --app-name stego-vessels``
(the ``mlflow.app`` entry point in ``pyproject.toml``): same process, same port, nothing in front of MLflow.

- ``/stego/open?to=<route>``: writes the storage, then replaces itself with the UI at ``#<route>`` (the links
  ``make ui`` prints for the runs tables).
- ``/stego/report/<run id>``: writes the storage and shows the run's ``report.html`` in the whole window under a
  one-line bar (the run, its artifacts, the runs table). The page fetches the artifact from MLflow's own
  ``get-artifact`` endpoint and shows it in an ``<iframe sandbox>`` *without* ``allow-scripts``: whatever a run
  logged as ``report.html`` runs no script on the UI's origin (MLflow serves artifacts as attachments for that
  reason); ``allow-top-navigation-by-user-activation`` lets the report's links (to each method's run, each
  case's viewer) open in the whole window when clicked, where the storage already says model training.
"""

from __future__ import annotations

import html
import json
import re

from flask import Response, request
from mlflow.server import app as flask_app
from mlflow.server.handlers import _add_static_prefix

#: The local-storage entry and value of MLflow 3.17's model-training view (``useLocalStorage``: JSON values).
WORKFLOW_STORAGE_KEY = "mlflow.workflowType_v1"
WORKFLOW_VALUE = json.dumps("machine_learning")
#: What a route's ``to`` may be: an in-app route (``/experiments/1/runs?...``), nothing else.
_ROUTE = re.compile(r"^/[A-Za-z0-9_\-./?=&%:,\[\]]*$")
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

_STORE = (f"try {{ localStorage.setItem({json.dumps(WORKFLOW_STORAGE_KEY)}, {json.dumps(WORKFLOW_VALUE)}); }} "
          "catch (e) { /* storage refused: the links still carry workflowType */ }")


def _root() -> str:
    """The UI's root path (``/`` or ``<static prefix>/``)."""
    return _add_static_prefix("/").rstrip("/") + "/"


def _page(body: str, title: str, script: str) -> Response:
    text = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            "<style>body{margin:0;font:14px system-ui,sans-serif}#bar{height:34px;display:flex;gap:18px;"
            "align-items:center;padding:0 12px;background:#f6f8fa;border-bottom:1px solid #d8dee4}"
            "#bar a{color:#0969da;text-decoration:none}#report{position:fixed;top:35px;left:0;width:100%;"
            "height:calc(100% - 35px);border:0}</style></head>"
            f"<body>{body}<script>{_STORE}\n{script}</script></body></html>")
    return Response(text, mimetype="text/html", headers={"Cache-Control": "no-store"})


def open_route() -> Response:
    """``/stego/open?to=/experiments/1/runs?...``: the model-training view, then that route of the UI."""
    to = request.args.get("to", "/")
    if not _ROUTE.match(to):
        return Response("to= must be a route of the MLflow UI, e.g. /experiments/1/runs", status=400)
    target = json.dumps(f"{_root()}#{to}")
    return _page("<p>Opening the MLflow UI in its model-training view…</p>", "MLflow: model training",
                 f"location.replace({target});")


def report_route(run_id: str) -> Response:
    """``/stego/report/<run id>``: the model-training view and the run's ``report.html`` in the whole window."""
    if not _RUN_ID.match(run_id):
        return Response("not a run id", status=404)
    root = _root()
    body = ('<div id="bar"><b>STEGO-Vessels report</b><span id="where">run ' + run_id + '</span>'
            '<a id="run" target="_top">run page</a><a id="files" target="_top">artifacts</a>'
            '<a id="table" target="_top">runs table</a></div>'
            '<iframe id="report" title="report" sandbox="allow-same-origin allow-top-navigation-by-user-activation '
            'allow-popups allow-popups-to-escape-sandbox"></iframe>')
    script = f"""
const root = {json.dumps(root)}, run = {json.dumps(run_id)}, frame = document.getElementById("report");
const base = location.origin + root;
fetch(root + "ajax-api/2.0/mlflow/runs/get?run_id=" + run).then(r => r.json()).then(d => {{
  const e = d.run.info.experiment_id, page = "#/experiments/" + e + "/runs/" + run;
  document.getElementById("run").href = root + page;
  document.getElementById("files").href = root + page + "/artifacts/report.html";
  document.getElementById("table").href = root + "#/experiments/" + e + "/runs";
  document.getElementById("where").textContent = (d.run.info.run_name || "run") + " (" + run + ")";
}}).catch(() => {{}});
fetch(root + "get-artifact?path=report.html&run_uuid=" + run).then(r => {{
  if (!r.ok) throw new Error("HTTP " + r.status);
  return r.text();
}}).then(text => {{
  const head = '<base href="' + base + '" target="_top">';
  frame.srcdoc = /<head[^>]*>/i.test(text) ? text.replace(/<head[^>]*>/i, m => m + head) : head + text;
  document.body.dataset.report = "loaded";
}}).catch(err => {{
  frame.srcdoc = "<p style='font:14px sans-serif;padding:12px'>This run has no report.html (" + err.message +
    "): pipeline, ablation and sweep parent runs have one.</p>";
  document.body.dataset.report = "missing";
}});
"""
    return _page(body, f"report of run {run_id}", script)


flask_app.add_url_rule(_add_static_prefix("/stego/open"), "stego_open", open_route)
flask_app.add_url_rule(_add_static_prefix("/stego/report/<run_id>"), "stego_report", report_route)

from mlflow.server.fastapi_app import app  # noqa: E402  MLflow's ASGI app, which serves the Flask app above

__all__ = ["app", "open_route", "report_route"]
