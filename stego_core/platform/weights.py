"""Pretrained backbone weights logged by a ``pretrain`` run, fetched as a local file (MLflow's side of
:func:`stego_core.features.backbones.build_backbone`, which reads files only)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from stego_core.features.vit import (
    DEFAULT_WEIGHTS_CACHE,
    WEIGHTS_ARTIFACT,
    WEIGHTS_CACHE_ENV,
)
from stego_core.platform import tracking

__all__ = ["fetch_weights", "weights_cache_dir"]


def weights_cache_dir() -> Path:
    """The folder ``runs:/`` weights are downloaded into: ``$STEGO_WEIGHTS_CACHE``, else
    :data:`DEFAULT_WEIGHTS_CACHE`. One sub-folder per run id; delete it freely (files come back on demand)."""
    return Path(os.environ.get(WEIGHTS_CACHE_ENV) or DEFAULT_WEIGHTS_CACHE)


def fetch_weights(weights: str | Path, backbone: str | None = None) -> str | Path:
    """Turn ``runs:/<pretrain run id>[/<artifact path>]`` into a local weights file; anything else unchanged.

    The one place where run ids become weight files (``train`` calls it before :func:`build_backbone`). The
    artifact (default :data:`WEIGHTS_ARTIFACT`) is downloaded once into :func:`weights_cache_dir` under
    ``<run id>/<end time of the run>/`` and reused while the run is unchanged (a resumed run's new weights
    replace the old copy); a download is written to a temporary sibling and renamed into place, so a killed
    process leaves no half file there. Checks the file's recorded backbone against ``backbone`` when given.

    Raises
    ------
    ValueError
        No such run in the tracking store, the run has no such artifact, or it was pretrained for another
        backbone.
    """
    if not isinstance(weights, str) or not weights.startswith("runs:/"):
        return weights
    run_id, _, artifact = weights[len("runs:/"):].strip("/").partition("/")
    artifact = artifact or WEIGHTS_ARTIFACT
    where = f"the tracking store {tracking.mask_secrets(tracking.tracking_uri())}"
    try:
        run = tracking.client().get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow says RESOURCE_DOES_NOT_EXIST in several ways
        raise ValueError(f"model.weights={weights!r}: cannot fetch weights, there is no run {run_id!r} in "
                         f"{where}") from None
    folder = weights_cache_dir() / run_id / str(run.info.end_time or run.info.start_time or 0)
    local = folder / artifact
    if not local.exists():
        try:
            _download_into(folder, run_id, artifact)
        except Exception as exc:  # noqa: BLE001 - re-raised with what to do
            text = (str(exc).strip().splitlines() or [""])[0][:300]
            raise ValueError(f"model.weights={weights!r}: cannot fetch artifact {artifact!r} of run {run_id!r} "
                             f"({type(exc).__name__}: {text}); is it a `pretrain` run of {where}?") from None
    if backbone is not None and local.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(local), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("backbone") and meta["backbone"] != backbone:
            raise ValueError(f"model.weights={weights!r} holds a pretrained {meta['backbone']!r} (patch "
                             f"{meta.get('vit_patch', meta.get('patch_size'))}, dim {meta.get('embed_dim')}) but model.backbone="
                             f"{backbone!r}; use model.backbone={meta['backbone']}")
    return str(local)


def _download_into(folder: Path, run_id: str, artifact: str) -> None:
    """Download ``runs:/<run_id>/<artifact>`` to ``folder / artifact`` through a temporary sibling folder, then
    remove the copies of older versions of the run."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        got = tracking.download_artifacts(f"runs:/{run_id}/{artifact}", tmp)
        target = folder / artifact
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(got, target)
        except OSError:  # another process put the same artifact there first (a folder cannot be replaced)
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in folder.parent.iterdir():
        if old.name != folder.name and not old.name.startswith("."):
            shutil.rmtree(old, ignore_errors=True)


