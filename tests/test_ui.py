"""The MLflow UI path (``make ui`` = ``python -m stego_core.platform.ui``): links to existing experiments only, the saved view
with the per-method columns, a real ``mlflow ui`` with one worker and no job runner, and (with chromium) the
link opening the runs table with those columns in a headless browser."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from urllib.parse import parse_qs, urlsplit

import pytest
from conftest import REPO_ROOT, free_port, headless_chromium, wait_for_health

from stego_core.platform import tracking, ui


def demo_like_store() -> str:
    """A ``stego-vessels`` experiment holding a pipeline row with per-method scores and one nested step."""
    with tracking.start_run("stego-vessels", run_name="pipeline", tags={"step": "pipeline"}) as parent:
        tracking.log_metrics({"otsu/dice": 0.61, "otsu/cldice": 0.55, "stego/dice": 0.72, "stego/cldice": 0.70})
        with tracking.start_run("stego-vessels", run_name="baseline-otsu", nested=True):
            tracking.log_metrics({"dice_mean": 0.61, "cldice_mean": 0.55, "dice/case_1": 0.61})
    return parent.experiment_id


def links_of(output: str) -> dict[str, str]:
    return {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in output.splitlines() if ": " in line
            and not line.startswith(("MLflow", "starting"))}


def test_links_only_existing_experiments_with_the_methods_view(capsys):
    experiment_id = demo_like_store()
    client = tracking.client()
    before = {e.name for e in client.search_experiments()}
    assert ui.main(["--print-only", "--port", "5123"]) == 0
    assert {e.name for e in client.search_experiments()} == before  # nothing created
    out = capsys.readouterr().out
    links = links_of(out)
    url = urlsplit(links["stego-vessels"])
    assert f"{url.scheme}://{url.netloc}" == "http://127.0.0.1:5123"
    assert url.path == "/stego/open"  # the landing page that sets the model-training view, then the runs table
    route, _, query = parse_qs(url.query)["to"][0].partition("?")
    assert route == f"/experiments/{experiment_id}/runs"
    assert parse_qs(query) == {"viewStateShareKey": [ui.VIEW_KEY], "workflowType": ["machine_learning"]}
    assert "not linked" in links["stego-vessels-sweeps"] and "not linked" in links["stego-vessels-ablation"]
    assert "'Model training'" in out  # how to stay in the model-training view on a plain `mlflow ui`

    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(tags[ui.SHARED_VIEW_PREFIX + ui.VIEW_KEY])
    assert view["name"] == ui.VIEW_NAME and isinstance(view["createdAt"], int)
    # the child rows' own scores first, then the methods best clDice first (stego was last and off-screen)
    assert json.loads(view["state"])["selectedColumns"] == [
        "metrics.`cldice_mean`", "metrics.`dice_mean`", "metrics.`stego/cldice`", "metrics.`stego/dice`",
        "metrics.`otsu/cldice`", "metrics.`otsu/dice`"]


def test_server_command_is_one_worker_without_job_runner():
    store = "postgresql+psycopg2://alice:S3cret/PW@127.0.0.1/mlf"
    argv, env = ui.server_command(store, host="127.0.0.1", port=5001)
    assert argv[1:4] == ["-m", "mlflow", "ui"] and argv[argv.index("--workers") + 1] == "1"
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    # the store (a password in it) goes through the environment, never the command line `ps` shows
    assert env["MLFLOW_BACKEND_STORE_URI"] == store and not any("S3cret" in a for a in argv)


@pytest.mark.slow
def test_make_ui_serves_the_link_with_two_processes(tmp_path):
    import psutil

    experiment_id = demo_like_store()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "stego_core.platform.ui", "--port", str(port)], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        link = proc.stdout.readline().split(": ", 1)[1].strip()
        route = ui.runs_link("", experiment_id, view_key=ui.VIEW_KEY).split("#", 1)[1]
        assert link == ui.open_link(f"http://127.0.0.1:{port}", route)
        wait_for_health(f"http://127.0.0.1:{port}", proc, timeout_s=120,
                        output=lambda: proc.stdout.read() if proc.poll() is not None else "")
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        commands = [" ".join(p.cmdline()) for p in tree]
        assert len(tree) == 2, commands  # the mlflow CLI and one uvicorn worker; `mlflow ui` alone starts 15
        assert not any("_job_runner" in c or "huey" in c for c in commands), commands

        browse = {"window": (2400, 900), "profile": tmp_path / "profile", "budget_ms": 15000}
        dom = headless_chromium(link, "--dump-dom", **browse).stdout
        for text in ("pipeline", ui.VIEW_NAME, "otsu/dice", "otsu/cldice", "stego/dice", "stego/cldice"):
            assert text in dom, text  # the runs table, opened on the saved view, shows the per-method columns
        shot = tmp_path / "runs_table.png"
        headless_chromium(link, f"--screenshot={shot}", **browse)
        assert shot.stat().st_size > 10_000
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
