"""The ``train`` step: STEGO trained with Lightning on cached backbone features (or on features computed in the
training step, ``train.features=online``), as one MLflow run.

:func:`run_train` is the wiring, read top to bottom: the backbone (missing weights fail first) -> a
:class:`~stego_core.methods.stego.datamodule.StegoDataModule` (crops, cached features, kNN, validation data) ->
:class:`~stego_core.methods.stego.module.StegoModule` (step logic only) trained by a Lightning ``Trainer`` whose MLflow logger
writes the training curves into the run -> cluster-to-vessel mapping (:mod:`stego_core.methods.stego.mapping`) -> a
:class:`~stego_core.methods.stego.inference.StegoSegmenterModel` logged as an MLflow model.

Every ``train.val_every_n_steps`` the :class:`VolumeValidation` callback reconstructs a held-out volume from
cached features with the engine's one sliding window and logs (through :mod:`stego_core.platform.tracking`) its Dice /
clDice, crop-level cluster and linear-probe mIoU / accuracy, and two stepped images (``val/crops``: a slice panel,
``val/volume_mip``: the volume's MIP with an error overlay) that the run page shows with a step slider. It also
hands ``val/*`` to Lightning, whose ``ModelCheckpoint`` keeps the ``train.save_top_k`` best checkpoints by
``val/cldice`` plus ``last.ckpt``. The last validation is logged again as ``val_final/*`` (sorting after the
curves); ``register=true`` registers the model as a version of ``model_name`` with those values as tags.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from stego_core.runtime import distributed, faults

from stego_core.platform import tracking
from stego_core.features.backbones import build_backbone, resolve_weights
from stego_core.config import LABEL_FREE_RULES, TrainConfig
from stego_core.methods.stego.datamodule import StegoDataModule, ValidationData
from stego_core.methods.stego.inference import StegoSegmenterModel
from stego_core.methods.stego.mapping import (binary_iou_accuracy, choose_mapping_rule, cluster_maps, fit_vessel_mapping,
                                refit_centroids)
from stego_core.evaluation.metrics import METRIC_KEYS
from stego_core.methods.stego.module import StegoModule
from stego_core.engine.reconstruction import sliding_window
from stego_core.evaluation.scoring import evaluate_case
from stego_core.methods.stego.model import ClusterProbe, LinearProbe, StegoHead

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    run_id: str
    model_uri: str | None
    metrics: dict[str, float]
    mapping_rule: str
    output_dir: Path
    #: the last validation's vessel probabilities (I, J, K) of the held-out volume (None without one): what
    #: post-processing (e.g. the CRF) of that reconstruction starts from without reconstructing again
    val_probabilities: np.ndarray | None = None


class VolumeValidation(L.Callback):
    """Every ``every_n_steps`` (and at the end): map clusters, score held-out crops, reconstruct a volume.

    ``report(step, metrics)`` is called after each validation (the sweep uses it for pruning; it may raise).
    """

    def __init__(self, make_model: Callable[[], StegoSegmenterModel], val: ValidationData, *, every_n_steps: int,
                 max_steps: int, report: Callable[[int, dict[str, float]], None] | None = None) -> None:
        self.make_model = make_model
        self.val = val
        self.every = every_n_steps
        self.max_steps = max_steps
        self.report = report
        self.last: dict[str, float] = {}
        self.last_model: StegoSegmenterModel | None = None
        self.last_probabilities: np.ndarray | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Step 0, before the first update (not on a resume): the curves start from the untrained head, and the
        # stepped images exist at step 0, where MLflow's image cards open. Not reported to a sweep's pruner.
        if trainer.global_step == 0:
            self.validate(trainer, pl_module, 0, report=False)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step >= self.max_steps:
            self.validate(trainer, pl_module, step)

    def validate(self, trainer: L.Trainer, pl_module: StegoModule, step: int, *, report: bool = True
                 ) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        model = self.make_model()  # maps clusters to vessel once per validation
        metrics, prob = validation_metrics(pl_module, model, self.val, return_probabilities=True)
        tracking.log_metrics(metrics, step=step)
        # Exposed to Lightning, so ModelCheckpoint(monitor="val/cldice") keeps the best checkpoints.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.val.features is not None and len(self.val.features):
            tracking.log_image(validation_figure(pl_module, model, self.val), "val/crops",
                               step=step)
        if prob is not None and self.val.volume is not None:
            tracking.log_image(validation_mip_figure(prob > model.threshold, self.val, step), "val/volume_mip",
                               step=step)
        loss = trainer.callback_metrics.get("loss")
        log.info("step %d/%d%s: %s", step, self.max_steps, f" loss {float(loss):.4f}" if loss is not None else "",
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in VAL_LOG_KEYS))
        pl_module.train(was_training)
        self.last, self.last_model, self.last_probabilities = metrics, model, prob
        if report and self.report is not None:
            self.report(step, metrics)
        return metrics


class ExceptionCheckpoint(L.pytorch.callbacks.OnExceptionCheckpoint):
    """Lightning's ``OnExceptionCheckpoint`` (``<dirpath>/<filename>.ckpt`` when ``fit`` raises) without its
    barrier: the exception is this rank's alone (its failure, or a signal to this process) and the other ranks
    may be waiting in a collective of the training step, so waiting for them would hang the job until the process
    group's timeout. Rank 0 writes the checkpoint (every DDP rank holds the same weights), the others nothing.
    """

    def on_exception(self, trainer: L.Trainer, *_: Any, **__: Any) -> None:
        if trainer.is_global_zero:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)  # no collective
            trainer.strategy.save_checkpoint(checkpoint, self.ckpt_path)


class RankSignals(L.Callback):
    """Under DDP, SIGTERM handled by this rank alone: the handler in force when the callback was made
    (:func:`stego_core.runtime.faults.handle_signals`: :class:`~stego_core.runtime.faults.Interrupted`) replaces Lightning's once
    training starts. Lightning's handler broadcasts from rank 0 inside the handler, which a signal to another rank
    turns into a collective no other rank joins: the job hangs until the process group's timeout.
    """

    def __init__(self) -> None:
        self.handler = signal.getsignal(signal.SIGTERM)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if (trainer.world_size > 1 and callable(self.handler)
                and threading.current_thread() is threading.main_thread()):
            signal.signal(signal.SIGTERM, self.handler)


@torch.no_grad()
def reconstruct_from_features(model: StegoSegmenterModel, val: ValidationData, *, batch_size: int = 256
                              ) -> np.ndarray:
    """Vessel probabilities (I, J, K) of the validation volume from its cached crop features, through the
    engine's :func:`~stego_core.engine.reconstruction.sliding_window` (Gaussian blending)."""
    assert val.volume is not None and val.volume_features is not None and val.volume_index is not None
    device = next(model.head.parameters()).device
    features = val.volume_features

    def predict(batch: slice) -> np.ndarray:
        f = torch.from_numpy(np.asarray(features[batch], dtype=np.float32)).to(device)
        return model.probabilities_from_features(f, val.patch_size)[:, 0].cpu().numpy()

    return sliding_window(val.volume.image.shape, val.volume_index, predict, axis=val.axis,
                          patch_size=val.patch_size, blend="gaussian", batch_size=batch_size,
                          brain_mask=val.volume.brain_mask)


VAL_LOG_KEYS = ("val/dice", "val/cldice", "val/cluster_miou", "val/predicted_fraction")


def validation_metrics(module: StegoModule, model: StegoSegmenterModel, val: ValidationData, *,
                       return_probabilities: bool = False) -> Any:
    """Crop-level cluster / linear-probe mIoU and accuracy, and Dice etc. of the reconstructed volume
    (with ``return_probabilities``: ``(metrics, vessel probabilities or None)``)."""
    metrics: dict[str, float] = {}
    prob = None
    vessel = model.vessel_clusters
    if val.features is not None and val.labels is not None and len(val.features):
        ids, linear = cluster_maps(module, val.features, val.patch_size, probe=model.cluster_probe)
        pred = vessel.cpu().numpy()[ids]
        for k, v in binary_iou_accuracy(pred, val.labels).items():
            metrics[f"val/cluster_{k}"] = v
        for k, v in binary_iou_accuracy(linear, val.labels).items():
            metrics[f"val/linear_{k}"] = v
    if val.volume is not None and val.volume_features is not None:
        prob = reconstruct_from_features(model, val)
        _, row = evaluate_case(prob, val.volume, threshold=model.threshold)
        metrics["val/predicted_fraction"] = row["predicted_fraction"]
        metrics.update({f"val/{k}": float(row[k]) for k in METRIC_KEYS if k in row})
    return (metrics, prob) if return_probabilities else metrics


def validation_mip_figure(pred: np.ndarray, val: ValidationData, step: int) -> Any:
    """The validation volume's MIP with the prediction and its errors against the label (as in evaluation)."""
    from stego_core.report.visualize import mip_figure

    assert val.volume is not None
    return mip_figure(val.volume.image, val.volume.label, pred, axis=val.axis,
                      title=f"validation volume at step {step}")


def validation_figure(module: StegoModule, model: StegoSegmenterModel, val: ValidationData, n: int = 8) -> Any:
    from stego_core.report.visualize import slice_panel_figure

    assert val.features is not None and val.crops is not None
    pick = pick_informative(val.labels, val.crops, n)
    ids, _ = cluster_maps(module, val.features[pick], val.patch_size, probe=model.cluster_probe)
    pred = model.vessel_clusters.cpu().numpy()[ids]
    labels = val.labels[pick] if val.labels is not None else None
    return slice_panel_figure(val.crops[pick], labels, ids, pred, n=n)


def pick_informative(labels: np.ndarray | None, crops: np.ndarray, n: int) -> np.ndarray:
    """Indices of up to ``n`` crops to show: those with the most vessel (or the brightest), spread out."""
    score = labels.reshape(len(labels), -1).mean(1) if labels is not None else crops.reshape(len(crops), -1).max(1)
    order = np.argsort(-score, kind="stable")[: max(n * 4, n)]
    return np.sort(order[np.linspace(0, len(order) - 1, num=min(n, len(order))).astype(int)])


# --------------------------------------------------------------------------------------------- wiring


def _device(accelerator: str) -> str:
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


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

    Launched as several processes (``trainer.devices`` x ``trainer.num_nodes``, :class:`TrainerSettings`), each
    trains on ``train.batch_size`` crops of every global batch with DDP; rank 0 logs and writes."""
    distributed.init_from_env(devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    device = _device(cfg.train.accelerator)
    description = (f"STEGO training: {cfg.model.backbone} backbone, {cfg.model.n_clusters} clusters, "
                   f"{cfg.train.max_steps} steps on {Path(cfg.data.root).name}; curves val/*, stepped images "
                   f"val/crops and val/volume_mip, checkpoints/, model `model`.")
    with tracking.start_run(cfg.experiment, run_name=run_name or f"stego-{cfg.model.backbone}", nested=nested,
                            description=description, log_system_metrics=cfg.train.system_metrics,
                            output_root=cfg.output, tags={"method": "stego", "step": "train",
                                                          "backbone": cfg.model.backbone, **(tags or {})}) as run:
        tracking.log_plan(cfg, run.output_dir)
        L.seed_everything(cfg.train.seed, workers=True, verbose=False)
        # The backbone first: missing weights fail within seconds, before any data is touched.
        weights = resolve_weights(cfg.model.weights, cfg.model.backbone)  # runs:/<pretrain run> -> file
        if weights != cfg.model.weights:
            tracking.set_tags({"pretrain_run_id": cfg.model.weights[len("runs:/"):].split("/")[0]})
        backbone = build_backbone(cfg.model.backbone, weights=weights, res=cfg.model.res,
                                  standardize=cfg.model.classical_standardize)

        data = StegoDataModule(cfg, backbone, device=device)
        with distributed.main_first():  # rank 0 generates phantoms and writes the feature cache, the others read
            data.setup("fit")
        tracking.log_dataset(data.train_cases, name=Path(cfg.data.root).name, context="training",
                             source=cfg.data.root)
        tracking.log_dataset(data.test_cases, name=Path(cfg.data.root).name + "-val", context="validation",
                             source=cfg.data.root)
        tracking.set_tags({"weights_id": backbone.weights_id, "device": device,
                           "sampling": cfg.sampling.method,
                           "n_train_crops": f"{len(data.train_set)} of {data.n_candidate_crops}",
                           "feature_cache_bytes_per_crop": str(data.cache_bytes_per_crop),
                           "feature_cache_mb": "0 (train.features=online)" if data.online else
                           f"{len(data.train_set) * data.cache_bytes_per_crop / 1e6:.1f}"})
        rule = choose_mapping_rule(cfg.model.cluster_rule, labels_available=data.train_set.labels is not None,
                                   overlaps_evaluation=data.overlap)

        head = StegoHead(backbone.feature_dim, cfg.model.code_dim, dropout=cfg.model.dropout)
        module = StegoModule(head, ClusterProbe(cfg.model.code_dim, cfg.model.n_clusters),
                             LinearProbe(cfg.model.code_dim, 2), cfg.loss, lr_head=cfg.train.lr_head,
                             lr_cluster=cfg.train.lr_cluster, lr_linear=cfg.train.lr_linear, seed=cfg.train.seed,
                             backbone=backbone if data.online else None, feature_amp=cfg.train.feature_amp)
        map_features, map_crops, map_labels = data.mapping_data(with_labels=rule not in LABEL_FREE_RULES)
        if rule not in LABEL_FREE_RULES and (map_labels is None or not np.any(map_labels)):
            # all-empty labels would map every cluster to background: a model that predicts nothing
            log.warning("model.cluster_rule=%r: the training labels are all empty; falling back to the "
                        "unsupervised 'brightness' rule", rule)
            tracking.set_tags({"label_empty": "true", "cluster_rule_fallback": f"{rule}->brightness"})
            rule = "brightness"
        preprocessing = {"skull_strip": cfg.data.skull_strip, "standardize": cfg.data.standardize,
                         "axis": cfg.slicing.axis}

        def make_model() -> StegoSegmenterModel:
            probe = module.cluster_probe
            if cfg.model.cluster_fit == "kmeans":  # centroids re-fitted to the current codes at every mapping
                probe = refit_centroids(module, map_features, cfg.model.n_clusters, seed=cfg.train.seed)
            vessel, name = fit_vessel_mapping(module, map_features, map_crops, map_labels, rule,
                                              cfg.model.n_clusters, probe=probe,
                                              bright_quantile=cfg.model.bright_quantile)
            return StegoSegmenterModel(backbone, module.head, probe, vessel,
                                       patch_size=cfg.slicing.patch_size, threshold=cfg.model.threshold,
                                       alpha=cfg.model.alpha,
                                       mapping_rule=name, preprocessing=preprocessing)

        validation = VolumeValidation(make_model, data.val, every_n_steps=cfg.train.val_every_n_steps,
                                      max_steps=cfg.train.max_steps, report=report)
        # The best checkpoints by validation clDice (the callback exposes val/* to Lightning) plus last.ckpt.
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=run.output_dir / "checkpoints", save_last=True,
                                                          every_n_train_steps=cfg.train.val_every_n_steps,
                                                          monitor="val/cldice", mode="max",
                                                          save_top_k=cfg.train.save_top_k,
                                                          filename="best-step{step:06d}",
                                                          auto_insert_metric_name=False)
        # SIGTERM / SIGINT (faults.Interrupted) save checkpoints/interrupted.ckpt: train.resume_from=<this run id>
        on_interrupt = ExceptionCheckpoint(run.output_dir / "checkpoints", "interrupted")
        trainer = L.Trainer(max_steps=cfg.train.max_steps, max_epochs=-1,
                            accelerator="gpu" if device == "cuda" else "cpu", devices=cfg.trainer.devices,
                            num_nodes=cfg.trainer.num_nodes, strategy=cfg.trainer.lightning_strategy(),
                            use_distributed_sampler=False,  # the datamodule shards the global batches itself
                            precision="32-true" if cfg.trainer.precision == "auto" else cfg.trainer.precision,
                            logger=tracking.lightning_logger(run.run_id, cfg.experiment),
                            callbacks=[validation, checkpoints, on_interrupt, RankSignals()],
                            log_every_n_steps=cfg.train.log_every_n_steps,
                            enable_progress_bar=cfg.train.progress and sys.stderr.isatty(),
                            enable_model_summary=False,
                            num_sanity_val_steps=0, deterministic=device == "cpu", default_root_dir=run.output_dir)
        resume = resume_checkpoint(cfg.train.resume_from, run.output_dir / "resume")
        if resume is not None:
            tracking.set_tags({"resumed_from": cfg.train.resume_from})
        try:
            trainer.fit(module, datamodule=data, ckpt_path=resume)
        except faults.Interrupted:
            if (run.output_dir / "checkpoints").is_dir():  # none when the signal came before any was written
                tracking.log_artifact(run.output_dir / "checkpoints", "checkpoints")
                tracking.set_tags({"resume_with": f"train.resume_from={run.run_id}"})
            raise
        # last.ckpt is the final state, whatever step the last periodic checkpoint fell on
        trainer.save_checkpoint(run.output_dir / "checkpoints" / "last.ckpt")

        module.eval()
        if validation.last_model is None:  # the callback validates at max_steps; this only guards odd stops
            validation.validate(trainer, module, trainer.global_step)
        final, model = validation.last, validation.last_model.cpu()
        tracking.set_tags({"cluster_mapping_rule": model.mapping_rule,
                           "vessel_clusters": ",".join(str(i) for i in np.flatnonzero(model.vessel_clusters))})
        # Summary values named to sort after the curves (train/*, val/*) in the run's charts and columns.
        tracking.log_metrics({k.replace("val/", "val_final/"): v for k, v in final.items()})
        best = {Path(k).name: float(v) for k, v in checkpoints.best_k_models.items()}
        if distributed.is_main():
            (run.output_dir / "checkpoints" / "best_k.json").write_text(json.dumps(
                {"monitor": "val/cldice", "best_k": best, "best": Path(checkpoints.best_model_path).name or None},
                indent=2))
        tracking.log_artifact(run.output_dir / "checkpoints", "checkpoints")
        model_uri = None
        if cfg.log_model:
            example = np.zeros((1, 1, cfg.slicing.patch_size, cfg.slicing.patch_size), dtype=np.float32)
            model_uri = tracking.log_pytorch_model(model, name="model", input_example=example, metadata={
                "patch_size": cfg.slicing.patch_size, "axis": cfg.slicing.axis, "backbone": cfg.model.backbone,
                "weights_id": backbone.weights_id, "mapping_rule": model.mapping_rule,
                "skull_strip": cfg.data.skull_strip, "standardize": cfg.data.standardize})
            if cfg.register and model_uri is not None:  # None on ranks other than 0
                model_uri = tracking.register_model(
                    model_uri, cfg.model_name, tags={**{k.replace("val/", ""): f"{v:.4f}" for k, v in final.items()},
                                                     "backbone": cfg.model.backbone, "train_run_id": run.run_id},
                    description=f"STEGO {cfg.model.backbone}, {cfg.train.max_steps} steps, training run {run.run_id}")
                tracking.set_tags({"registered_model": model_uri})
        return TrainResult(run_id=run.run_id, model_uri=model_uri, metrics=final, mapping_rule=model.mapping_rule,
                           output_dir=run.output_dir, val_probabilities=validation.last_probabilities)

