"""Shared pytest fixtures and helpers: MLflow isolation, the real case, tiny synthetic case folders, a real MLflow
server, free ports and headless chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REAL_CASE = REPO_ROOT.parent / "shared" / "data" / "mra_mni_0656"

#: Geometry of :func:`tiny_case` volumes: 0.8 x 0.8 x 1.5 mm voxels and a non-zero origin.
TINY_SHAPE = (24, 24, 12)
TINY_AFFINE = np.array([[0.8, 0.0, 0.0, -10.0],
                        [0.0, 0.8, 0.0, 5.0],
                        [0.0, 0.0, 1.5, 3.0],
                        [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="session", autouse=True)
def _single_torch_thread() -> None:
    """Keep torch on one thread: the test machine's cores are shared."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency, but the fixture stays generic
        return
    torch.set_num_threads(1)


#: What belongs to the user in the project's folder: tests must never write there (issue 32, item 11).
PROJECT_STATE = ("mlflow.db", "optuna.db", "mlruns", "mlartifacts", "outputs", "data")
#: Environment variables of the user's shell that would send a test's runs, studies or files elsewhere.
USER_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME",
            "MLFLOW_EXPERIMENT_ID", "MLFLOW_ARTIFACT_URI", "MLFLOW_BACKEND_STORE_URI", "STEGO_OPTUNA_STORAGE",
            "STEGO_WEIGHTS_CACHE", "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")


def project_state(root: Path = REPO_ROOT) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file of :data:`PROJECT_STATE` under ``root`` (a file that
    is written, even with the same bytes, changes its mtime)."""
    state = {}
    for name in PROJECT_STATE:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file()) if top.is_dir() else []
        for f in files:
            st = f.stat()
            state[str(f.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


@pytest.fixture(scope="session", autouse=True)
def _session_isolation(tmp_path_factory: pytest.TempPathFactory):
    """Before any fixture of any scope: work from a session folder with a session tracking store, without the
    user's MLflow / Optuna variables (``make test`` exports ``MLFLOW_TRACKING_URI=sqlite:///mlflow.db``), so no
    test, module fixture or subprocess writes into the project's ``mlflow.db``, ``mlruns/``, ``outputs/`` or
    ``data/``. At the end, those are checked unchanged (an error in the session's teardown otherwise)."""
    before = project_state()
    home = tmp_path_factory.mktemp("session")
    with pytest.MonkeyPatch.context() as mp:
        for name in USER_ENV:
            mp.delenv(name, raising=False)
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        mp.chdir(home)
        yield home
    after = project_state()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"tests wrote into the project's own store or outputs: {changed[:20]}"


@pytest.fixture(autouse=True)
def _isolated_mlflow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point MLflow at a SQLite store in ``tmp_path`` and run the test from ``tmp_path``.

    Relative paths (``outputs/``, ``mlflow.db``) therefore land in the test's temporary folder, and any run left
    open by a failing test is ended so it cannot leak into the next test.
    """
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    try:
        yield
    finally:
        import sys

        mlflow = sys.modules.get("mlflow")  # only tidy up if the test imported mlflow at all
        if mlflow is not None and mlflow.active_run() is not None:
            mlflow.end_run()


@pytest.fixture(scope="session")
def _mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, fully migrated MLflow SQLite database, built once per session (migrations take seconds)."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow_template")
    db = folder / "mlflow.db"
    with contextlib.chdir(folder):
        MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def mlflow_store(tmp_path: Path, _mlflow_template_db: Path) -> str:
    """A ready SQLite tracking store at the isolated ``MLFLOW_TRACKING_URI`` (``<tmp_path>/mlflow.db``).

    Copies the session's migrated template instead of creating the schema again, and points the Default
    experiment's artifacts into ``tmp_path``. Returns the tracking URI. Tests that do not request it still get
    an isolated (but slower to create) store from the autouse fixture.
    """
    db = tmp_path / "mlflow.db"
    shutil.copyfile(_mlflow_template_db, db)
    with contextlib.closing(sqlite3.connect(db)) as con, con:
        con.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                    (str(tmp_path / "mlruns" / "0"),))
    uri = f"sqlite:///{db}"
    assert os.environ["MLFLOW_TRACKING_URI"] == uri
    return uri


@pytest.fixture
def real_case_dir() -> Path:
    """The real MRA case folder (``STEGO_REAL_CASE`` or ``<repo>/../shared/data/mra_mni_0656``); skips if absent."""
    path = Path(os.environ.get("STEGO_REAL_CASE") or DEFAULT_REAL_CASE)
    if not (path / "image.nii.gz").is_file():
        pytest.skip(f"real case not available at {path} (set STEGO_REAL_CASE)")
    return path


def tube_volume(shape: tuple[int, int, int] = TINY_SHAPE, *, radius_vox: float = 2.5, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A bright straight tube along the last axis on a noisy background.

    Returns ``(image (I, J, K) float32, label (I, J, K) uint8, brain_mask (I, J, K) uint8)``; the label is the
    tube, the brain mask a centred box covering the inner half of the first two axes (it contains the tube).
    """
    rng = np.random.default_rng(seed)
    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    ci, cj = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    tube2d = (i - ci) ** 2 + (j - cj) ** 2 <= radius_vox ** 2
    label = np.repeat(tube2d[:, :, None], shape[2], axis=2).astype(np.uint8)
    image = (0.2 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    image[label > 0] += 0.7
    mask = np.zeros(shape, dtype=np.uint8)
    qi, qj = shape[0] // 4, shape[1] // 4
    mask[qi:shape[0] - qi, qj:shape[1] - qj, :] = 1
    return image, label, mask


@pytest.fixture
def tiny_case(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a small case folder and returning it.

    ``tiny_case(name="case_000", *, root=None, label=True, brain_mask=False, seed=0, shape=(24, 24, 12),
    affine=TINY_AFFINE)`` writes ``image.nii.gz`` (float32 bright tube), ``label.nii.gz`` (uint8 {0, 1}) and
    optionally ``brain_mask.nii.gz`` under ``<root or tmp_path/cases>/<name>/`` with a non-identity affine
    (0.8 x 0.8 x 1.5 mm, origin (-10, 5, 3)).
    """
    from stego_core.data.io import save_volume

    def make(name: str = "case_000", *, root: str | Path | None = None, label: bool = True,
             brain_mask: bool = False, seed: int = 0, shape: tuple[int, int, int] = TINY_SHAPE,
             affine: np.ndarray = TINY_AFFINE) -> Path:
        folder = Path(root if root is not None else tmp_path / "cases") / name
        image, lab, mask = tube_volume(shape, seed=seed)
        save_volume(folder / "image.nii.gz", image, affine)
        if label:
            save_volume(folder / "label.nii.gz", lab, affine)
        if brain_mask:
            save_volume(folder / "brain_mask.nii.gz", mask, affine)
        return folder

    return make


def free_port() -> int:
    """A free TCP port on the loopback interface (for a server or a torchrun rendezvous a test starts)."""
    import socket

    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(url: str, proc: subprocess.Popen, *, timeout_s: float = 90.0,
                    output: Callable[[], str] = lambda: "") -> None:
    """Poll ``<url>/health`` until an MLflow server started as ``proc`` answers 200; RuntimeError (with the
    tail of ``output()``) when ``proc`` exits first or ``timeout_s`` passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"no answer after {timeout_s} s"
            raise RuntimeError(f"server at {url}: {state}: {output()[-2000:]}")
        time.sleep(0.5)


#: Debian's ``chromium`` (or another Chromium build) for the headless-browser tests; None when absent.
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install "
                                                             "chromium; .ci/run installs it)")


def headless_chromium(url: str, *args: str, window: tuple[int, int], profile: Path, budget_ms: int = 4000,
                      timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run headless :data:`CHROMIUM` on ``url`` with ``args`` (``--dump-dom``, ``--screenshot=<file>``), checked.

    ``window`` is (width, height) in CSS pixels at scale 1, ``profile`` a fresh user-data folder, ``budget_ms``
    the virtual time the page gets to load and draw before the dump or the screenshot."""
    cmd = [*chromium_command(window=window, profile=profile), f"--virtual-time-budget={budget_ms}", *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)


def chromium_command(*, window: tuple[int, int], profile: Path) -> list[str]:
    """The headless :data:`CHROMIUM` command line every browser test starts from (skips without chromium);
    :func:`headless_chromium` adds a page and an action, ``tests/browser.py`` the DevTools pipe."""
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    return [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio",
            "--force-device-scale-factor=1", "--allow-file-access-from-files", "--no-first-run",
            f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}"]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory, _mlflow_template_db: Path):
    """A real ``mlflow server`` process on a free loopback port (one per session); yields its URL.

    Its SQLite store starts from the migrated template; artifacts are served (``mlflow-artifacts:``) from a
    folder of the session. Tests talk to it over REST, as a user's tracking server would be used.
    """
    import sys

    folder = tmp_path_factory.mktemp("mlflow_server")
    db = folder / "server.db"
    shutil.copyfile(_mlflow_template_db, db)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (folder / "server.log").open("w")
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow_cli), "server", "--backend-store-uri", f"sqlite:///{db}",
                             "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], cwd=folder, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        wait_for_health(url, proc, timeout_s=90, output=(folder / "server.log").read_text)
        yield url
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def server_store(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point this test's MLflow at the session's real ``mlflow server`` (REST); returns its URL."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


# ---------------------------------------------------------------------------------- compositions tests share


def extract_crops(volume, *, axis, patch_size, stride, brain_mask=None, min_brain_fraction=0.0):
    """``(crops (N, P, P), index (N, 3))`` of a volume: the library's crop_index then take_crops."""
    from stego_core._checks import check_ndim, check_same_shape
    from stego_core.data.slicing import crop_index, take_crops

    check_ndim(volume, 3, "volume")
    if brain_mask is not None:
        check_same_shape(volume, brain_mask, "volume", "brain_mask")
    index = crop_index(volume.shape, axis=axis, patch_size=patch_size, stride=stride, brain_mask=brain_mask,
                       min_brain_fraction=min_brain_fraction)
    return take_crops(volume, index, axis=axis, patch_size=patch_size), index


def blend_crops(predictions, index, volume_shape, *, axis, patch_size, blend="constant"):
    """Per-crop predictions placed back into a volume by the library's CropBlender."""
    from stego_core.data.slicing import CropBlender

    blender = CropBlender(volume_shape, axis=axis, patch_size=patch_size, blend=blend)
    blender.add(predictions, index)
    return blender.result()


def segment_volume(segmenter, image, brain_mask, engine, *, progress=False, spacing=None):
    """Probabilities and the binary mask at the segmenter's own threshold (the engine's predict_volume)."""
    from stego_core.engine.reconstruction import binarize, predict_volume

    prob = predict_volume(segmenter, image, brain_mask, engine, progress=progress, spacing=spacing)
    return prob, binarize(prob, float(segmenter.threshold), brain_mask)


def stop_process(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM ``proc`` and wait for it; SIGKILL it after ``timeout`` seconds (a server a test started)."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()


def table_rows(text: str) -> list[str]:
    """The method names of the comparison table that ``run_main`` returns (the table, a blank line, the last
    block): the rows after the ``n = ...`` line, the header and its rule."""
    table = text.partition("\n\n")[0]
    return [line.split()[0] for line in table.splitlines()[3:] if line.strip()]
