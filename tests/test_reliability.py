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
from conftest import REPO_ROOT, free_port, wait_for_health

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
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
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
