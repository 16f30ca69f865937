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
