"""One click from ``make ui`` to the comparison, in MLflow's model-training view: the app ``make ui`` serves (MLflow's
own plus the landing pages of ``stego_core.platform.ui_app``), and a real ``make ui`` server driven by headless
chromium from the report link it prints, through the report, to a method's run and back to the runs table."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from browser import Browser
from conftest import REPO_ROOT, free_port, needs_chromium, wait_for_health
from PIL import Image

from stego_core.platform import tracking, ui
from stego_core.steps.comparison import log_comparison

#: Where the screenshots of the path go when ``STEGO_UI_SHOTS`` names a folder (docs/figures for the docs).
SHOTS = os.environ.get("STEGO_UI_SHOTS")
CASES = ("phantom_002", "phantom_003", "phantom_004")
#: Which view the UI is in, from what it shows: the GenAI sidebar has "Observability", model training "Runs".
VIEW = """(() => { const t = document.body.innerText;
  if (/\\nObservability\\n/.test(t)) return "genai";
  return /\\nRuns\\n/.test(t) && /Model training/.test(t) ? "machine_learning" : ""; })()"""
STORAGE = "localStorage.getItem('mlflow.workflowType_v1')"


def test_the_app_entry_point_is_declared_and_found():
    """``pyproject.toml`` declares the ``mlflow.app`` entry point; where the installed package predates it, the
    server's environment declares it (a distribution on PYTHONPATH), so ``mlflow ui --app-name`` finds it."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["mlflow.app"] == {ui.APP_NAME: ui.APP_TARGET}
    assert project["project"]["license"] == "MIT"  # an SPDX string: setuptools warns about a {text = ...} table
    argv, env = ui.server_command("sqlite:///x.db", host="127.0.0.1", port=5001)
    assert argv[argv.index("--app-name") + 1] == ui.APP_NAME
    found = subprocess.run([sys.executable, "-c", f"from mlflow.server import _find_app; print(_find_app("
                            f"{ui.APP_NAME!r}))"], env=env, capture_output=True, text=True, check=True).stdout
    assert found.strip() == ui.APP_TARGET


def pipeline_like_store() -> tuple[str, dict[str, str]]:
    """A ``stego-vessels`` pipeline run with two method runs and a logged comparison (its ``report.html``)."""
    per_case = {m: {c: {"dice": d + 0.02 * i, "cldice": d + 0.04 - 0.01 * i, "recall_thin": 0.3 + 0.1 * i}
                    for i, c in enumerate(CASES)} for m, d in (("otsu", 0.5), ("stego", 0.7))}
    with tracking.start_run("stego-vessels", run_name="pipeline", tags={"step": "pipeline"}) as parent:
        runs = {}
        for method, rows in per_case.items():
            with tracking.start_run("stego-vessels", run_name=method, nested=True) as child:
                tracking.log_metrics({"dice_mean": float(np.mean([r["dice"] for r in rows.values()]))})
            runs[method] = child.run_id
        tracking.log_metrics({f"{m}/dice": float(np.mean([r["dice"] for r in rows.values()]))
                              for m, rows in per_case.items()})
        log_comparison(per_case, report_title="Pipeline: the methods on the held-out volumes", runs=runs)
    return parent.run_id, runs


def _shot(tab, tmp_path: Path, name: str) -> np.ndarray:
    path = tab.screenshot(tmp_path / f"{name}.png")
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        Image.open(path).convert("P", palette=Image.ADAPTIVE, colors=128).save(Path(SHOTS) / f"ui_{name}.png",
                                                                             optimize=True)
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.slow
@needs_chromium
def test_from_the_printed_link_to_the_report_in_the_model_training_view(tmp_path):
    """``make ui`` prints the report link first; it opens the report (table and plots drawn) and sets the
    model-training view, which then holds for a click to a method's run and an in-app click back to the runs table
    (whose links drop ``workflowType``). Before the landing, the same browser opens MLflow in GenAI: the view check
    can fail."""
    parent, runs = pipeline_like_store()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "stego_core.platform.ui", "--port", str(port)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert first.startswith("report of the latest pipeline run in stego-vessels: "), first
        link = first.split(": ", 1)[1].strip()
        assert link == f"{base}/stego/report/{parent}"
        wait_for_health(base, proc, timeout_s=180, output=lambda: proc.stdout.read() if proc.poll() is not None
                        else "")
        with Browser(tmp_path / "profile", window=(1280, 900)) as browser:
            tab = browser.open(f"{base}/#/experiments/{tracking.client().get_run(parent).info.experiment_id}/runs")
            assert tab.wait(VIEW, timeout=90, what="MLflow UI") == "genai"  # MLflow's default, before the link
            _shot(tab, tmp_path, "0_mlflow_default_genai")

            tab.goto(link)  # the printed link
            tab.wait("document.body.dataset.report === 'loaded'", timeout=60, what="report.html fetched")
            assert json.loads(tab.eval(STORAGE)) == "machine_learning"
            tab.wait("(d => d && d.readyState === 'complete' && [...d.images].length >= 2 && "
                     "[...d.images].every(i => i.complete && i.naturalWidth === 600))"
                     "(document.getElementById('report').contentDocument)", what="report figures")
            frame = json.loads(tab.eval("JSON.stringify(document.getElementById('report').getBoundingClientRect())"))
            cells = tab.eval("[...document.getElementById('report').contentDocument"
                             ".querySelectorAll('#comparison tr')].map(r => r.cells.length)")
            assert cells == [5, 6, 9, 9]  # two header rows, otsu, stego
            shot = _shot(tab, tmp_path, "1_report")
            assert shot.shape[:2] == (900, 1280) and frame["top"] >= 30 and frame["width"] == 1280
            below = shot[int(frame["top"]) + 5:, :]
            assert (below.sum(axis=-1) < 200).mean() > 0.005  # text and plots drawn in the report's frame
            assert (np.abs(below - (255, 248, 197)).max(axis=-1) <= 2).sum() > 300  # the best method's row

            # a real click on stego's "run" link: the whole window goes to the run page, still model training
            x, y = tab.eval("""(() => { const f = document.getElementById('report'),
                a = f.contentDocument.querySelectorAll('#comparison a[data-link=run]')[1],
                r = a.getBoundingClientRect(), o = f.getBoundingClientRect();
                return [o.left + r.left + r.width / 2, o.top + r.top + r.height / 2]; })()""")
            tab.click(x, y)
            tab.wait(f"location.hash.includes('/runs/{runs['stego']}')", timeout=30, what="stego's run page")
            assert "workflowType" not in tab.url()
            assert tab.wait(VIEW, timeout=90, what="run page") == "machine_learning"
            tab.wait("document.body.innerText.includes('Model metrics')", what="run tabs")
            _shot(tab, tmp_path, "2_method_run")

            # MLflow's own breadcrumb back to the runs table (its links carry no workflowType): still model training
            x, y = tab.eval("""(() => { const a = [...document.querySelectorAll('a')].find(
                e => e.textContent.trim() === 'Runs' && e.getAttribute('href').endsWith('/runs'));
                const r = a.getBoundingClientRect(); return [r.left + r.width / 2, r.top + r.height / 2]; })()""")
            tab.click(x, y)
            tab.wait("/#\\/experiments\\/\\d+\\/runs($|\\?)/.test(location.href)", what="runs table")
            assert tab.wait(VIEW, timeout=90, what="runs table") == "machine_learning"
            tab.wait("document.body.innerText.includes('pipeline')", what="the pipeline row")
            assert "workflowType" not in tab.url() and json.loads(tab.eval(STORAGE)) == "machine_learning"
            _shot(tab, tmp_path, "3_runs_table")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
