"""Everything MLflow: the only module of the library that imports ``mlflow``.

Runs end FAILED (with the traceback logged as ``error.txt``) when the body raises; storage URLs are logged with
any password masked; outputs are scoped by run id. The tracking store defaults to ``sqlite:///mlflow.db`` and
``MLFLOW_TRACKING_URI`` is honoured.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import subprocess
import time
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from stego_core.config import PROJECT_ROOT
from stego_core.data.io import Case
from stego_core.runtime import distributed, faults
from stego_core.runtime.faults import mask_secrets  # noqa: F401  (re-exported: what every writer masks with)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
#: The artifact holding every run's resolved plan (:func:`log_plan`).
PLAN_ARTIFACT = "plan.yaml"
_PARAM_VALUE_MAX = 6000
log = logging.getLogger(__name__)


def _main_only(fn: Any) -> Any:
    """Run ``fn`` on rank 0 only (:mod:`stego_core.runtime.distributed`); the other ranks of a launched run get None."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs) if distributed.is_main() else None

    return wrapper


def _whole(fn: Any) -> Any:
    """Run ``fn`` (a write to the tracking store) with SIGTERM / SIGINT held back until it is done
    (:func:`stego_core.runtime.faults.deferred_signals`): a signal that interrupted a store transaction half-way
    could leave SQLite's write lock with a connection that is never closed, and every write after it (the runs
    ending KILLED) would wait for it until SQLite's busy timeout, then fail."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with faults.deferred_signals():
            return fn(*args, **kwargs)

    return wrapper


def tracking_uri() -> str:
    """The tracking URI in force: ``MLFLOW_TRACKING_URI`` if set, else :data:`DEFAULT_TRACKING_URI`;
    ``postgresql://`` names the installed driver (:func:`stego_core.runtime.faults.sqlalchemy_url`).

    Raises
    ------
    ValueError
        A password the URL parser would split (an unescaped ``@``; ``/`` in an http URL), naming the variable.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    return faults.sqlalchemy_url(faults.check_url(uri, "MLFLOW_TRACKING_URI"))


def git_commit(repo: str | Path | None = None) -> str:
    """The current git commit of ``repo`` (default: this package's checkout), or ``"unknown"``."""
    repo = Path(repo) if repo else PROJECT_ROOT
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        # A repository without commits prints "HEAD" and fails: only a successful answer is a commit.
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunKilled(Exception):
    """Raise (a subclass of) this inside :func:`start_run` to end the run KILLED instead of FAILED.

    For deliberate stops that are not errors, such as an Optuna trial pruned by a sweep (``sweeps.objective`` raises
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
    """Point MLflow at :func:`tracking_uri`, opening (creating, migrating) the store under a file lock beside a
    SQLite database: MLflow's own schema migration races when processes start together on a new store.

    With credentials in the URI, MLflow's own end-of-run lines ("View run ... at: http://user:password@...") are
    turned off (``MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT``; :func:`start_run` prints the link without them) and
    every log line passes :class:`stego_core.runtime.faults.SecretFilter`."""
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    faults.mask_logging()
    if faults.has_password(uri) or faults.opener_credentials(uri)[0]:
        os.environ[_SUPPRESS_LINK_ENV] = "true"
    try:
        with faults.store_lock(uri):
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RuntimeError(f"cannot open the MLflow tracking store {mask_secrets(uri)}: {type(exc).__name__}: "
                           f"{mask_secrets(first)[:300]}") from None


#: MLflow prints "View run <name> at: <tracking URI>/#/..." at the end of each run on an http store unless this
#: is true; the tracking URI may hold a password.
_SUPPRESS_LINK_ENV = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"


def run_link(run_id: str, experiment_id: str, *, uri: str | None = None) -> str | None:
    """The run's page on an ``http(s)`` tracking server (``uri``, default :func:`tracking_uri`), without the URI's
    credentials; None for other stores.

    >>> run_link("abc", "1", uri="http://alice:S3cret@127.0.0.1:5000/")
    'http://127.0.0.1:5000/#/experiments/1/runs/abc'
    """
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri or tracking_uri())
    if parts.scheme not in ("http", "https"):
        return None
    host = parts.netloc.rpartition("@")[2]
    base = urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


#: The id of MLflow's "Default" experiment, where `mlflow run` puts its run unless told `--experiment-name`.
DEFAULT_EXPERIMENT_ID = "0"
#: Tags of the project's own run copied onto the run that replaces it (see :func:`start_run`).
_PROJECT_TAG_PREFIXES = ("mlflow.source.", "mlflow.project.", "mlflow.gitRepoURL", "mlflow.user")
NOTE_TAG = "mlflow.note.content"


def system_metrics_available() -> bool:
    """Whether MLflow's system metrics (CPU, memory, GPU) can be sampled: they need ``psutil``."""
    import importlib.util

    return importlib.util.find_spec("psutil") is not None


def _project_run_to_adopt(experiment: str) -> tuple[str | None, str | None]:
    """Under ``mlflow run`` (``MLFLOW_RUN_ID`` set, no active run): ``(run to adopt, run to redirect from)``.

    The project's run is adopted when it lives in an experiment the user chose (``--experiment-name`` /
    ``--experiment-id`` / ``MLFLOW_EXPERIMENT_NAME``), i.e. any experiment but "Default" -- or "Default" when
    that is the configured experiment. A project run that landed in "Default" only because nothing was chosen
    is not adopted: the step opens its own run in ``experiment`` and the project run points to it.
    """
    project_run = os.environ.get("MLFLOW_RUN_ID")
    if not project_run or mlflow.active_run() is not None:
        return None, None
    info = MlflowClient().get_run(project_run).info
    if info.experiment_id != DEFAULT_EXPERIMENT_ID or experiment == "Default":
        mlflow.set_experiment(experiment_id=info.experiment_id)
        return project_run, None
    os.environ.pop("MLFLOW_RUN_ID", None)  # else mlflow.start_run would adopt it
    return None, project_run


def _point_project_run(project_run: str, run: Any) -> dict[str, str]:
    """Tag the project's "Default" run with a link to ``run``; returns the project tags to copy onto ``run``."""
    c = MlflowClient()
    project = c.get_run(project_run)
    exp = c.get_experiment(run.info.experiment_id)
    c.set_tag(project_run, "stego.moved_to_run_id", run.info.run_id)
    c.set_tag(project_run, NOTE_TAG, (
        f"`mlflow run` started without `--experiment-name`: this run stays empty. The step ran as run "
        f"`{run.info.run_id}` in experiment **{exp.name}** (#/experiments/{exp.experiment_id}/runs/"
        f"{run.info.run_id}). Pass `--experiment-name {exp.name}` to avoid this placeholder."))
    return {k: v for k, v in project.data.tags.items() if k.startswith(_PROJECT_TAG_PREFIXES)}


#: Tags of a launched run (several processes) that record which rank ended it first, and how: the first rank
#: to fail or be interrupted decides FAILED or KILLED, the ranks torn down after it keep that status.
END_RANK_TAG, END_STATUS_TAG = "ended_by_rank", "end_status"


def _end_status(exc: BaseException) -> str:
    """KILLED for a signal (:class:`stego_core.runtime.faults.Interrupted`) or :class:`RunKilled`, FAILED otherwise."""
    return "KILLED" if isinstance(exc, (RunKilled, faults.Interrupted)) else "FAILED"


def _claim_end(run_id: str, exc: BaseException) -> str | None:
    """Record that this rank ends launched run ``run_id`` because of ``exc``, unless another rank did first.

    When one rank of a job fails or is signalled, the others are torn down after it (torchrun sends them
    SIGTERM; a collective with the gone rank raises), so their exceptions are consequences: the first rank's
    status and error stand. Returns the status another rank ended the run with, or None when this rank is the
    first (its status and error are then recorded: ``error`` and ``error.txt``, or ``end_reason``, prefixed with
    the rank; a rank other than 0 also ends the run, which rank 0 alone would otherwise do).
    """
    # Not held back from signals like the other writes (:func:`_whole`): it runs while torchrun tears the ranks
    # down, and a SIGTERM held here would be raised again out of the claim, after it, into the run's ending.
    c = client()
    tags = c.get_run(run_id).data.tags
    if END_STATUS_TAG in tags and tags.get(END_RANK_TAG) != str(distributed.global_rank()):
        return tags[END_STATUS_TAG]
    rank, status = distributed.global_rank(), _end_status(exc)
    c.set_tag(run_id, END_RANK_TAG, str(rank))
    c.set_tag(run_id, END_STATUS_TAG, status)
    if rank != 0:
        message = mask_secrets(f"rank {rank}: {type(exc).__name__}: {exc}")[:4000]
        with contextlib.suppress(Exception):
            if status == "KILLED":
                c.set_tag(run_id, "end_reason", message)
            else:
                c.log_text(run_id, mask_secrets(f"rank {rank}\n{traceback.format_exc()}"), "error.txt")
                c.set_tag(run_id, "error", message)
        c.set_terminated(run_id, status=status)
    return None


@contextlib.contextmanager
def start_run(experiment: str, *, run_name: str | None = None, tags: Mapping[str, str] | None = None,
              nested: bool = False, output_root: str | Path = "outputs", run_id: str | None = None,
              description: str | None = None, log_system_metrics: bool = False) -> Iterator[RunHandle]:
    """Open an MLflow run (or resume ``run_id``); it ends FAILED with ``error.txt`` logged if the body raises
    (KILLED, without ``error.txt``, if it raises :class:`RunKilled` or is interrupted by SIGTERM / SIGINT,
    :class:`stego_core.runtime.faults.Interrupted`). The tags ``owner_host`` / ``owner_pid`` let
    :mod:`stego_core.platform.doctor` end KILLED the runs of processes that died without a word (SIGKILL).

    The run's local outputs go to ``<output_root>/<run_id>/`` so runs never overwrite each other.
    ``description`` is the run's one-line description (the run page's "Description", ``mlflow.note.content``);
    ``log_system_metrics`` samples CPU / memory / GPU while the run is open (when ``psutil`` is installed).
    Under ``mlflow run`` the project's run is adopted unless it landed in "Default" by default (see
    :func:`_project_run_to_adopt`): runs always land in ``experiment`` or the one chosen on the command line.

    Launched as several processes, rank 0 opens and ends the run and the others only get its id, but the first
    rank to fail or be signalled decides how it ends (:func:`_claim_end`): a failure on any rank ends it FAILED
    with that rank's error, a SIGTERM to any rank KILLED, whatever the ranks torn down after it raise.

    The parts, in order: :func:`_follow_run` (a rank other than 0), :func:`_choose_experiment`,
    :func:`_run_tags`, :func:`_prepare_handle`, then :func:`_end_after` when the body raises and
    :func:`_print_link` when the run has ended.
    """
    launched = distributed.world_size() > 1
    if launched:
        distributed.init_from_env()
        if not distributed.is_main():  # rank 0 opens the run; the others get its id and write nothing
            with _follow_run(output_root) as handle:
                yield handle
            return
    _ensure_tracking()
    redirected_from = _choose_experiment(experiment, nested=nested, resume=run_id is not None)
    if not nested and run_id is None:
        with contextlib.suppress(Exception):  # runs left RUNNING by killed processes end KILLED
            reap_dead_runs(client())
    system = log_system_metrics and system_metrics_available()
    handle = None
    try:
        with mlflow.start_run(run_name=run_name, nested=nested, run_id=run_id,
                              tags=_run_tags(tags, description, resume=run_id is not None),
                              log_system_metrics=system or None) as run:
            handle = _prepare_handle(run, output_root, redirected_from=redirected_from, description=description,
                                     resume=run_id is not None)
            try:
                yield handle
            except BaseException as exc:
                _end_after(exc, handle.run_id, launched=launched)
                raise
    finally:
        if handle is not None:
            _print_link(handle)


@contextlib.contextmanager
def _follow_run(output_root: str | Path) -> Iterator[RunHandle]:
    """A rank other than 0 of a launched run: rank 0's run id and experiment (broadcast), a local output folder,
    and, when the body raises, the claim to decide how the run ends (:func:`_claim_end`)."""
    run_id, experiment_id = distributed.broadcast_object(None)
    handle = RunHandle(run_id, experiment_id, Path(output_root) / run_id)
    handle.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        yield handle
    except BaseException as exc:
        with contextlib.suppress(Exception):
            _claim_end(run_id, exc)
        raise


def _choose_experiment(experiment: str, *, nested: bool, resume: bool) -> str | None:
    """Make MLflow open the next run in the right experiment: the project's run's (adopted, under ``mlflow
    run``), the parent's (a nested run), else ``experiment`` (tagged a model-training experiment). A resumed run
    stays where it is. Returns the project run to point at the new run, when ``mlflow run`` left it in
    "Default" (:func:`_project_run_to_adopt`)."""
    if resume:
        return None
    adopted, redirected_from = _project_run_to_adopt(experiment)
    if adopted is None and nested and mlflow.active_run() is not None:
        # A nested run lives in its parent's experiment, whatever that is.
        mlflow.set_experiment(experiment_id=mlflow.active_run().info.experiment_id)
    elif adopted is None:
        _mark_model_training(mlflow.set_experiment(experiment))
    return redirected_from


def _run_tags(tags: Mapping[str, str] | None, description: str | None, *, resume: bool) -> dict[str, str]:
    """The tags a run opens with: git commit, owner (:func:`stego_core.runtime.faults.owner_tags`), the caller's
    (keys made safe, :func:`safe_key`), and the description of a new run."""
    all_tags = {"git_commit": git_commit(), **faults.owner_tags(),
                **{safe_key(k): str(v) for k, v in (tags or {}).items()}}
    if description and not resume:
        all_tags[NOTE_TAG] = description
    return all_tags


def _prepare_handle(run: Any, output_root: str | Path, *, redirected_from: str | None, description: str | None,
                    resume: bool) -> RunHandle:
    """What a just opened run needs before its body: the link from the project's placeholder run, the
    description of a resumed run that had none, its output folder, and its id sent to the other ranks."""
    if redirected_from is not None:
        with contextlib.suppress(Exception):
            mlflow.set_tags({**_point_project_run(redirected_from, run), "stego.project_run_id": redirected_from})
    if description and resume and NOTE_TAG not in run.data.tags:
        mlflow.set_tag(NOTE_TAG, description)
    handle = RunHandle(run.info.run_id, run.info.experiment_id, Path(output_root) / run.info.run_id)
    handle.output_dir.mkdir(parents=True, exist_ok=True)
    if distributed.world_size() > 1:
        distributed.broadcast_object((handle.run_id, handle.experiment_id))
    return handle


def _end_after(exc: BaseException, run_id: str, *, launched: bool) -> None:
    """End the active run after its body raised ``exc``: with the status another rank claimed first, KILLED
    (``end_reason``) for a signal or :class:`RunKilled`, else FAILED with ``error`` and ``error.txt`` (URL
    passwords masked in both)."""
    ended = None
    if launched:
        with contextlib.suppress(Exception):
            ended = _claim_end(run_id, exc)
    if ended is not None:  # another rank failed or was signalled first: its status stands
        mlflow.end_run(status=ended)
    elif _end_status(exc) == "KILLED":
        with contextlib.suppress(Exception):
            mlflow.set_tag("end_reason", mask_secrets(f"{type(exc).__name__}: {exc}")[:4000])
        mlflow.end_run(status="KILLED")
    else:
        with contextlib.suppress(Exception):
            mlflow.log_text(mask_secrets(traceback.format_exc()), "error.txt")
            mlflow.set_tag("error", mask_secrets(f"{type(exc).__name__}: {exc}")[:4000])
        mlflow.end_run(status="FAILED")


def _print_link(handle: RunHandle) -> None:
    """Print the ended run's page on an http tracking server without the URI's credentials, where MLflow's own
    line (which would show them) is turned off (:func:`_ensure_tracking`)."""
    link = run_link(handle.run_id, handle.experiment_id)
    if link and os.environ.get(_SUPPRESS_LINK_ENV) == "true":
        print(f"View run {handle.run_id} at: {link}", flush=True)


def reap_dead_runs(client: Any, *, dry_run: bool = False) -> list[str]:
    """End KILLED every RUNNING run whose owner process (on this host) is gone; returns their ids.

    Parameters
    ----------
    client : mlflow.tracking.MlflowClient
        A client of the tracking store (:func:`client`).
    dry_run : bool
        Only report.
    """
    killed = []
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return killed
    for run in client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=5000):
        if not faults.owner_dead(run.data.tags):
            continue
        killed.append(run.info.run_id)
        if dry_run:
            continue
        client.set_tag(run.info.run_id, "end_reason",
                       f"owner process {run.data.tags.get('owner_host')}:{run.data.tags.get('owner_pid')} is gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        log.warning("run %s was RUNNING but its process %s is gone: marked KILLED", run.info.run_id,
                    run.data.tags.get("owner_pid"))
    return killed


def _mark_model_training(exp: Any) -> None:
    """Tag an experiment ``mlflow.experimentKind=custom_model_development`` (MLflow's own record of the kind).

    MLflow 3.17.2's UI does not read this tag to pick its view (the GenAI / model-training switch, kept in the
    browser, decides; see :mod:`stego_core.platform.ui`); MLflow's APIs and other UI versions do."""
    if exp.tags.get("mlflow.experimentKind") != "custom_model_development":
        with contextlib.suppress(Exception):
            MlflowClient().set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "custom_model_development")


@_main_only
@_whole
def set_description(text: str) -> None:
    """Set the active run's markdown description (the run page's "Description", ``mlflow.note.content``)."""
    mlflow.set_tag(NOTE_TAG, text)


def active_run_id() -> str | None:
    run = mlflow.active_run()
    return run.info.run_id if run else None


def param_text(value: Any) -> str:
    """A value as :func:`log_params` records it: text, URLs masked, cut to MLflow's limit."""
    text = str(value)
    if "://" in text:
        text = mask_secrets(text)
    return text[:_PARAM_VALUE_MAX]


#: What MLflow accepts in a metric, param or tag name; anything else becomes ``_`` (:func:`safe_key`).
_KEY_CHARS = re.compile(r"[^A-Za-z0-9_\-. :/]")


def safe_key(name: str) -> str:
    """``name`` as an MLflow metric / param / tag key: characters MLflow refuses (``+``, ``*``, ``<``...) become
    ``_`` (a case folder named ``a+b`` logs ``dice/a_b``; tables keep the real name).

    >>> safe_key("dice/<img src=x>"), safe_key("methods.stego+crf.method")
    ('dice/_img src_x_', 'methods.stego_crf.method')
    """
    return _KEY_CHARS.sub("_", str(name))


#: Tags ``case_key/<metric-key form>`` = the case id, on runs whose case ids MLflow's names cannot hold.
CASE_KEY_TAG = "case_key/"


def case_keys(case_ids: Iterable[str]) -> dict[str, str]:
    """``{case id: the form its metric keys take}`` (:func:`safe_key`) for the ids that :func:`safe_key` changes.

    Raises
    ------
    ValueError
        Two case ids become the same key (their metrics would overwrite each other), naming both.

    >>> case_keys(["plain", "a_b_*c*"])
    {'a_b_*c*': 'a_b__c_'}
    """
    seen: dict[str, str] = {}
    changed = {}
    for case_id in case_ids:
        key = safe_key(case_id)
        if seen.get(key, case_id) != case_id:
            raise ValueError(f"case ids {seen[key]!r} and {case_id!r} both become the metric key {key!r} (MLflow "
                             "names hold only letters, digits and _-. :/); rename one of the case folders")
        seen[key] = case_id
        if key != case_id:
            changed[case_id] = key
    return changed


def tag_case_keys(case_ids: Iterable[str]) -> None:
    """Check the case ids' metric keys (:func:`case_keys`) and tag the active run ``case_key/<key>`` = the case id
    for each one changed, so that readers of its metrics show the real names (:func:`case_names`)."""
    changed = case_keys(case_ids)
    if changed:
        set_tags({f"{CASE_KEY_TAG}{key}": case_id for case_id, key in changed.items()})


def case_names(tags: Mapping[str, str]) -> dict[str, str]:
    """``{metric-key form: case id}`` from a run's tags (:func:`tag_case_keys`); absent keys are the ids."""
    return {k[len(CASE_KEY_TAG):]: v for k, v in tags.items() if k.startswith(CASE_KEY_TAG)}


@_main_only
@_whole
def log_params(params: Mapping[str, Any]) -> None:
    """Log params in batches; keys made safe (:func:`safe_key`), long values truncated to MLflow's limit, URLs
    masked."""
    items = [(safe_key(key), param_text(value)) for key, value in params.items()]
    for i in range(0, len(items), 100):
        mlflow.log_params(dict(items[i:i + 100]))


@_main_only
def log_plan(config: Any, output_dir: str | Path, *, params: Mapping[str, Any] | None = None,
             exclude: Iterable[str] = ()) -> Path:
    """Log a run's resolved plan: its key settings as params (:func:`stego_core.platform.params.key_params`: the
    method, seeds, data and what differs from the defaults; plus ``params``, less the keys in ``exclude``) and
    the whole plan written to ``output_dir`` as ``plan.yaml``, logged beside them; ``--config plan.yaml`` reruns
    the same plan.

    ``exclude`` is for values that may change while the run is continued (MLflow params cannot change): a
    resumed pretraining run keeps ``max_steps`` in a tag instead, and logs the plan again (``plan.yaml`` is
    then the last attempt's)."""
    from stego_core.config import save_config
    from stego_core.platform.params import key_params

    skip = set(exclude)
    log_params({k: v for k, v in {**key_params(config), **(params or {})}.items() if k not in skip})
    path = save_config(config, Path(output_dir) / PLAN_ARTIFACT)
    log_artifact(path)
    return path


@_main_only
@_whole
def log_metrics(metrics: Mapping[str, float], *, step: int | None = None) -> None:
    """Log numeric metrics (non-finite values are skipped with a warning)."""
    finite = {}
    for k, v in metrics.items():
        v = float(v)
        if v != v or v in (float("inf"), float("-inf")):
            log.warning("metric %s is not finite (%s); not logged", k, v)
            continue
        finite[safe_key(k)] = v
    mlflow.log_metrics(finite, step=step)


@_main_only
@_whole
def set_tags(tags: Mapping[str, Any]) -> None:
    mlflow.set_tags({safe_key(k): str(v) for k, v in tags.items()})


@_main_only
@_whole
def delete_tags(keys: Iterable[str]) -> None:
    """Remove tags of the active run (those it does not have are skipped), e.g. a previous attempt's end."""
    c = MlflowClient()
    run_id = mlflow.active_run().info.run_id
    present = c.get_run(run_id).data.tags
    for key in keys:
        if key in present:
            c.delete_tag(run_id, key)


@_main_only
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

    if distributed.is_main():
        mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def figure_array(figure: Any) -> Any:
    """A matplotlib figure as an RGB ``uint8`` array (H, W, 3); the figure is closed."""
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    plt.close(figure)
    return rgb


@_whole
def log_image(figure: Any, key: str, *, step: int) -> None:
    """Log a matplotlib figure (or an image array) as the stepped image ``key`` at ``step``: the run page's
    image panel then shows one card per key with a step slider."""
    if not distributed.is_main():  # another rank of a launched run: nothing to draw or log
        if not hasattr(figure, "shape"):
            import matplotlib.pyplot as plt

            plt.close(figure)
        return
    image = figure if hasattr(figure, "shape") else figure_array(figure)
    mlflow.log_image(image, key=key, step=step)


@_main_only
@_whole
def log_text(text: str, artifact_file: str) -> None:
    mlflow.log_text(text, artifact_file)


def source_uri(source: str | Path) -> str:
    """A dataset source as an absolute URI: local paths become ``file:///abs/path``, URIs pass through."""
    text = str(source)
    return text if "://" in text else Path(text).resolve().as_uri()


@_main_only
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
        dataset = mlflow.data.from_pandas(frame, source=source_uri(source), name=name)
    ids = ",".join(c.case_id for c in cases)
    ids = ids if len(ids) <= 500 else ids[:496] + ",..."
    log_input(dataset, context=context, tags={"n_cases": str(len(cases)), "case_ids": ids})
    mlflow.log_text(json.dumps([c.to_dict() for c in cases], indent=2), f"datasets/{context}_{name}.json")


#: Words of the error a store raises when another process inserted the same dataset row first.
_DUPLICATE_ROW = ("UNIQUE constraint failed", "IntegrityError", "duplicate key value", "Duplicate entry")


@_whole
def log_input(dataset: Any, *, context: str, tags: Mapping[str, str], attempts: int = 5) -> None:
    """``mlflow.log_input`` that processes logging the same dataset at the same time all survive.

    MLflow's SQL store looks the dataset up (experiment, name, digest) and inserts it when missing, in one
    transaction that does not lock the table: two processes may both miss it and the second insert fails with
    ``UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest``. Beside a SQLite store
    the call holds the store's file lock (:func:`stego_core.runtime.faults.store_lock`), so such processes take turns;
    on any store a duplicate-row error is retried, and the retry finds and reuses the row the other process
    wrote. The dataset is stored once.
    """
    for attempt in range(1, attempts + 1):
        try:
            with faults.store_lock(tracking_uri()):
                mlflow.log_input(dataset, context=context, tags=dict(tags))
            return
        except MlflowException as exc:
            if attempt == attempts or not any(word in str(exc) for word in _DUPLICATE_ROW):
                raise
            log.info("dataset %s was being logged by another process; retrying (%s)", dataset.name,
                     str(exc).splitlines()[0][:200])
            time.sleep(0.05 * attempt)


def download_artifacts(uri: str, dst: str | Path | None = None) -> Path:
    """Download artifacts at ``uri`` (e.g. ``runs:/<id>/checkpoints``) to ``dst`` and return the local path."""
    _ensure_tracking()
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst) if dst else None))


@_main_only
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

    # MLflow warns on every pickled model that pt2 is the safe format: pickle is this function's documented
    # choice (above), so the warning is left out of the demo's log for the project's own models
    quiet = _DropMessage("Saving pytorch model by Pickle") if serialization_format == "pickle" else None
    logger = logging.getLogger("mlflow.pytorch")
    if quiet:
        logger.addFilter(quiet)
    try:
        mlflow.pytorch.log_model(model, name=name, input_example=input_example, metadata=dict(metadata or {}),
                                 code_paths=code_paths, serialization_format=serialization_format,
                                 pip_requirements=pinned_requirements())
    finally:
        if quiet:
            logger.removeFilter(quiet)
    return f"runs:/{active_run_id()}/{name}"


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


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
    """Load a model logged by :func:`log_pytorch_model` (``runs:/...`` or ``models:/...``); the downloaded copy
    is removed once loaded (nothing is left in the temporary folder)."""
    import tempfile

    import mlflow.pytorch

    _ensure_tracking()
    with tempfile.TemporaryDirectory(prefix="stego-model-") as tmp:
        return mlflow.pytorch.load_model(model_uri, dst_path=tmp, map_location=map_location)


def run_of_model(model_uri: str) -> str | None:
    """The run id that logged ``model_uri`` when it can be told: ``runs:/<id>/...``, or (asking the tracking
    server) ``models:/<name>/<version>`` and ``models:/<model_id>``."""
    m = re.match(r"runs:/([0-9a-f]+)/", model_uri)
    if m:
        return m.group(1)
    m = re.fullmatch(r"models:/([^/@]+)(?:/([^/]+)|@([^/]+))?", model_uri)
    if not m:
        return None
    with contextlib.suppress(Exception):
        name, version, alias = m.groups()
        c = client()
        if version:
            return c.get_model_version(name, version).run_id
        if alias:
            return c.get_model_version_by_alias(name, alias).run_id
        return c.get_logged_model(name).source_run_id
    return None


@_main_only
@_whole
def register_model(model_uri: str, name: str, *, tags: Mapping[str, Any] | None = None,
                   description: str | None = None) -> str:
    """Register ``model_uri`` in the model registry as a new version of ``name`` (created if missing), with
    ``tags`` (e.g. the validation metrics) on the version; returns ``models:/<name>/<version>``."""
    c = client()
    version = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
    if description:
        c.update_model_version(name, version.version, description=description)
    return f"models:/{name}/{version.version}"


def client() -> MlflowClient:
    _ensure_tracking()
    return MlflowClient(tracking_uri=tracking_uri())


# ------------------------------------------------------------------------------- learned methods' states


class RunMonitor:
    """A method's :class:`~stego_core.methods.registry.Monitor` that writes into the active run (rank 0 only)."""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        log_metrics(values, step=step)

    def image(self, figure: Any, key: str, step: int) -> None:
        log_image(figure, key, step=step)

    def tags(self, tags: Mapping[str, str]) -> None:
        set_tags(tags)


#: Metadata keys of a logged learned model: the registered method that saved it and its resolved settings.
METHOD_KEY, SETTINGS_KEY = "stego_method", "stego_settings"


def is_run_id(text: str) -> bool:
    """Whether ``text`` is a bare MLflow run id (32 hex digits)."""
    return re.fullmatch(r"[0-9a-f]{32}", text or "") is not None


def resolve_model_uri(model_uri: str) -> str:
    """Accept a bare run id as ``runs:/<id>/model``; other URIs (``runs:/``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``) and local model folders pass through.

    >>> resolve_model_uri("0123456789abcdef0123456789abcdef")
    'runs:/0123456789abcdef0123456789abcdef/model'
    """
    return f"runs:/{model_uri}/model" if is_run_id(model_uri) else model_uri


@_main_only
def log_learned(method: str, settings: Any, state: Any, *, name: str = "model") -> str:
    """Log a learned method's state (a ``torch.nn.Module``) as the run's MLflow model ``name``, with the method's
    name and whole resolved settings in the model's metadata: what :func:`load_learned` rebuilds it from (no
    preset file is read again). Returns ``runs:/<id>/<name>``."""
    import dataclasses

    from stego_core.config import to_dict

    plain = to_dict(settings) if dataclasses.is_dataclass(settings) else dict(settings)
    return log_pytorch_model(state.cpu() if hasattr(state, "cpu") else state, name=name,
                             metadata={METHOD_KEY: method, SETTINGS_KEY: json.dumps(plain)})


def _model_metadata(model_uri: str) -> dict[str, Any]:
    """The metadata of the model at ``model_uri``, read from its ``MLmodel`` file downloaded into a temporary
    folder that is removed (``Model.load`` of a URI leaves its copy in ``$TMPDIR``)."""
    import tempfile

    from mlflow.models import Model
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

    _ensure_tracking()
    try:
        where = model_uri.rstrip("/")
        if ModelsArtifactRepository._is_logged_model_uri(where):  # models:/<model id>, as Model.load reads it
            where = ModelsArtifactRepository.get_underlying_uri(where)
        with tempfile.TemporaryDirectory(prefix="stego-model-") as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=f"{where}/MLmodel", dst_path=tmp)
            return dict(Model.load(local).metadata or {})
    except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing model
        text = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ValueError(f"model_uri={model_uri!r}: no model there ({type(exc).__name__}: {text})") from None


def learned_method_of(model_uri: str) -> str:
    """The registered method that saved the model at ``model_uri`` (a run id, ``runs:/``, ``models:/``); models
    logged before methods were recorded are STEGO's."""
    meta = _model_metadata(resolve_model_uri(model_uri))
    return str(meta.get(METHOD_KEY) or meta.get("method") or "stego")


def load_learned(model_uri: str) -> Any:
    """A learned method's saved state: ``LearnedState(method, settings, state)`` from the model at
    ``model_uri`` (a run id, ``runs:/<id>/model``, ``models:/<name>/<version>``). Warns when the run that logged
    it was deleted."""
    from stego_core.methods.registry import LearnedState

    uri = resolve_model_uri(model_uri)
    meta = _model_metadata(uri)
    run = run_of_model(uri)
    if run:
        with contextlib.suppress(Exception):
            if client().get_run(run).info.lifecycle_stage == "deleted":
                log.warning("model_uri=%s: the run %s that logged it is deleted (its model still loads)", model_uri,
                            run)
    state = load_pytorch_model(uri)
    method = str(meta.get(METHOD_KEY) or meta.get("method") or "stego")
    settings = json.loads(meta[SETTINGS_KEY]) if SETTINGS_KEY in meta else {}
    if method == "stego" and SETTINGS_KEY not in meta:  # a model logged before methods were recorded
        settings = {"slicing": {"patch_size": int(meta.get("patch_size", getattr(state, "patch_size", 32))),
                                "axis": int(meta.get("axis", 2))}}
    return LearnedState(method=method, settings=settings, state=state, source=model_uri)
