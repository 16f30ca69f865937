"""Everything MLflow: the only module of the library that imports ``mlflow``.

Runs end FAILED (with the traceback logged as ``error.txt``) when the body raises; storage URLs are logged with
any password masked; outputs are scoped by run id. The tracking store defaults to ``sqlite:///mlflow.db`` and
``MLFLOW_TRACKING_URI`` is honoured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import tempfile
import traceback
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from stego_core.io import Case

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_PARAM_VALUE_MAX = 6000
log = logging.getLogger(__name__)


def tracking_uri() -> str:
    """The tracking URI in force: ``MLFLOW_TRACKING_URI`` if set, else :data:`DEFAULT_TRACKING_URI`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def mask_secrets(url: str) -> str:
    """Replace the password of a URL (``scheme://user:password@host``) with ``***``.

    >>> mask_secrets("postgresql://optuna:s3cret@db:5432/optuna")
    'postgresql://optuna:***@db:5432/optuna'
    >>> mask_secrets("sqlite:///optuna.db")
    'sqlite:///optuna.db'
    """
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def git_commit(repo: str | Path | None = None) -> str:
    """The current git commit of ``repo`` (default: this package's checkout), or ``"unknown"``."""
    repo = Path(repo) if repo else Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        # A repository without commits prints "HEAD" and fails: only a successful answer is a commit.
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunKilled(Exception):
    """Raise (a subclass of) this inside :func:`start_run` to end the run KILLED instead of FAILED.

    For deliberate stops that are not errors, such as an Optuna trial pruned by a sweep (``sweeps.driver`` raises
    a subclass of both this and ``optuna.TrialPruned``). The message is kept in the tag ``end_reason``; no
    ``error.txt`` is logged. The exception still propagates.
    """


@dataclass
class RunHandle:
    """The active run: its id, experiment and a run-scoped local output folder."""

    run_id: str
    experiment_id: str
    output_dir: Path


def _ensure_tracking() -> None:
    mlflow.set_tracking_uri(tracking_uri())


@contextlib.contextmanager
def start_run(experiment: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
              nested: bool = False, output_root: str | Path = "outputs", run_id: str | None = None
              ) -> Iterator[RunHandle]:
    """Open an MLflow run (or resume ``run_id``); it ends FAILED with ``error.txt`` logged if the body raises
    (KILLED, without ``error.txt``, if it raises :class:`RunKilled`).

    The run's local outputs go to ``<output_root>/<run_id>/`` so runs never overwrite each other.
    """
    _ensure_tracking()
    if run_id is None:
        project_run = os.environ.get("MLFLOW_RUN_ID")
        if project_run and mlflow.active_run() is None:
            # Under `mlflow run`, this run adopts the project's run (MLFLOW_RUN_ID), whose experiment was chosen by
            # `--experiment-name`: any other active experiment would make MLflow refuse to start it.
            mlflow.set_experiment(experiment_id=MlflowClient().get_run(project_run).info.experiment_id)
        elif nested and mlflow.active_run() is not None:
            # A nested run lives in its parent's experiment, whatever that is.
            mlflow.set_experiment(experiment_id=mlflow.active_run().info.experiment_id)
        else:
            mlflow.set_experiment(experiment)
    all_tags = {"git_commit": git_commit(), **(tags or {})}
    with mlflow.start_run(run_name=run_name, nested=nested, run_id=run_id, tags=all_tags) as run:
        handle = RunHandle(run.info.run_id, run.info.experiment_id, Path(output_root) / run.info.run_id)
        handle.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            yield handle
        except RunKilled as exc:
            with contextlib.suppress(Exception):
                mlflow.set_tag("end_reason", f"{type(exc).__name__}: {exc}"[:4000])
            mlflow.end_run(status="KILLED")
            raise
        except BaseException as exc:
            with contextlib.suppress(Exception):
                mlflow.log_text(traceback.format_exc(), "error.txt")
                mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:4000])
            mlflow.end_run(status="FAILED")
            raise


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def log_params(params: Mapping[str, Any]) -> None:
    """Log params in batches; long values are truncated to MLflow's limit, URLs masked."""
    clean = {}
    for key, value in params.items():
        text = str(value)
        if "://" in text:
            text = mask_secrets(text)
        clean[key] = text[:_PARAM_VALUE_MAX]
    items = list(clean.items())
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))


def log_metrics(metrics: Mapping[str, float], *, step: int | None = None) -> None:
    """Log numeric metrics (non-finite values are skipped with a warning)."""
    finite = {}
    for k, v in metrics.items():
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            log.warning("metric %s is not finite (%s); not logged", k, v)
            continue
        finite[k] = v
    mlflow.log_metrics(finite, step=step)


def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a whole folder."""
    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_figure(figure: Any, artifact_file: str) -> None:
    """Log a matplotlib figure as a PNG and close it."""
    import matplotlib.pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_figure_image(figure: Any, *, key: str, step: int) -> None:
    """Log a matplotlib figure as an MLflow image with a step (the UI's image slider); leaves it open."""
    import numpy as np

    figure.canvas.draw()
    image = np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()
    mlflow.log_image(image, key=key, step=step)


def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def log_dataset(cases: list[Case], *, name: str, context: str, source: str) -> None:
    """Log the data manifest (case ids, paths, content digests) as an MLflow dataset input.

    A pandas dataset input keeps only name, digest, source, schema and profile, so the case ids also go into
    the input's ``case_ids`` tag (cut to MLflow's 500 characters) and the whole manifest into the artifact
    ``datasets/<context>_<name>.json``.
    """
    import pandas as pd

    frame = pd.DataFrame([c.to_dict() for c in cases]).fillna("")
    with warnings.catch_warnings():  # a local path matches MLflow's local source type twice; harmless
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        dataset = mlflow.data.from_pandas(frame, source=str(source), name=name)
    ids = ",".join(c.case_id for c in cases)
    ids = ids if len(ids) <= 500 else ids[:496] + ",..."
    mlflow.log_input(dataset, context=context, tags={"n_cases": str(len(cases)), "case_ids": ids})
    mlflow.log_text(json.dumps([c.to_dict() for c in cases], indent=2), f"datasets/{context}_{name}.json")


def artifact_uri(path: str = "") -> str:
    return mlflow.get_artifact_uri(path)


def download_artifacts(uri: str, dst: str | Path | None = None) -> Path:
    """Download artifacts at ``uri`` (e.g. ``runs:/<id>/checkpoints``) to ``dst`` and return the local path."""
    _ensure_tracking()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))


def log_pytorch_model(model: Any, *, name: str = "model", input_example: Any = None,
                      metadata: Mapping[str, Any] | None = None, code_paths: list[str] | None = None,
                      serialization_format: str = "pickle") -> str:
    """Log a torch module as an MLflow model of the active run; returns its ``runs:/<id>/<name>`` URI.

    ``pickle`` (the default here) keeps the module's class, so the loaded model has its methods, ``.eval()``
    and any input shape. MLflow's own default, ``pt2`` (``torch.export``), requires ``input_example``, fixes
    every size of the example but the batch (and the batch too when the example's batch is 1) and loads back
    as a bare graph module.
    """
    import mlflow.pytorch

    mlflow.pytorch.log_model(model, name=name, input_example=input_example, metadata=dict(metadata or {}),
                             code_paths=code_paths, serialization_format=serialization_format,
                             pip_requirements=pinned_requirements())
    return f"runs:/{active_run_id()}/{name}"


def pinned_requirements() -> list[str]:
    """The environment a logged model needs: this package's pinned dependencies plus the package itself.

    Given explicitly so MLflow does not infer them in a subprocess (about 20 s per model).
    """
    from importlib import metadata

    try:
        requires = metadata.requires("stego-vessels") or []
        version = metadata.version("stego-vessels")
    except metadata.PackageNotFoundError:
        return [f"torch=={metadata.version('torch')}", f"mlflow=={metadata.version('mlflow')}"]
    return [r for r in requires if "extra ==" not in r] + [f"stego-vessels=={version}"]


def load_pytorch_model(model_uri: str, *, map_location: str = "cpu") -> Any:
    """Load a model logged by :func:`log_pytorch_model` (``runs:/...`` or ``models:/...``)."""
    import mlflow.pytorch

    _ensure_tracking()
    return mlflow.pytorch.load_model(model_uri, map_location=map_location)


def run_of_model(model_uri: str) -> str | None:
    """The run id that logged ``model_uri`` when it can be told (``runs:/<id>/...``)."""
    m = re.match(r"runs:/([0-9a-f]+)/", model_uri)
    return m.group(1) if m else None


def client() -> MlflowClient:
    _ensure_tracking()
    return MlflowClient(tracking_uri=tracking_uri())


def lightning_logger(run_id: str, experiment: str) -> Any:
    """A Lightning ``MLFlowLogger`` that writes into the already open run ``run_id``."""
    from lightning.pytorch.loggers import MLFlowLogger

    return MLFlowLogger(experiment_name=experiment, tracking_uri=tracking_uri(), run_id=run_id,
                        log_model=False)


def scratch_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="stego_")
