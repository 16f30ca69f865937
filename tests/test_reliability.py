"""Reliability of the newest surfaces (issue 32): real processes, a real ``mlflow server`` reached with credentials,
real PostgreSQL (``STEGO_TEST_POSTGRES_TRACKING_URL``, exported by ``.ci/run``), real ``torchrun``. Each test
reproduces one probe of the issue and shows it handled; ``docs/design.md`` ("Faults") lists them."""

from __future__ import annotations

import base64
import http.client
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import quote, unquote

import pytest
import yaml
from conftest import REPO_ROOT, free_port, stop_process, wait_for_health

from stego_core.platform import tracking
from stego_core.runtime import faults

#: Passwords with every character a URL parser splits at or escapes, and non-ASCII ones.
PASSWORDS = ("S3cret/PWq", "S3cret@PWq", "pa:ss:wdq", "100%sureq", "pässwörd-€q", "x/y@z:w%v-üq")
#: A password for HTTP basic auth (``requests`` encodes it as Latin-1, so no character beyond it).
HTTP_PASSWORD = "Ht/tp@pw:50%-é"
#: A tiny evaluation: one 32 x 32 x 24 phantom, every case scored.
TINY_EVAL = ["data.phantom.n_volumes=1", "data.phantom.shape=[32,32,24]", "split=all", "progress=false"]
#: A tiny self-training student (a few steps of a 2-level U-Net on 32-px crops).
TINY_STUDENT = ["student.training.steps=6", "student.training.eval_every=3", "student.training.crop=32",
                "student.training.batch=2", "student.network.channels=[8,16]"]


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def run_cli(*args: str, timeout: float = 300, **extra: str) -> subprocess.CompletedProcess:
    """``python <args>`` in the test's folder, with ``extra`` environment variables; not checked."""
    return subprocess.run([sys.executable, *args], env=env(**extra), capture_output=True, text=True,
                          timeout=timeout, check=False)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line an entry point ends with (no traceback before it)."""
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    return lines[-1]


def secret_forms(password: str, user: str = "alice") -> list[bytes]:
    """Every form in which ``password`` could leak: as typed, percent-encoded, in Latin-1, and as the base64 of
    an HTTP basic-auth header."""
    forms = {password.encode(), quote(password, safe="").encode(), quote(password).encode(),
             base64.b64encode(f"{user}:{password}".encode("latin-1", "replace"))}
    return [f for f in forms if f]


def assert_nowhere(password: str, texts: list[str], roots: list[Path], user: str = "alice") -> None:
    """No form of ``password`` (:func:`secret_forms`) in ``texts`` nor in any file under ``roots``."""
    forms = secret_forms(password, user)
    for text in texts:
        for form in forms:
            assert form not in text.encode(), (form, text[-2000:])
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                for form in forms:
                    assert form not in data, (form, path)


def runs(experiment: str, uri: str | None = None) -> list:
    client = tracking.MlflowClient(tracking_uri=uri) if uri else tracking.client()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], max_results=100) if exp else []


def run_record(client, run) -> str:
    """Everything a run holds that is not a file: params, tags, metric names, its inputs."""
    data = client.get_run(run.info.run_id).data
    inputs = client.get_run(run.info.run_id).inputs
    return repr((data.params, data.tags, sorted(data.metrics), run.info.run_name,
                 [(d.dataset.name, d.dataset.source, [(t.key, t.value) for t in d.tags])
                  for d in inputs.dataset_inputs]))


def download_all(client, run, dst: Path) -> Path:
    folder = dst / run.info.run_id
    folder.mkdir(parents=True, exist_ok=True)
    if client.list_artifacts(run.info.run_id):
        client.download_artifacts(run.info.run_id, "", str(folder))
    return folder


# --------------------------------------------------------------------------------- 1, 2, 3: credentials


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_in_a_url_is_masked_by_the_widest_reading_or_the_url_refused(password: str) -> None:
    """Probe 1: ``/`` (and ``@``) in a password stopped the masking (``alice:S3cret/PW@...`` printed in clear,
    ``S3cret@PW`` leaked ``@PW``). Now every URL form is masked, and a URL whose parser (SQLAlchemy's
    ``make_url`` for a database, ``urllib.parse`` for http) would read another password than the one written is
    refused with one line naming the variable."""
    for scheme in ("postgresql", "postgresql+psycopg2", "mysql", "http", "https"):
        for written in (password, quote(password, safe="")):
            url = f"{scheme}://alice:{written}@127.0.0.1:5432/mlf"
            text = f"cannot open {url}: connection refused (retrying {url})"
            masked = tracking.mask_secrets(text)
            assert masked.count("alice:***@127.0.0.1:5432/mlf") == 2, masked
            for form in (password, written, faults.opener_credentials(url)[1] or "\0"):
                assert form not in masked, (url, masked)
            assert faults.has_password(url), url
            try:
                faults.check_url(url, "MLFLOW_TRACKING_URI")
            except ValueError as exc:
                assert str(exc).startswith("MLFLOW_TRACKING_URI: ") and "\n" not in str(exc)
                assert password not in str(exc) and written not in str(exc)
                assert "@" in password or "/" in written or "%" in written and scheme.startswith("http"), url
            else:  # accepted: the library that opens it reads exactly the password that was written
                assert faults.opener_credentials(url) == ("alice", unquote(written)), url
        # percent-encoded, every password is accepted by every parser
        encoded = f"{scheme}://alice:{quote(password, safe='')}@127.0.0.1:5432/mlf"
        assert faults.check_url(encoded, "x") == encoded
    # URLs without a password are left alone, ports and paths included
    for url in ("sqlite:///mlflow.db", "http://127.0.0.1:5000/#/experiments/1", "postgresql://alice@db:5432/x",
                "file:///tmp/a:b/c"):
        assert tracking.mask_secrets(url) == url and not faults.has_password(url)


def test_passwords_with_slash_or_at_are_masked_or_refused_by_every_entry_point(tmp_path: Path) -> None:
    """Probe 1 through the command line: the tracking URI (a store that cannot be opened: its error names it),
    ``STEGO_OPTUNA_STORAGE`` with ``--print-config``, ``storage=`` on the command line; no output holds it."""
    slash = "alice:S3cret/PWq@127.0.0.1:1/mlf"
    at = "alice:S3cret@PWq@127.0.0.1:1/mlf"
    sweep = ["-m", "sweeps.run", "--config", str(REPO_ROOT / "sweeps/configs/sweep_baseline.yaml")]
    outputs = []
    # a store the installed drivers cannot open: one line, the password masked
    proc = run_cli("-m", "experiments.baseline", "method=percentile", MLFLOW_TRACKING_URI=f"mysql://{slash}")
    assert proc.returncode == 2 and error_line(proc).startswith(
        "error: cannot open the MLflow tracking store mysql://alice:***@127.0.0.1:1/mlf: ModuleNotFoundError")
    outputs.append(proc)
    # an unescaped '@' is refused before anything opens it, naming where it came from
    proc = run_cli("-m", "experiments.baseline", "method=percentile", MLFLOW_TRACKING_URI=f"postgresql://{at}")
    assert proc.returncode == 2 and error_line(proc).startswith("error: MLFLOW_TRACKING_URI: the password")
    outputs.append(proc)
    proc = run_cli(*sweep, "--print-config", STEGO_OPTUNA_STORAGE=f"postgresql://{slash}")
    assert proc.returncode == 0 and "storage: postgresql://alice:***@127.0.0.1:1/mlf" in proc.stdout, proc.stderr
    outputs.append(proc)
    proc = run_cli(*sweep, "--print-config", STEGO_OPTUNA_STORAGE=f"postgresql://{at}")
    assert proc.returncode == 2 and error_line(proc).startswith("error: STEGO_OPTUNA_STORAGE: the password")
    outputs.append(proc)
    for url in (f"postgresql://{slash}", f"postgresql://{at}"):
        proc = run_cli(*sweep, f"storage={url}", "--print-config")
        assert proc.returncode == 2 and error_line(proc).startswith("error: storage holds a password")
        outputs.append(proc)
    for proc in outputs:
        assert "S3cret" not in proc.stdout + proc.stderr and "PWq" not in proc.stdout + proc.stderr
    assert_nowhere("S3cret/PWq", [], [tmp_path])
    assert_nowhere("S3cret@PWq", [], [tmp_path])


class _BasicAuthProxy(http.server.BaseHTTPRequestHandler):
    """In front of a real ``mlflow server``: every request must carry ``alice`` / :data:`HTTP_PASSWORD` as HTTP
    basic auth (else 401), and is forwarded as it came (what an authenticating reverse proxy does)."""

    protocol_version = "HTTP/1.1"

    def _forward(self) -> None:
        expected = "Basic " + base64.b64encode(f"alice:{HTTP_PASSWORD}".encode("latin-1")).decode()
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.headers.get("Authorization") != expected:
            self.server.refused += 1
            self._reply(401, [("WWW-Authenticate", 'Basic realm="mlflow"')], b"unauthorized")
            return
        self.server.passed += 1
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "authorization", "connection", "content-length")}
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream_port, timeout=300)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            self._reply(response.status, [(k, v) for k, v in response.getheaders()
                                          if k.lower() not in ("transfer-encoding", "connection", "content-length")],
                        data)
        finally:
            conn.close()

    def _reply(self, status: int, headers: list[tuple[str, str]], data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, *args) -> None:  # quiet
        pass


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, _mlflow_template_db):
    """A real ``mlflow server`` (SQLite store, served artifacts) behind :class:`_BasicAuthProxy`; yields
    ``(URI with the credentials, the server's own URL, its folder, the proxy)``."""
    import shutil

    folder = tmp_path_factory.mktemp("auth_server")
    shutil.copyfile(_mlflow_template_db, folder / "server.db")
    port = free_port()
    log = (folder / "server.log").open("w")
    server = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                               f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "artifacts"),
                               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuthProxy)
    proxy.upstream_port, proxy.passed, proxy.refused = port, 0, 0
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", server, timeout_s=90, output=(folder / "server.log").read_text)
        thread.start()
        uri = f"http://alice:{quote(HTTP_PASSWORD, safe='')}@127.0.0.1:{proxy.server_address[1]}"
        yield uri, f"http://127.0.0.1:{port}", folder, proxy
    finally:
        proxy.shutdown()
        stop_process(server)
        log.close()


#: STEGO on two tiny phantoms with the weight-free featurizer, two steps, its model logged.
TINY_TRAIN = ["data.root=data/tiny", "data.phantom.shape=[32,32,24]", "data.phantom.n_volumes=2",
              "slicing.patch_size=16", "slicing.stride=8", "model.backbone=classical", "model.res=8",
              "model.code_dim=16", "train.max_steps=2", "train.val_every_n_steps=2", "train.batch_size=8",
              "train.progress=false", "train.accelerator=cpu", "train.system_metrics=false"]


@pytest.mark.slow
def test_no_password_in_anything_runs_record_or_print(auth_server, tmp_path: Path) -> None:
    """Probe 2 and the leak check: a baseline, a STEGO training, a self-training and a sweep against a real
    tracking server that demands the credentials of the URI (basic auth), the sweep's Optuna storage in
    PostgreSQL with a password (``STEGO_TEST_POSTGRES_TRACKING_OPTUNA_URL``, when set). MLflow's end-of-run line
    printed the URI with the password ("View run ... at: http://alice:<password>@host/..."; train twice): now a
    link without credentials is printed, and no form of either password is in stdout / stderr, the local
    outputs, the runs' params, tags, inputs and artifacts (plan.yaml included), or the server's store."""
    uri, upstream, folder, proxy = auth_server
    optuna_url = os.environ.get("STEGO_TEST_POSTGRES_TRACKING_OPTUNA_URL", "")
    db_password = faults.opener_credentials(optuna_url)[1] if optuna_url else None
    (tmp_path / "selftrain.yaml").write_text("teacher: {method: percentile}\n")
    commands = {
        "baseline": ["-m", "experiments.baseline", "method=percentile", "data.root=data/one", *TINY_EVAL,
                     "experiment=leak"],
        "train": ["-m", "experiments.train", *TINY_TRAIN, "experiment=leak"],
        "selftrain": ["-m", "experiments.selftrain", "--config", str(tmp_path / "selftrain.yaml"),
                      "data.root=data/one", *TINY_EVAL, *TINY_STUDENT, "experiment=leak"],
        "sweep": ["-m", "sweeps.run", "--config", str(REPO_ROOT / "sweeps/configs/sweep_baseline.yaml"),
                  "n_trials=1", f"study_name=leak-{os.getpid()}", "experiment=leak", "heartbeat_interval_s=0",
                  "log_plots=false", "data.root=data/one", "data.phantom.n_volumes=1",
                  "data.phantom.shape=[32,32,24]", "progress=false"],
    }
    extra = {"MLFLOW_TRACKING_URI": uri}
    if optuna_url:
        extra[faults.STORAGE_ENV] = optuna_url
    texts = []
    for name, args in commands.items():
        proc = run_cli(*args, timeout=600, **extra)
        assert proc.returncode == 0, (name, proc.stdout[-2000:], proc.stderr[-4000:])
        texts += [proc.stdout, proc.stderr]
        # MLflow's own line is off; ours links the run without the credentials
        assert "🏃 View run" not in proc.stdout and "View experiment at" not in proc.stdout, name
        assert f"at: http://127.0.0.1:{proxy.server_address[1]}/#/experiments/" in proc.stdout, (name, proc.stdout)
    assert proxy.passed > 0 and proxy.refused == 0  # every request carried the URI's credentials
    client = tracking.MlflowClient(tracking_uri=upstream)  # the server itself, past the proxy
    found = runs("leak", upstream)
    assert {r.data.tags.get("step") for r in found} >= {"evaluate", "train"} and len(found) >= 5
    assert all(r.info.status == "FINISHED" for r in found), [(r.info.run_name, r.info.status) for r in found]
    records = [run_record(client, r) for r in found]
    downloads = tmp_path / "downloaded"
    plans = [download_all(client, r, downloads) / "plan.yaml" for r in found]
    assert sum(p.is_file() for p in plans) >= 4
    for password, user in ((HTTP_PASSWORD, "alice"), *([(db_password, "stego_track")] if db_password else [])):
        assert_nowhere(password, texts + records, [tmp_path, folder], user=user)


@pytest.mark.slow
def test_a_postgresql_tracking_store_in_both_spellings(tmp_path: Path) -> None:
    """Probe 3: ``MLFLOW_TRACKING_URI=postgresql://...`` failed with "No module named 'psycopg'" (SQLAlchemy 2.1
    defaults to psycopg 3; the project installs psycopg2). Both spellings now open a real PostgreSQL tracking
    store (its role's password holds ``/ @ : %`` and non-ASCII characters), and the password is printed nowhere."""
    base = os.environ.get("STEGO_TEST_POSTGRES_TRACKING_URL")
    if not base:
        pytest.skip("STEGO_TEST_POSTGRES_TRACKING_URL is not set (.ci/run creates the database and exports it)")
    user, password = faults.opener_credentials(base)
    experiment = f"pg-tracking-{os.getpid()}"
    texts = []
    for scheme in ("postgresql", "postgresql+psycopg2"):
        url = f"{scheme}://{base.split('://', 1)[1]}"
        proc = run_cli("-m", "experiments.baseline", "method=percentile", "data.root=data/one", *TINY_EVAL,
                       f"experiment={experiment}", MLFLOW_TRACKING_URI=url)
        assert proc.returncode == 0, (scheme, proc.stderr[-3000:])
        texts += [proc.stdout, proc.stderr]
    store = faults.sqlalchemy_url(base)
    found = runs(experiment, store)
    assert len(found) == 2 and all(r.info.status == "FINISHED" for r in found)
    assert all(r.data.metrics["dice_mean"] >= 0 for r in found)
    client = tracking.MlflowClient(tracking_uri=store)
    assert_nowhere(password, texts + [run_record(client, r) for r in found], [tmp_path], user=user)


# --------------------------------------------------------------------------------------- 11: the user's store


@pytest.mark.slow
def test_tests_never_write_into_the_projects_store_or_outputs(tmp_path: Path, _mlflow_template_db: Path) -> None:
    """Probe 11: after ``make demo`` then ``make test``, ``./mlruns/1`` gained 10 run folders (~144 MB) of no run
    of ``mlflow.db``: ``make test`` exports ``MLFLOW_TRACKING_URI=sqlite:///mlflow.db``, module fixtures ran in
    the project's folder before any test changed it, and tests or the GPU script's dry run worked from it (MLflow
    puts a new experiment's artifacts under ``./mlruns`` of the working directory). A copy of the project with a
    sentinel store, ``mlruns/``, ``outputs/`` and ``data/`` runs tests that used to write there, as ``make test``
    does: the sentinels are byte for byte what they were (``conftest._session_isolation`` checks the same of the
    real project at the end of every session)."""
    import shutil

    from conftest import project_state

    copy = tmp_path / "project"
    shutil.copytree(REPO_ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "mlruns", "mlartifacts", "outputs",
                                                                  "data", "*.db", "*.db.lock", "__pycache__",
                                                                  ".pytest_cache"))
    shutil.copyfile(_mlflow_template_db, copy / "mlflow.db")
    for name in ("mlruns/0/meta.yaml", "outputs/baseline/sentinel.txt", "data/phantoms/sentinel.txt"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_text("sentinel\n")
    before = project_state(copy)
    tests = ["tests/test_pretrain.py::test_pretrain_logs_curves_figures_and_the_teacher_backbone",
             "tests/test_methods.py::test_a_plugin_module_registers_its_method_for_the_entry_points"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=copy,
                          env={**env(), "PYTHONPATH": str(copy), "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"},
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0 and "2 passed" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-2000:]
    after = project_state(copy)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:20]


# ------------------------------------------------------------------------------ 6, 7: names in keys and tables


def assert_tables_well_formed(markdown: str) -> int:
    """Every row of every markdown table in ``markdown`` has as many cells as its header; returns the tables."""
    from stego_core._markdown import split_row

    tables, block = 0, []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            tables += 1
            width = len(split_row(block[0]))
            for row in block[1:]:
                assert len(split_row(row)) == width, (block[0], row)
            block = []
    return tables


def _case_folders(root: Path, names: list[str]) -> Path:
    from conftest import TINY_AFFINE, tube_volume

    from stego_core.data.io import save_volume

    for i, name in enumerate(names):
        image, label, _ = tube_volume(seed=i)
        save_volume(root / name / "image.nii.gz", image, TINY_AFFINE)
        save_volume(root / name / "label.nii.gz", label, TINY_AFFINE)
    return root


WEIRD_CASES = ["a_b_*c*", "<img src=x onerror=alert(1)>", "a|b", "plain"]


@pytest.mark.slow
def test_case_ids_outside_mlflow_names_finish_and_keep_their_names(tmp_path: Path, mlflow_store: str) -> None:
    """Probes 6 and 7 end to end: case folders ``a_b_*c*``, ``<img src=x onerror=alert(1)>`` and ``a|b`` ended
    baseline and ablation runs FAILED after their predictions and viewers were written, and ``|`` in a label
    (``percentile|auto|none``, a variant ``big|comp``) broke markdown tables. Both runs now end FINISHED: metric
    keys are MLflow-safe and tagged back to the real names (``case_key/<key>``), tables and the viewer show the
    real names escaped, every table row has the header's cells; two ids that would share keys are refused."""
    root = _case_folders(tmp_path / "cases", WEIRD_CASES)
    data = ["data.source=folder", f"data.root={root}", "data.skull_strip=head"]
    proc = run_cli("-m", "experiments.baseline", "method=percentile", *data, "split=all", "progress=false",
                   "experiment=weird")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (abl := tmp_path / "ablation.yaml").write_text(yaml.safe_dump({
        "datasets": [{"source": "folder", "root": str(root), "skull_strip": "head"}],
        "methods": [{"name": "percentile"}], "progress": False, "experiment": "weird-ablation",
        "variants": [{"name": "none"}, {"name": "big|comp", "postprocess": [{"step": "largest"}]}]}))
    proc = run_cli("-m", "experiments.ablation", "--config", str(abl))
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = tracking.client()
    (baseline,) = runs("weird")
    ablation = runs("weird-ablation")
    assert baseline.info.status == "FINISHED" and {r.info.status for r in ablation} == {"FINISHED"}
    assert len(ablation) == 3  # the parent and one run per variant
    for run in (baseline, *(r for r in ablation if r.info.run_name != "ablation")):
        keys = {k.split("/", 1)[1] for k in run.data.metrics if k.startswith("dice/")}
        assert keys == {tracking.safe_key(c) for c in WEIRD_CASES}
        assert tracking.case_names(run.data.tags) == {tracking.safe_key(c): c for c in WEIRD_CASES[:3]}
    out = tmp_path / "outputs" / "baseline" / baseline.info.run_id
    results = (out / "evaluation_results.txt").read_text()
    assert all(c in results for c in WEIRD_CASES)
    page = (out / "viewer" / "<img src=x onerror=alert(1)>.html").read_text()
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    parent = next(r for r in ablation if r.info.run_name == "ablation")
    files = download_all(client, parent, tmp_path / "dl")
    for text in ((files / "comparison.md").read_text(), (files / "ablation.md").read_text(),
                 parent.data.tags[tracking.NOTE_TAG]):
        assert assert_tables_well_formed(text) >= 1
        assert "percentile\\|head\\|big\\|comp" in text or "big\\|comp" in text
    assert "&lt;img src=x onerror=alert(1)&gt;" in (files / "ablation.md").read_text()
    # two case ids whose metric keys would be the same: refused, one line naming both
    clash = _case_folders(tmp_path / "clash", ["a*b", "a_b"])
    proc = run_cli("-m", "experiments.baseline", "method=percentile", "data.source=folder", f"data.root={clash}",
                   "data.skull_strip=head", "split=all", "progress=false", "experiment=weird")
    assert proc.returncode == 2 and "case ids 'a*b' and 'a_b' both become the metric key 'a_b'" in error_line(proc)


def test_every_markdown_table_writer_escapes_its_cells() -> None:
    """Probe 7, writer by writer: statistics (comparison.md and the notes), the pipeline's note, the ablation's
    grid, a sweep's note and the GPU rotation's table, each with ``|``, ``*`` and ``<`` in its labels."""
    import optuna

    from stego_core.evaluation.stats import compare_methods, comparison_markdown, comparison_tables
    from stego_core.steps.ablation import _markdown
    from stego_core.steps.pipeline import markdown_table
    from sweeps.report import sweep_note
    from sweeps.storage import RUN_ATTR
    from sweeps.space import SweepConfig

    label = "percentile|auto|none"
    scores = {label: {"a|b": 0.5, "c": 0.6}, "gmm*4": {"a|b": 0.7, "c": 0.4}}
    md = comparison_markdown(compare_methods(scores, n_boot=100), "dice")
    assert assert_tables_well_formed(md) == 1 and "percentile\\|auto\\|none" in md
    csv_text, tables = comparison_tables({m: {c: {"dice": v} for c, v in rows.items()} for m, rows in scores.items()},
                                         ("dice",))
    assert assert_tables_well_formed(tables) == 1 and "\na|b," in csv_text  # CSV needs no escape for '|'
    table = {label: {"dice_mean": 0.5, "dice_std": 0.1, "cldice_mean": 0.4, "cldice_std": 0.1},
             "stego+crf": {"dice_mean": 0.6, "dice_std": 0.1, "cldice_mean": 0.5, "cldice_std": 0.1}}
    assert assert_tables_well_formed(markdown_table(table, {label: "r1", "stego+crf": "r2"}, "1")) == 1
    rows = [{"case_id": case, "method": "percentile", "skull_strip": "auto", "variant": "big|comp", "dice": 0.5,
             "cldice": 0.4} for case in ("<img src=x>", "a|b")]
    grid = _markdown(rows)
    assert assert_tables_well_formed(grid) == 1 and "&lt;img src=x&gt;" in grid and "<img" not in grid
    study = optuna.create_study(direction="maximize")
    for choice, value in (("a|b", 0.5), ("c*", 0.7)):
        study.enqueue_trial({"settings.rule": choice})
        trial = study.ask({"settings.rule": optuna.distributions.CategoricalDistribution(["a|b", "c*"])})
        trial.set_user_attr(RUN_ATTR, "r")
        study.tell(trial, value)
    space = {"settings.rule": {"type": "categorical", "choices": ["a|b", "c*"]}}
    note = sweep_note(study, SweepConfig(study_name="s|t", objective="dice", target="baseline", space=space))
    assert assert_tables_well_formed(note) == 1 and "a\\|b" in note
    from test_benchmarks import _bench_module

    rotation = _bench_module("ablation_stego").format_table([
        {"dataset": "rotate-a|b", "variant": "stego|x", "mapping": "dice", "dice": 0.5, "cldice": 0.4,
         "precision": 0.5, "recall": 0.5, "degenerate": False, "seconds": 1.0}])
    assert assert_tables_well_formed(rotation) == 1


# ------------------------------------------------------------------------------- 4, 5: self-training's models


SELFTRAIN_TINY = ["data.root=data/ph", "data.phantom.n_volumes=2", "data.phantom.shape=[48,48,24]", "split=all",
                  "progress=false", "viewer=false", *TINY_STUDENT]


@pytest.mark.slow
def test_selftrain_and_its_reconstruct_under_torchrun_equal_one_process(tmp_path: Path, mlflow_store: str) -> None:
    """Probe 4: under ``torchrun --nproc_per_node 2`` self-training and ``reconstruct model_uri=<that run>`` ended
    FAILED (every rank wrote the results file; a rank other than 0 joined a None). Now each of 2 gloo ranks
    self-trains and predicts its share of the volumes (transductive), rank 0 gathers them into one FINISHED run,
    and the per-case scores equal one process's (same seeds); the logged students are the last volume's, as
    one process logs them, so the reconstruction of either run scores the same."""
    import torch
    from test_distributed import _artifacts, python_m, torchrun

    (tmp_path / "st.yaml").write_text("teacher: {method: percentile}\n")
    config = ["--config", str(tmp_path / "st.yaml")]
    python_m("experiments.selftrain", *config, *SELFTRAIN_TINY, "experiment=st1", "output=out1")
    job = torchrun("experiments.selftrain", *config, *SELFTRAIN_TINY, "experiment=st2", "output=out2")
    assert len([line for line in job.stdout.splitlines() if line.startswith("run ")]) == 1, job.stdout  # rank 0
    (one,), (two,) = runs("st1"), runs("st2")
    assert one.info.status == two.info.status == "FINISHED"
    per_case = {k: v for k, v in one.data.metrics.items() if "/phantom_" in k}
    assert len([k for k in per_case if k.startswith(("dice/", "teacher_dice/"))]) == 4
    assert {k: two.data.metrics.get(k) for k in per_case} == pytest.approx(per_case, rel=1e-12, abs=0)
    assert sorted(p.name for p in (tmp_path / "out2").rglob("evaluation_results.*")) == [
        "evaluation_results.csv", "evaluation_results.txt"]
    arts = _artifacts(two.info.run_id)
    assert len(arts) == len(set(arts)) and len([a for a in arts if a.startswith("predictions/")]) == 4
    students = [tracking.load_learned(r.info.run_id).state.state_dict() for r in (one, two)]
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])
    # reconstruct the torchrun run's students under torchrun and in one process
    data = [a for a in SELFTRAIN_TINY if not a.startswith("student.")]
    torchrun("experiments.reconstruct", f"model_uri={two.info.run_id}", *data, "experiment=rec2", "output=rec2")
    python_m("experiments.reconstruct", f"model_uri={one.info.run_id}", *data, "experiment=rec1", "output=rec1")
    (rec1,), (rec2,) = runs("rec1"), runs("rec2")
    assert rec1.info.status == rec2.info.status == "FINISHED"
    assert rec2.data.tags["training_run_id"] == two.info.run_id
    scores = {k: v for k, v in rec1.data.metrics.items() if k.startswith("dice/")}
    assert len(scores) == 2 and {k: rec2.data.metrics.get(k) for k in scores} == pytest.approx(scores, rel=1e-12)


@pytest.fixture(scope="module")
def selftrain_store(tmp_path_factory, _mlflow_template_db) -> dict:
    """One tiny self-training run (one phantom, its students logged) in a store of this module's tests:
    ``{"uri", "run_id", "data"}`` (``data``: the overrides that reach its phantom from any folder)."""
    import shutil

    folder = tmp_path_factory.mktemp("selftrain_store")
    shutil.copyfile(_mlflow_template_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    (folder / "st.yaml").write_text("teacher: {method: percentile}\n")
    data = [f"data.root={folder / 'ph'}", "data.phantom.n_volumes=1", "data.phantom.shape=[48,48,24]", "split=all",
            "progress=false", "viewer=false"]
    proc = subprocess.run([sys.executable, "-m", "experiments.selftrain", "--config", str(folder / "st.yaml"), *data,
                           *TINY_STUDENT, "experiment=st", f"output={folder / 'outputs'}"], cwd=folder,
                          env=env(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = runs("st", uri)
    return {"uri": uri, "run_id": run.info.run_id, "data": data}


@pytest.mark.slow
def test_a_model_of_another_method_is_refused_in_one_line(selftrain_store: dict, tmp_path: Path) -> None:
    """Probe 5: the model of a self-training run given to STEGO crashed (``AttributeError: 'UNet' object has no
    attribute 'backbone'``). ``baseline method=stego settings="{model_uri: <selftrain run>}"`` exits 2 with one
    line naming the model's method and the one expected, and evaluates nothing."""
    run_id = selftrain_store["run_id"]
    proc = run_cli("-m", "experiments.baseline", "method=stego", f"settings={{model_uri: {run_id}}}",
                   *selftrain_store["data"], "experiment=st-stego", MLFLOW_TRACKING_URI=selftrain_store["uri"])
    assert proc.returncode == 2
    assert error_line(proc) == (f"error: model_uri='{run_id}' holds a 'selftrain' model; method 'stego' expects a "
                                f"'stego' model (use method=selftrain or reconstruct model_uri={run_id})")
    assert not list(tmp_path.rglob("*.nii.gz"))


@pytest.mark.slow
def test_reusing_a_model_warns_when_its_run_is_deleted_and_leaves_no_copy(selftrain_store: dict,
                                                                          tmp_path: Path) -> None:
    """Probe 10: the reuse of a deleted run's model gave no warning, and each ``reconstruct`` left a copy of the
    model in ``$TMPDIR/tmp*/model/``. With ``TMPDIR`` an empty folder, reconstructing a deleted run's model
    warns naming the run, ends FINISHED, and leaves no model file (nor ``MLmodel``) in ``TMPDIR``."""
    uri, run_id = selftrain_store["uri"], selftrain_store["run_id"]
    client = tracking.MlflowClient(tracking_uri=uri)
    scratch = tmp_path / "tmpdir"
    scratch.mkdir()
    client.delete_run(run_id)
    try:
        proc = run_cli("-m", "experiments.reconstruct", f"model_uri={run_id}", *selftrain_store["data"],
                       "experiment=st-again", MLFLOW_TRACKING_URI=uri, TMPDIR=str(scratch))
    finally:
        client.restore_run(run_id)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"model_uri={run_id}: the run {run_id} that logged it is deleted" in proc.stderr
    (again,) = runs("st-again", uri)
    assert again.info.status == "FINISHED" and again.data.tags["training_run_id"] == run_id
    left = [p for p in scratch.rglob("*") if p.name in ("MLmodel", "model.pth", "data") or p.suffix == ".pkl"
            or (p.is_dir() and p.name.startswith(("tmp", "stego-model-")))]
    assert not left, left


# --------------------------------------------------------------------------------- 8, 9, 10: input refused


@pytest.mark.slow
def test_selftrain_on_a_constant_volume_refuses_that_case_and_fails_when_none_is_scored(tmp_path: Path,
                                                                                        mlflow_store: str) -> None:
    """Probe 8: an empty teacher mask yielded a large student mask silently. A constant volume beside a real one:
    the run ends FINISHED, tagged ``case_refused/<case>``, with a warning naming the case and the other case
    scored. A root holding only the constant volume: nothing could be scored, so the run ends FAILED and the
    command exits 2 with one line (a run that scored nothing does not report success)."""
    import numpy as np
    from conftest import TINY_AFFINE

    from stego_core.data.io import save_volume

    _case_folders(tmp_path / "cases", ["tube"])
    for root in (tmp_path / "cases", tmp_path / "flat_only"):
        save_volume(root / "flat" / "image.nii.gz", np.full((24, 24, 12), 0.5, np.float32), TINY_AFFINE)
        save_volume(root / "flat" / "brain_mask.nii.gz", np.ones((24, 24, 12), np.uint8), TINY_AFFINE)
    mask = np.zeros((24, 24, 12), np.uint8)
    mask[4:20, 4:20] = 1
    save_volume(tmp_path / "cases" / "tube" / "brain_mask.nii.gz", mask, TINY_AFFINE)
    (tmp_path / "st.yaml").write_text("teacher: {method: percentile}\n")
    common = ["--config", str(tmp_path / "st.yaml"), "data.source=folder", "data.skull_strip=given", "split=all",
              "progress=false", "viewer=false", "student.training.crop=16", *TINY_STUDENT[:2], *TINY_STUDENT[3:]]
    proc = run_cli("-m", "experiments.selftrain", *common, f"data.root={tmp_path / 'cases'}", "experiment=flat")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "selftrain refused case flat: case flat: the teacher percentile's mask" in proc.stderr
    (run,) = runs("flat")
    assert run.info.status == "FINISHED" and run.data.tags["case_refused"] == "true"
    assert run.data.tags["case_refused/flat"].startswith("case flat: the teacher percentile's mask")
    assert "dice/tube" in run.data.metrics and "dice/flat" not in run.data.metrics
    proc = run_cli("-m", "experiments.selftrain", *common, f"data.root={tmp_path / 'flat_only'}",
                   "experiment=flat-only")
    assert proc.returncode == 2
    assert error_line(proc).startswith("error: selftrain scored none of the 1 volume(s): the method refused every "
                                       "one (first: case flat: the teacher percentile's mask")
    (run,) = runs("flat-only")
    assert run.info.status == "FAILED" and "scored none" in run.data.tags["error"]


def test_bad_inputs_are_refused_in_one_line_naming_the_key(tmp_path: Path) -> None:
    """Probes 9 and 10, through the command line: each exits 2 with one line naming the key or file and
    creates nothing (no run, no ``./None`` folder, no experiment "None")."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("method: percentile\nsettings: {q: 99\n")
    cases = {
        # test_fraction=0 evaluated nothing and reported success
        ("-m", "experiments.baseline", "method=percentile", "test_fraction=0", "data.root=data/ph2",
         "data.phantom.n_volumes=2", "data.phantom.shape=[32,32,24]", "progress=false"):
            "error: no volume to evaluate in data/ph2 with split=test test_fraction=0.0",
        # output=null wrote to ./None/<run id>, experiment=null created an experiment "None"
        ("-m", "experiments.baseline", "method=percentile", "output=null"): "error: output must be a string, got null",
        ("-m", "experiments.baseline", "method=percentile", "experiment=null"):
            "error: experiment must be a string, got null",
        ("-m", "experiments.baseline", "method=percentile", "settings={q: null}"):
            "error: settings.q must be float, got null",
        # malformed YAML gave a traceback without the file's name; a folder was "does not exist"
        ("-m", "experiments.baseline", "--config", str(bad_yaml)):
            f"error: config file {bad_yaml} is not valid YAML (line 3, column 1)",
        ("-m", "experiments.baseline", "--config", str(tmp_path)): f"error: config file {tmp_path} is a folder",
        # non-mapping settings ended in a TypeError traceback
        ("-m", "experiments.baseline", "method=percentile", "settings=5"):
            "error: settings of method 'percentile' must be a mapping, got 5",
        # a non-baseline preset as a teacher said "unknown config key model"
        ("-m", "experiments.selftrain", f"teacher.preset={REPO_ROOT / 'experiments/configs/train_cpu.yaml'}"):
            f"error: teacher.preset='{REPO_ROOT / 'experiments/configs/train_cpu.yaml'}' is not a baseline preset",
    }
    for args, expected in cases.items():
        proc = run_cli(*args)
        assert proc.returncode == 2, (args, proc.stderr[-2000:])
        assert error_line(proc).startswith(expected), (args, error_line(proc))
    assert not Path("None").exists()
    names = [e.name for e in tracking.client().search_experiments()]
    assert "None" not in names


@pytest.mark.slow
def test_an_inductive_student_on_one_case_is_refused(tmp_path: Path, mlflow_store: str) -> None:
    """Probe 9: ``mode=inductive`` on one case trained the student on the very case it was evaluated on. It is
    refused in one line naming the overlap (the run ends FAILED before any training)."""
    (tmp_path / "st.yaml").write_text("teacher: {method: percentile}\n")
    proc = run_cli("-m", "experiments.selftrain", "--config", str(tmp_path / "st.yaml"), "mode=inductive",
                   "data.root=data/one", "data.phantom.n_volumes=1", "data.phantom.shape=[48,48,24]",
                   "progress=false", *TINY_STUDENT, "experiment=inductive")
    assert proc.returncode == 2
    assert error_line(proc) == ("error: method 'selftrain' trains on volumes apart from the evaluated ones, but "
                                "['phantom_000'] are in both: use split=test with test_cases=... or a "
                                "test_fraction that leaves training volumes")
    (run,) = runs("inductive")
    assert run.info.status == "FAILED" and "selftrain/loss" not in run.data.metrics


def test_a_signal_during_a_store_write_waits_for_the_write_then_ends_the_run_killed(mlflow_store: str) -> None:
    """SIGINT delivered while a metric is being inserted (sent from inside the INSERT) takes effect after the
    write: the metric is stored, the run ends KILLED at once (no write waits on a lock left half-way)."""
    import signal
    import time

    import sqlalchemy
    from sqlalchemy import event

    sent: list[str] = []

    def interrupt_the_insert(conn, cursor, statement, parameters, context, executemany) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO METRICS") and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(sqlalchemy.engine.Engine, "before_cursor_execute", interrupt_the_insert)
    try:
        with pytest.raises(faults.Interrupted), faults.handle_signals():
            with tracking.start_run("deferred", run_name="write") as handle:
                started = time.monotonic()
                tracking.log_metrics({"during": 1.0})  # the signal takes effect when this write is done
    finally:
        event.remove(sqlalchemy.engine.Engine, "before_cursor_execute", interrupt_the_insert)
    assert sent, "no metric INSERT was seen"
    run = tracking.client().get_run(handle.run_id)
    assert run.info.status == "KILLED"
    assert run.data.metrics.get("during") == 1.0
    assert time.monotonic() - started < 15, "ending the run waited on a lock"
