"""STEGO's training with Lightning, as a library call (no MLflow here): what the ``stego`` method's ``fit`` runs.

:func:`train_stego` reads top to bottom: crops, cached features and the kNN table of the training volumes
(:class:`~stego_core.methods.stego.datamodule.StegoDataModule`) -> :class:`~stego_core.methods.stego.module.StegoModule`
(step logic only) trained by a Lightning ``Trainer`` whose logger forwards the curves to the caller's
:class:`~stego_core.methods.registry.Monitor` -> cluster-to-vessel mapping (:mod:`stego_core.methods.stego.mapping`)
-> a :class:`~stego_core.methods.stego.inference.StegoSegmenterModel`.

Every ``train.val_every_n_steps`` the :class:`VolumeValidation` callback reconstructs a held-out volume from
cached features with the engine's one sliding window and reports its Dice / clDice, crop-level cluster and
linear-probe mIoU / accuracy, and two stepped images (``val/crops``: a slice panel, ``val/volume_mip``: the
volume's MIP with an error overlay). It also hands ``val/*`` to Lightning, whose ``ModelCheckpoint`` keeps the
``train.save_top_k`` best checkpoints by ``val/cldice`` plus ``last.ckpt`` (the model kept is the last one: the
held-out labels draw curves, they choose nothing).
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from stego_core.data.cases import PreparedCase
from stego_core.engine.reconstruction import sliding_window
from stego_core.evaluation.metrics import METRIC_KEYS
from stego_core.evaluation.scoring import evaluate_case
from stego_core.features.backbones import Backbone
from stego_core.methods.stego.datamodule import StegoDataModule, ValidationData
from stego_core.methods.stego.inference import StegoSegmenterModel
from stego_core.methods.stego.mapping import (
    LABEL_FREE_RULES,
    binary_iou_accuracy,
    choose_mapping_rule,
    cluster_maps,
    fit_vessel_mapping,
    refit_centroids,
)
from stego_core.methods.stego.model import ClusterProbe, LinearProbe, StegoHead
from stego_core.methods.stego.module import StegoModule
from stego_core.methods.stego.settings import StegoSettings
from stego_core.runtime import distributed
from stego_core.runtime.progress import PlainProgress

log = logging.getLogger(__name__)

__all__ = ["StegoFit", "train_stego", "VolumeValidation", "MonitorLogger", "validation_metrics",
           "reconstruct_from_features"]


@dataclass
class StegoFit:
    """What a training returns: the model, the last validation's metrics and probabilities, the kept
    checkpoints by validation clDice."""

    model: StegoSegmenterModel
    metrics: dict[str, float]
    best_k: dict[str, float]
    best: str | None
    #: the last validation's vessel probabilities (I, J, K) of the held-out volume (None without one)
    val_probabilities: np.ndarray | None = None


class MonitorLogger(Logger):
    """A Lightning logger that hands the training curves to a :class:`~stego_core.methods.registry.Monitor`."""

    def __init__(self, monitor: Any) -> None:
        super().__init__()
        self.monitor = monitor

    @property
    def name(self) -> str:
        return "monitor"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """The plan is logged by the step that opened the run."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.monitor.metrics({k: float(v) for k, v in metrics.items() if k != "epoch"}, step)


class VolumeValidation(L.Callback):
    """Every ``every_n_steps`` (and at the end): map clusters, score held-out crops, reconstruct a volume.

    After each validation (but the one before training) the monitor's ``report(step, metrics)`` is called when
    it has one (the sweep prunes with it; it may raise).
    """

    def __init__(self, make_model: Callable[[], StegoSegmenterModel], val: ValidationData, *, every_n_steps: int,
                 max_steps: int, monitor: Any) -> None:
        self.make_model = make_model
        self.val = val
        self.every = every_n_steps
        self.max_steps = max_steps
        self.monitor = monitor
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
        self.monitor.metrics(metrics, step)
        # Exposed to Lightning, so ModelCheckpoint(monitor="val/cldice") keeps the best checkpoints.
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if self.val.features is not None and len(self.val.features):
            self.monitor.image(validation_figure(pl_module, model, self.val), "val/crops", step)
        if prob is not None and self.val.volume is not None:
            self.monitor.image(validation_mip_figure(prob > model.threshold, self.val, step), "val/volume_mip", step)
        loss = trainer.callback_metrics.get("loss")
        log.info("step %d/%d%s: %s", step, self.max_steps, f" loss {float(loss):.4f}" if loss is not None else "",
                 ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if k in VAL_LOG_KEYS))
        pl_module.train(was_training)
        self.last, self.last_model, self.last_probabilities = metrics, model, prob
        report_to = getattr(self.monitor, "report", None)
        if report and callable(report_to):
            report_to(step, metrics)
        return metrics


class TrainProgress(L.Callback):
    """The steps as plain log lines every 20 s when the output is not a terminal (Lightning's bar shows them on
    one): :class:`stego_core.runtime.progress.PlainProgress`."""

    def __init__(self, max_steps: int, *, enabled: bool) -> None:
        self.max_steps, self.enabled = max_steps, enabled
        self.plain: PlainProgress | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.plain = PlainProgress("train", self.max_steps, log, enabled=self.enabled and trainer.is_global_zero,
                                   start=trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.plain is not None:
            loss = trainer.callback_metrics.get("loss")
            fields = {"loss": float(loss)} if loss is not None else {}
            self.plain.update(trainer.global_step, **fields)


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
    (:func:`stego_core.runtime.faults.handle_signals`: :class:`~stego_core.runtime.faults.Interrupted`) replaces
    Lightning's once training starts. Lightning's handler broadcasts from rank 0 inside the handler, which a signal
    to another rank turns into a collective no other rank joins: the job hangs until the process group's timeout.
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


def device_for(accelerator: str) -> str:
    """``cuda`` when asked for or available under ``auto``, else ``cpu``."""
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _build_module(settings: StegoSettings, backbone: Backbone, online: bool) -> StegoModule:
    model, train = settings.model, settings.train
    head = StegoHead(backbone.feature_dim, model.code_dim, dropout=model.dropout)
    return StegoModule(head, ClusterProbe(model.code_dim, model.n_clusters), LinearProbe(model.code_dim, 2),
                       settings.loss, lr_head=train.lr_head, lr_cluster=train.lr_cluster, lr_linear=train.lr_linear,
                       seed=train.seed, backbone=backbone if online else None, feature_amp=train.feature_amp)


def _mapping_rule(settings: StegoSettings, data: StegoDataModule, monitor: Any) -> tuple[str, tuple]:
    """The cluster-to-vessel rule and the mapping crops' (features, crops, labels or None)."""
    rule = choose_mapping_rule(settings.model.cluster_rule, labels_available=data.train_set.labels is not None,
                               overlaps_evaluation=data.overlap)
    mapping = data.mapping_data(with_labels=rule not in LABEL_FREE_RULES)
    if rule not in LABEL_FREE_RULES and (mapping[2] is None or not np.any(mapping[2])):
        # all-empty labels would map every cluster to background: a model that predicts nothing
        log.warning("model.cluster_rule=%r: the training labels are all empty; falling back to the "
                    "unsupervised 'brightness' rule", rule)
        monitor.tags({"label_empty": "true", "cluster_rule_fallback": f"{rule}->brightness"})
        rule = "brightness"
    return rule, mapping


def _trainer(settings: StegoSettings, device: str, workdir: Path, callbacks: list, monitor: Any) -> L.Trainer:
    train, trainer = settings.train, settings.trainer
    return L.Trainer(max_steps=train.max_steps, max_epochs=-1, accelerator="gpu" if device == "cuda" else "cpu",
                     devices=trainer.devices, num_nodes=trainer.num_nodes, strategy=trainer.lightning_strategy(),
                     use_distributed_sampler=False,  # the datamodule shards the global batches itself
                     precision="32-true" if trainer.precision == "auto" else trainer.precision,
                     logger=MonitorLogger(monitor), callbacks=callbacks, log_every_n_steps=train.log_every_n_steps,
                     enable_progress_bar=train.progress and sys.stderr.isatty(), enable_model_summary=False,
                     num_sanity_val_steps=0, deterministic=device == "cpu", default_root_dir=workdir)


def train_stego(settings: StegoSettings, backbone: Backbone, train: Sequence[PreparedCase],
                validation: Sequence[PreparedCase], *, monitor: Any, workdir: Path, device: str = "cpu",
                overlap: bool = False) -> StegoFit:
    """Train STEGO's head and clusters on the crops of ``train``; ``validation`` volumes draw the curves.

    Parameters
    ----------
    settings : StegoSettings
        Every section (model, loss, train, trainer, sampling, slicing); ``train.resume_from`` is a local
        ``.ckpt`` file or "" here (the step resolves a run id to its checkpoint).
    backbone : Backbone
        The frozen feature extractor.
    train, validation : sequences of PreparedCase
        Training volumes (labels reach the linear probe and, with a label rule, the cluster mapping) and held-out
        volumes (labels score the curves only).
    monitor : Monitor
        Receives the curves, stepped images and tags.
    workdir : Path
        ``checkpoints/`` is written here (the best by validation clDice, ``last.ckpt``, ``interrupted.ckpt`` on a
        signal).
    overlap : bool
        The training volumes are also evaluated (``split: all``): no label may map the clusters.
    """
    data = StegoDataModule(settings, backbone, list(train), list(validation), device=device, overlap=overlap)
    with distributed.main_first():  # rank 0 writes the feature cache, the others read it
        data.setup("fit")
    monitor.tags({"weights_id": backbone.weights_id, "device": device, "sampling": settings.sampling.method,
                  "n_train_crops": f"{len(data.train_set)} of {data.n_candidate_crops}",
                  "feature_cache_bytes_per_crop": str(data.cache_bytes_per_crop),
                  "feature_cache_mb": "0 (train.features=online)" if data.online else
                  f"{len(data.train_set) * data.cache_bytes_per_crop / 1e6:.1f}"})
    module = _build_module(settings, backbone, data.online)
    rule, (map_features, map_crops, map_labels) = _mapping_rule(settings, data, monitor)
    preprocessing = {**(train[0].preprocessing if train else {}), "axis": settings.slicing.axis}

    def make_model() -> StegoSegmenterModel:
        probe = module.cluster_probe
        if settings.model.cluster_fit == "kmeans":  # centroids re-fitted to the current codes at every mapping
            probe = refit_centroids(module, map_features, settings.model.n_clusters, seed=settings.train.seed)
        vessel, name = fit_vessel_mapping(module, map_features, map_crops, map_labels, rule,
                                          settings.model.n_clusters, probe=probe,
                                          bright_quantile=settings.model.bright_quantile)
        return StegoSegmenterModel(backbone, module.head, probe, vessel, patch_size=settings.slicing.patch_size,
                                   threshold=settings.model.threshold, alpha=settings.model.alpha,
                                   mapping_rule=name, preprocessing=preprocessing)

    every = settings.train.val_every_n_steps
    validation_cb = VolumeValidation(make_model, data.val, every_n_steps=every, max_steps=settings.train.max_steps,
                                     monitor=monitor)
    # The best checkpoints by validation clDice (the callback exposes val/* to Lightning) plus last.ckpt.
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=workdir / "checkpoints", save_last=True, every_n_train_steps=every, monitor="val/cldice",
        mode="max", save_top_k=settings.train.save_top_k, filename="best-step{step:06d}",
        auto_insert_metric_name=False)
    # SIGTERM / SIGINT (faults.Interrupted) save checkpoints/interrupted.ckpt: train.resume_from=<this run id>
    on_interrupt = ExceptionCheckpoint(workdir / "checkpoints", "interrupted")
    progress = TrainProgress(settings.train.max_steps, enabled=settings.train.progress)
    trainer = _trainer(settings, device, workdir, [validation_cb, checkpoints, on_interrupt, RankSignals(), progress],
                       monitor)
    with warnings.catch_warnings():  # no resume: Lightning says it looks for a last checkpoint it cannot find
        if not settings.train.resume_from:
            warnings.filterwarnings("ignore", message=r".*ckpt_path.*")
        trainer.fit(module, datamodule=data, ckpt_path=settings.train.resume_from or None)
    # last.ckpt is the final state, whatever step the last periodic checkpoint fell on
    trainer.save_checkpoint(workdir / "checkpoints" / "last.ckpt")
    module.eval()
    if validation_cb.last_model is None:  # the callback validates at max_steps; this only guards odd stops
        validation_cb.validate(trainer, module, trainer.global_step)
    model = validation_cb.last_model.cpu()
    monitor.tags({"cluster_mapping_rule": model.mapping_rule,
                  "vessel_clusters": ",".join(str(i) for i in np.flatnonzero(model.vessel_clusters))})
    best = {Path(k).name: float(v) for k, v in checkpoints.best_k_models.items()}
    return StegoFit(model=model, metrics=validation_cb.last, best_k=best,
                    best=Path(checkpoints.best_model_path).name or None,
                    val_probabilities=validation_cb.last_probabilities)
