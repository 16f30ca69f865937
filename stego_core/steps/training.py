"""The ``train`` step: the ``stego`` method's ``fit`` as one MLflow run, its model logged.

:func:`run_train` is the wiring, read top to bottom: open the run and log the plan -> the split's volumes
(training, and held-out for the curves) as dataset inputs -> ``build_method("stego", ...).fit(train, held_out)``
(:mod:`stego_core.methods.stego`: backbone, crops and cached features, Lightning, cluster mapping; curves,
stepped images ``val/crops`` and ``val/volume_mip`` and tags come back through the run's monitor) ->
``checkpoints/`` (the ``train.save_top_k`` best by ``val/cldice``, ``last.ckpt``, ``best_k.json``) -> the trained
model logged with its resolved settings (``reconstruct model_uri=<this run>``), registered with ``register``.
A SIGTERM / SIGINT saves ``checkpoints/interrupted.ckpt``: ``train.resume_from=<this run id>`` continues.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stego_core.data.cases import ensure_cases, preprocess_case, split_cases
from stego_core.methods import build_method
from stego_core.methods.stego.settings import StegoSettings
from stego_core.platform import tracking
from stego_core.runtime import distributed, faults
from stego_core.steps.base import DataSettings, RunSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig(StegoSettings, DataSettings, RunSettings):
    """The ``train`` entry point: the ``stego`` method's settings (:class:`StegoSettings`) trained on the crops of
    ``data``. ``log_model``: log the trained model; ``register``: also register it as a new version of
    ``model_name`` (model registry)."""

    log_model: bool = True
    register: bool = False
    model_name: str = "stego-segmenter"
    output: str = "outputs/train"

    def stego_settings(self) -> StegoSettings:
        """The method's own settings (what its logged model carries)."""
        return StegoSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(StegoSettings)})


@dataclass
class TrainResult:
    run_id: str
    model_uri: str | None
    metrics: dict[str, float]
    mapping_rule: str
    output_dir: Path


class _Reporting(tracking.RunMonitor):
    """The run's monitor, also handing each validation's metrics to ``report`` (a sweep's pruner)."""

    def __init__(self, report: Callable[[int, dict[str, float]], None] | None) -> None:
        self._report = report
        self.last: dict[str, float] = {}

    def metrics(self, values: Any, step: int | None = None) -> None:
        super().metrics(values, step)
        if any(k.startswith("val_final/") for k in values):
            self.last = {k.replace("val_final/", "val/"): float(v) for k, v in values.items()}

    def report(self, step: int, metrics: dict[str, float]) -> None:
        if self._report is not None:
            self._report(step, metrics)


def resume_checkpoint(resume_from: str, scratch: Path) -> str | None:
    """The checkpoint file that ``train.resume_from`` names: a ``.ckpt`` path, or a train run id whose logged
    ``checkpoints/interrupted.ckpt`` (else ``last.ckpt``) is downloaded into ``scratch``; ``None`` for ""."""
    if not resume_from:
        return None
    if Path(resume_from).is_file():
        return str(resume_from)
    try:
        folder = tracking.download_artifacts(f"runs:/{resume_from}/checkpoints", scratch)
    except Exception as exc:
        raise ValueError(f"train.resume_from={resume_from!r} is neither a checkpoint file nor a run with logged "
                         f"checkpoints ({type(exc).__name__})") from None
    for name in ("interrupted.ckpt", "last.ckpt"):
        if (folder / name).is_file():
            return str(folder / name)
    raise ValueError(f"train.resume_from={resume_from!r}: run has no checkpoints/interrupted.ckpt or last.ckpt")


def run_train(cfg: TrainConfig, *, report: Callable[[int, dict[str, float]], None] | None = None,
              nested: bool = False, run_name: str | None = None, tags: dict[str, str] | None = None
              ) -> TrainResult:
    """Train STEGO as one MLflow run; returns the run id, the logged model's URI and the final val metrics.

    Launched as several processes (``trainer.devices`` x ``trainer.num_nodes``), each trains on
    ``train.batch_size`` crops of every global batch with DDP; rank 0 logs and writes."""
    from stego_core.steps.evaluation import build_context

    distributed.init_from_env(devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    description = (f"STEGO training: {cfg.model.backbone} backbone, {cfg.model.n_clusters} clusters, "
                   f"{cfg.train.max_steps} steps on {Path(cfg.data.root).name}; curves val/*, stepped images "
                   f"val/crops and val/volume_mip, checkpoints/, model `model`.")
    with tracking.start_run(cfg.experiment, run_name=run_name or f"stego-{cfg.model.backbone}", nested=nested,
                            description=description, log_system_metrics=cfg.train.system_metrics,
                            output_root=cfg.output, tags={"method": "stego", "step": "train",
                                                          "backbone": cfg.model.backbone, **(tags or {})}) as run:
        tracking.log_plan(cfg, run.output_dir)
        settings = cfg.stego_settings()
        resume = resume_checkpoint(cfg.train.resume_from, run.output_dir / "resume")
        if resume is not None:
            tracking.set_tags({"resumed_from": cfg.train.resume_from})
            settings = dataclasses.replace(settings, train=dataclasses.replace(settings.train, resume_from=resume))
        if cfg.model.weights.startswith("runs:/"):
            tracking.set_tags({"pretrain_run_id": cfg.model.weights[len("runs:/"):].split("/")[0]})
        monitor = _Reporting(report)
        method = build_method("stego", settings, build_context(_evaluate_view(cfg), monitor, run.output_dir))
        method.setup()  # the backbone first: missing weights fail within seconds, before any data is touched
        with distributed.main_first():  # rank 0 generates phantoms, the others read them
            cases = ensure_cases(cfg.data)
        train, held_out = split_cases(cases, cfg.test_fraction, seed=cfg.split_seed, test_ids=cfg.test_cases)
        source = cfg.data.root
        tracking.log_dataset(train, name=Path(source).name, context="training", source=source)
        tracking.log_dataset(held_out, name=Path(source).name + "-val", context="validation", source=source)
        prepared = [preprocess_case(c, cfg.data) for c in train]
        validation = [preprocess_case(c, cfg.data) for c in held_out]
        checkpoints = run.output_dir / "checkpoints"
        try:
            method.fit(prepared, validation)
        except faults.Interrupted:
            if checkpoints.is_dir():  # none when the signal came before any was written
                tracking.log_artifact(checkpoints, "checkpoints")
                tracking.set_tags({"resume_with": f"train.resume_from={run.run_id}"})
            raise
        tracking.log_artifact(checkpoints, "checkpoints")
        model = method.state()
        model_uri = None
        if cfg.log_model:
            model_uri = tracking.log_learned("stego", cfg.stego_settings(), model)
            if cfg.register and model_uri is not None:  # None on ranks other than 0
                model_uri = tracking.register_model(
                    model_uri, cfg.model_name,
                    tags={**{k.replace("val/", ""): f"{v:.4f}" for k, v in monitor.last.items()},
                          "backbone": cfg.model.backbone, "train_run_id": run.run_id},
                    description=f"STEGO {cfg.model.backbone}, {cfg.train.max_steps} steps, training run {run.run_id}")
                tracking.set_tags({"registered_model": model_uri})
        return TrainResult(run_id=run.run_id, model_uri=model_uri, metrics=monitor.last,
                           mapping_rule=model.mapping_rule, output_dir=run.output_dir)


def _evaluate_view(cfg: TrainConfig) -> Any:
    """The evaluation settings a training's method context needs (its engine: crops along the slicing axis)."""
    from stego_core.engine.reconstruction import EngineConfig
    from stego_core.steps.evaluation import EvaluateConfig

    return EvaluateConfig(data=cfg.data, engine=EngineConfig(axis=cfg.slicing.axis),
                          progress=cfg.train.progress)
