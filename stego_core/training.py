"""STEGO training with Lightning on cached backbone features, tracked in MLflow.

``run_train`` wires it together: crops of the training volumes -> frozen backbone features (cached once) ->
kNN table -> :class:`StegoModule` (head + cluster probe + linear probe, step logic only) trained by a Lightning
``Trainer`` whose MLflow logger writes into the run -> cluster-to-vessel mapping -> a
:class:`~stego_core.inference.StegoSegmenterModel` logged as an MLflow model.

Every ``train.val_every_n_steps`` the :class:`VolumeValidation` callback reconstructs a held-out volume from
cached features and logs its Dice / clDice, crop-level cluster and linear-probe mIoU / accuracy, and a slice
panel (image / label / cluster map / vessel prediction).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from stego_core import tracking
from stego_core._checks import check_range
from stego_core.backbones import Backbone, build_backbone
from stego_core.config import DataConfig, SlicingConfig, check_choice, flatten, save_config
from stego_core.data import CropSet, PreparedCase, ensure_cases, make_crop_set, preprocess_case, split_cases
from stego_core.features import crops_digest, knn_table, load_or_compute_features
from stego_core.inference import StegoSegmenterModel
from stego_core.metrics import evaluate_segmentation
from stego_core.module import CropFeatureDataset, StegoModule
from stego_core.slicing import CropBlender, crop_index, take_crops
from stego_core.stego import ClusterProbe, LinearProbe, LossConfig, StegoHead, vessel_clusters

log = logging.getLogger(__name__)
CLUSTER_RULES = ("auto", "hungarian", "majority", "brightness")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and head. ``weights``: ``hub``, ``random`` (tests only) or a local weights file.

    ``classical_standardize`` (``crop`` or ``fixed``) is the per-channel normalisation of the ``classical``
    featurizer (ignored by the ViTs).
    """

    backbone: str = "vit_small_patch8_dino"
    weights: str = "hub"
    res: int | None = None
    classical_standardize: str = "crop"
    code_dim: int = 70
    dropout: float = 0.1
    n_clusters: int = 2
    cluster_rule: str = "auto"
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check_range(self.code_dim, "model.code_dim", 1)
        check_range(self.dropout, "model.dropout", 0.0, 1.0, high_inclusive=False)
        check_range(self.n_clusters, "model.n_clusters", 2)
        check_choice(self.cluster_rule, "model.cluster_rule", CLUSTER_RULES)
        check_choice(self.classical_standardize, "model.classical_standardize", ("crop", "fixed"))
        check_range(self.threshold, "model.threshold", 0.0, 1.0)


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation and bookkeeping (seed defaults: batch 24, 5000 steps, Adam 5e-4 head / 5e-3 probe)."""

    seed: int = 0
    max_steps: int = 5000
    batch_size: int = 24
    lr_head: float = 5e-4
    lr_cluster: float = 5e-3
    lr_linear: float = 1e-3
    val_every_n_steps: int = 500
    log_every_n_steps: int = 10
    accelerator: str = "auto"
    precision: str = "32-true"
    feature_batch_size: int = 64
    feature_amp: bool = False
    knn_k: int = 30
    max_val_crops: int = 512
    max_mapping_crops: int = 4096
    cache_dir: str = "outputs/feature_cache"
    progress: bool = True

    def __post_init__(self) -> None:
        check_range(self.max_steps, "train.max_steps", 1)
        check_range(self.batch_size, "train.batch_size", 2)
        check_range(self.val_every_n_steps, "train.val_every_n_steps", 1)
        for name in ("lr_head", "lr_cluster", "lr_linear"):
            check_range(getattr(self, name), f"train.{name}", 0.0, low_inclusive=False)
        check_choice(self.accelerator, "train.accelerator", ("auto", "cpu", "cuda", "gpu"))
        check_choice(self.precision, "train.precision", ("32-true", "bf16-mixed", "16-mixed"))


@dataclass(frozen=True)
class TrainConfig:
    """The ``train`` entry point. ``val_stride`` is the sliding-window stride of validation reconstructions."""

    data: DataConfig = field(default_factory=DataConfig)
    slicing: SlicingConfig = field(default_factory=SlicingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    test_fraction: float = 0.34
    split_seed: int = 0
    val_stride: int | None = None
    output: str = "outputs/train"
    experiment: str = "stego-vessels"
    log_model: bool = True


@dataclass
class TrainResult:
    run_id: str
    model_uri: str | None
    metrics: dict[str, float]
    mapping_rule: str
    output_dir: Path


# --------------------------------------------------------------------------------------------- mapping & metrics


@torch.no_grad()
def cluster_maps(module: StegoModule, features: np.ndarray, out_size: int, *, batch_size: int = 256
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids (N, P, P) and linear-probe vessel predictions (N, P, P) of cached features (eval mode)."""
    was_training = module.training
    module.eval()
    ids, linear = [], []
    for start in range(0, len(features), batch_size):
        f = torch.from_numpy(np.asarray(features[start:start + batch_size], dtype=np.float32)).to(module.device)
        codes = module.head(f)
        probs = module.cluster_probe.probabilities(codes)
        probs = F.interpolate(probs, size=(out_size, out_size), mode="bilinear", align_corners=False)
        logits = F.interpolate(module.linear_probe(codes), size=(out_size, out_size), mode="bilinear",
                               align_corners=False)
        ids.append(probs.argmax(1).cpu().numpy())
        linear.append(logits.argmax(1).cpu().numpy() == 1)
    module.train(was_training)
    return np.concatenate(ids), np.concatenate(linear)


def binary_iou_accuracy(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean IoU over the two classes (background, vessel) and pixel accuracy of boolean maps."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    ious = []
    for p, t in ((pred, target), (~pred, ~target)):
        union = np.logical_or(p, t).sum()
        ious.append(np.logical_and(p, t).sum() / union if union else 1.0)
    return {"miou": float(np.mean(ious)), "accuracy": float((pred == target).mean())}


def choose_mapping_rule(requested: str, *, labels_available: bool, overlaps_evaluation: bool) -> str:
    """The cluster-to-vessel rule a run uses, refusing label-based rules on volumes that are also evaluated."""
    if requested == "auto":
        return "label" if labels_available and not overlaps_evaluation else "brightness"
    if requested in ("hungarian", "majority"):
        if not labels_available:
            raise ValueError(f"model.cluster_rule={requested!r} needs labelled training volumes; none have labels")
        if overlaps_evaluation:
            raise ValueError(f"model.cluster_rule={requested!r} would use labels of volumes that are also "
                             "evaluated (train and test overlap); use 'brightness' or 'auto'")
    return requested


def fit_vessel_mapping(module: StegoModule, features: np.ndarray, crops: np.ndarray, labels: np.ndarray | None,
                       rule: str, n_clusters: int) -> tuple[torch.Tensor, str]:
    """Which clusters are vessel, decided on training crops by ``rule`` (``label`` = Hungarian for K = 2, else
    majority; ``hungarian``; ``majority``; or ``brightness``)."""
    ids, _ = cluster_maps(module, features, crops.shape[-1])
    if rule != "brightness":
        # balanced majority: vessels are a tiny minority, so a plain majority vote would mark no cluster
        mask, name = vessel_clusters("auto" if rule == "label" else rule, cluster_ids=ids, n_clusters=n_clusters,
                                     labels=labels, balanced=True)
    else:
        mask, name = vessel_clusters("brightness", cluster_ids=ids, n_clusters=n_clusters, intensities=crops)
    return torch.as_tensor(mask, dtype=torch.bool), name


@dataclass
class ValidationData:
    """What validation needs, computed once: labelled held-out crops and one held-out volume's crops."""

    features: np.ndarray | None  # (M, C, h, w) features of held-out crops with labels
    crops: np.ndarray | None
    labels: np.ndarray | None
    volume: PreparedCase | None
    volume_features: np.ndarray | None
    volume_index: np.ndarray | None
    patch_size: int = 32
    axis: int = 2


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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step >= self.max_steps:
            self.validate(trainer, pl_module, step)

    def validate(self, trainer: L.Trainer, pl_module: StegoModule, step: int) -> dict[str, float]:
        was_training = pl_module.training
        pl_module.eval()
        model = self.make_model()  # maps clusters to vessel once per validation
        metrics = validation_metrics(pl_module, model, self.val)
        if trainer.logger is not None:
            trainer.logger.log_metrics(metrics, step=step)
        if self.val.features is not None and len(self.val.features):
            tracking.log_figure(validation_figure(pl_module, model.vessel_clusters, self.val),
                                f"figures/val_step_{step:06d}.png")
        pl_module.train(was_training)
        self.last, self.last_model = metrics, model
        if self.report is not None:
            self.report(step, metrics)
        return metrics


@torch.no_grad()
def reconstruct_from_features(model: StegoSegmenterModel, features: np.ndarray, index: np.ndarray,
                              case: PreparedCase, *, axis: int, patch_size: int, batch_size: int = 256
                              ) -> np.ndarray:
    """Vessel probabilities of a volume from cached crop features (same blending as the engine)."""
    blender = CropBlender(case.image.shape, axis=axis, patch_size=patch_size, blend="gaussian")
    device = next(model.head.parameters()).device
    for start in range(0, len(index), batch_size):
        f = torch.from_numpy(np.asarray(features[start:start + batch_size], dtype=np.float32)).to(device)
        prob = model.probabilities_from_features(f, patch_size)[:, 0].cpu().numpy()
        blender.add(prob, index[start:start + batch_size])
    prob = blender.result()
    prob[~case.brain_mask] = 0
    return prob


def validation_metrics(module: StegoModule, model: StegoSegmenterModel, val: ValidationData) -> dict[str, float]:
    """Crop-level cluster / linear-probe mIoU and accuracy, and Dice etc. of the reconstructed volume."""
    metrics: dict[str, float] = {}
    vessel = model.vessel_clusters
    if val.features is not None and val.labels is not None and len(val.features):
        ids, linear = cluster_maps(module, val.features, val.patch_size)
        pred = vessel.cpu().numpy()[ids]
        for k, v in binary_iou_accuracy(pred, val.labels).items():
            metrics[f"val/cluster_{k}"] = v
        for k, v in binary_iou_accuracy(linear, val.labels).items():
            metrics[f"val/linear_{k}"] = v
    if val.volume is not None and val.volume_features is not None:
        prob = reconstruct_from_features(model, val.volume_features, val.volume_index, val.volume,
                                         axis=val.axis, patch_size=val.patch_size)
        pred = (prob > model.threshold) & val.volume.brain_mask
        metrics["val/predicted_fraction"] = float(pred.mean())
        if val.volume.label is not None:
            scores = evaluate_segmentation(pred, val.volume.label)
            metrics.update({f"val/{k}": float(v) for k, v in scores.items()})
    return metrics


def validation_figure(module: StegoModule, vessel: torch.Tensor, val: ValidationData, n: int = 8) -> Any:
    from stego_core.visualize import slice_panel_figure

    assert val.features is not None and val.crops is not None
    pick = pick_informative(val.labels, val.crops, n)
    ids, _ = cluster_maps(module, val.features[pick], val.patch_size)
    pred = vessel.cpu().numpy()[ids]
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


def _subsample(n: int, k: int, seed: int) -> np.ndarray:
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


def _features(backbone: Backbone, crops: np.ndarray, cfg: TrainConfig, device: str) -> np.ndarray:
    """Features of ``crops`` from the shared, content-addressed cache (computed once per backbone and crop set)."""
    digest = crops_digest(crops)
    path = Path(cfg.train.cache_dir) / f"{backbone.name}_r{backbone.spec.res}_{digest[:20]}.npy"
    features, _ = load_or_compute_features(backbone, crops, path, batch_size=cfg.train.feature_batch_size,
                                           device=device, amp=cfg.train.feature_amp, progress=cfg.train.progress,
                                           digest=digest)
    return features


def build_validation(backbone: Backbone, test_cases: list[PreparedCase], cfg: TrainConfig, device: str
                     ) -> ValidationData:
    """Held-out labelled crops (up to ``train.max_val_crops``) and the first held-out volume's crops."""
    val = ValidationData(None, None, None, None, None, None, patch_size=cfg.slicing.patch_size,
                         axis=cfg.slicing.axis)
    if not test_cases:
        return val
    test_set = make_crop_set(test_cases, cfg.slicing)
    if test_set.labels is not None:
        pick = _subsample(len(test_set), cfg.train.max_val_crops, cfg.train.seed)
        val.crops, val.labels = test_set.crops[pick], test_set.labels[pick]
        val.features = _features(backbone, val.crops, cfg, device)
    volume = test_cases[0]
    stride = cfg.val_stride or max(1, cfg.slicing.patch_size // 2)
    index = crop_index(volume.image.shape, axis=cfg.slicing.axis, patch_size=cfg.slicing.patch_size, stride=stride,
                       brain_mask=volume.brain_mask, min_brain_fraction=0.0)
    crops = take_crops(volume.image, index, axis=cfg.slicing.axis, patch_size=cfg.slicing.patch_size, pad_value=0.0)
    val.volume, val.volume_index = volume, index
    val.volume_features = _features(backbone, crops, cfg, device)
    return val


def run_train(cfg: TrainConfig, *, report: Callable[[int, dict[str, float]], None] | None = None,
              nested: bool = False, run_name: str | None = None, tags: dict[str, str] | None = None
              ) -> TrainResult:
    """Train STEGO as one MLflow run; returns the run id, the logged model's URI and the final val metrics."""
    device = _device(cfg.train.accelerator)
    with tracking.start_run(cfg.experiment, run_name=run_name or f"stego-{cfg.model.backbone}", nested=nested,
                            output_root=cfg.output, tags={"method": "stego", "step": "train",
                                                          "backbone": cfg.model.backbone, **(tags or {})}) as run:
        tracking.log_params(flatten(cfg))
        save_config(cfg, run.output_dir / "config.yaml")
        tracking.log_artifact(run.output_dir / "config.yaml")
        L.seed_everything(cfg.train.seed, workers=True, verbose=False)
        # The backbone first: missing weights fail within seconds, before any data is touched.
        backbone = build_backbone(cfg.model.backbone, weights=cfg.model.weights, res=cfg.model.res,
                                  standardize=cfg.model.classical_standardize)

        cases = ensure_cases(cfg.data)
        train_cases, test_cases = split_cases(cases, cfg.test_fraction, seed=cfg.split_seed)
        tracking.log_dataset(train_cases, name=Path(cfg.data.root).name, context="training", source=cfg.data.root)
        tracking.log_dataset(test_cases, name=Path(cfg.data.root).name + "-val", context="validation",
                             source=cfg.data.root)
        prepared = {c.case_id: preprocess_case(c, cfg.data) for c in cases}
        train_set: CropSet = make_crop_set([prepared[c.case_id] for c in train_cases], cfg.slicing)

        tracking.set_tags({"weights_id": backbone.weights_id, "device": device})
        features = _features(backbone, train_set.crops, cfg, device)
        knn = knn_table(features, k=cfg.train.knn_k)

        overlap = bool({c.case_id for c in train_cases} & {c.case_id for c in test_cases})
        rule = choose_mapping_rule(cfg.model.cluster_rule, labels_available=train_set.labels is not None,
                                   overlaps_evaluation=overlap)
        # Labels feed only the linear probe (an evaluation tool that never trains the head) and, with the
        # 'label' rule, the cluster-to-vessel mapping on training volumes; never a volume that is evaluated.
        train_labels = train_set.labels if not overlap else None
        dataset = CropFeatureDataset(features, knn, train_labels, rank_max=cfg.loss.knn_rank_max,
                                     seed=cfg.train.seed)
        loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(cfg.train.seed), num_workers=0)
        if len(loader) == 0:
            raise ValueError(f"only {len(dataset)} training crops for train.batch_size={cfg.train.batch_size}")

        head = StegoHead(backbone.feature_dim, cfg.model.code_dim, dropout=cfg.model.dropout)
        module = StegoModule(head, ClusterProbe(cfg.model.code_dim, cfg.model.n_clusters),
                             LinearProbe(cfg.model.code_dim, 2), cfg.loss, lr_head=cfg.train.lr_head,
                             lr_cluster=cfg.train.lr_cluster, lr_linear=cfg.train.lr_linear, seed=cfg.train.seed)
        map_pick = _subsample(len(train_set), cfg.train.max_mapping_crops, cfg.train.seed)
        map_labels = train_labels[map_pick] if (train_labels is not None and rule != "brightness") else None

        preprocessing = {"skull_strip": cfg.data.skull_strip, "standardize": cfg.data.standardize,
                         "axis": cfg.slicing.axis}

        def make_model() -> StegoSegmenterModel:
            vessel, name = fit_vessel_mapping(module, features[map_pick], train_set.crops[map_pick], map_labels,
                                              rule, cfg.model.n_clusters)
            return StegoSegmenterModel(backbone, module.head, module.cluster_probe, vessel,
                                       patch_size=cfg.slicing.patch_size, threshold=cfg.model.threshold,
                                       mapping_rule=name, preprocessing=preprocessing)

        val = build_validation(backbone, [prepared[c.case_id] for c in test_cases], cfg, device)
        validation = VolumeValidation(make_model, val, every_n_steps=cfg.train.val_every_n_steps,
                                      max_steps=cfg.train.max_steps, report=report)
        checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=run.output_dir / "checkpoints", save_last=True,
                                                          every_n_train_steps=cfg.train.val_every_n_steps,
                                                          save_top_k=0)
        trainer = L.Trainer(max_steps=cfg.train.max_steps, max_epochs=-1,
                            accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                            precision=cfg.train.precision, logger=tracking.lightning_logger(run.run_id,
                                                                                             cfg.experiment),
                            callbacks=[validation, checkpoints], log_every_n_steps=cfg.train.log_every_n_steps,
                            enable_progress_bar=cfg.train.progress, enable_model_summary=False,
                            num_sanity_val_steps=0, deterministic=device == "cpu", default_root_dir=run.output_dir)
        trainer.fit(module, train_dataloaders=loader)

        module.eval()
        if validation.last_model is None:  # the callback validates at max_steps; this only guards odd stops
            validation.validate(trainer, module, trainer.global_step)
        final, model = validation.last, validation.last_model.cpu()
        tracking.set_tags({"cluster_mapping_rule": model.mapping_rule,
                           "vessel_clusters": ",".join(str(i) for i in np.flatnonzero(model.vessel_clusters))})
        tracking.log_metrics({k.replace("val/", "final/"): v for k, v in final.items()})
        tracking.log_artifact(run.output_dir / "checkpoints", "checkpoints")
        model_uri = None
        if cfg.log_model:
            example = np.zeros((1, 1, cfg.slicing.patch_size, cfg.slicing.patch_size), dtype=np.float32)
            model_uri = tracking.log_pytorch_model(model, name="model", input_example=example, metadata={
                "patch_size": cfg.slicing.patch_size, "axis": cfg.slicing.axis, "backbone": cfg.model.backbone,
                "weights_id": backbone.weights_id, "mapping_rule": model.mapping_rule,
                "skull_strip": cfg.data.skull_strip, "standardize": cfg.data.standardize})
        return TrainResult(run_id=run.run_id, model_uri=model_uri, metrics=final, mapping_rule=model.mapping_rule,
                           output_dir=run.output_dir)

