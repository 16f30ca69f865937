"""STEGO's training data as a Lightning ``LightningDataModule`` (no tracking here).

``volumes -> preprocessed volumes -> training crops -> frozen-backbone features (cached once) -> kNN table ->
batches of (features, kNN partner's features)``, plus what validation needs (labelled held-out crops and one
held-out volume's crops, with their cached features) and the crops on which clusters are mapped to vessel.
:func:`stego_core.steps.training.run_train` builds one, logs what it holds, and hands it to the Trainer.

With ``train.features=online`` nothing is cached: the kNN table comes from the training crops' pooled features
(computed once at setup), batches hold ``(crop, kNN partner's crop)`` whose features the module computes in the
training step, and mapping / validation compute the features of their crops when they read them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, WeightedRandomSampler

from stego_core.data.cases import (
    CropSet,
    PreparedCase,
    make_crop_set,
    subset_crop_set,
)
from stego_core.data.sampling import draw_crops, select_crops
from stego_core.data.slicing import crop_index, take_crops
from stego_core.features.backbones import Backbone
from stego_core.features.cache import (
    OnlineFeatures,
    compute_pooled_features,
    crops_digest,
    feature_bytes_per_crop,
    knn_table,
    load_or_compute_features,
)
from stego_core.methods.stego.module import CropFeatureDataset, CropPairDataset
from stego_core.methods.stego.settings import StegoSettings
from stego_core.runtime import distributed

log = logging.getLogger(__name__)


@dataclass
class ValidationData:
    """What validation needs, computed once: labelled held-out crops and one held-out volume's crops.

    Attributes
    ----------
    features, crops, labels : ndarray or None
        ``(M, C, h, w)`` cached features, ``(M, P, P)`` crops and ``(M, P, P)`` labels of up to
        ``train.max_val_crops`` labelled held-out crops.
    volume : PreparedCase or None
        The first held-out volume, reconstructed at every validation.
    volume_features, volume_index : ndarray or None
        Features of every crop of that volume (stride ``val_stride``) and their ``(slice, row, col)``.
    """

    features: np.ndarray | None = None
    crops: np.ndarray | None = None
    labels: np.ndarray | None = None
    volume: PreparedCase | None = None
    volume_features: np.ndarray | None = None
    volume_index: np.ndarray | None = None
    patch_size: int = 32
    axis: int = 2


def subsample(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` of ``n`` items drawn without replacement (all of them when ``n <= k``)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class StegoDataModule(L.LightningDataModule):
    """Crops, cached features and the kNN table of the training volumes; validation data of the held-out ones.

    Labels reach only the linear probe (an evaluation tool that never trains the head) and, with a label rule,
    the cluster-to-vessel mapping on *training* volumes: when the training volumes are also evaluated
    (``overlap``), ``train_labels`` is None.
    """

    def __init__(self, settings: StegoSettings, backbone: Backbone, train: list[PreparedCase],
                 validation: list[PreparedCase], *, device: str = "cpu", overlap: bool = False) -> None:
        super().__init__()
        self.cfg = settings
        self.backbone = backbone
        self.device = device
        self.train_cases = list(train)
        self.test_cases = list(validation)
        self.overlap = overlap
        self._ready = False

    @property
    def online(self) -> bool:
        """Whether features are computed when needed (``train.features=online``) rather than cached on disk."""
        return self.cfg.train.features == "online"

    def features_for(self, crops: np.ndarray) -> np.ndarray:
        """Features of ``crops`` from the shared, content-addressed cache (computed once per backbone and
        crop set); with ``train.features=online`` an :class:`~stego_core.features.cache.OnlineFeatures` that computes
        them when indexed (nothing written)."""
        cfg, bb = self.cfg.train, self.backbone
        if self.online:
            return OnlineFeatures(bb, crops, batch_size=cfg.feature_batch_size, device=self.device,
                                  amp=cfg.feature_amp)
        digest = crops_digest(crops)
        path = Path(cfg.cache_dir) / f"{bb.name}_r{bb.spec.res}_{digest[:20]}.npy"
        features, _ = load_or_compute_features(bb, crops, path, batch_size=cfg.feature_batch_size,
                                               device=self.device, amp=cfg.feature_amp, progress=cfg.progress,
                                               digest=digest)
        return features

    def setup(self, stage: str | None = None) -> None:
        """Build everything once (later calls do nothing)."""
        if self._ready:
            return
        self._ready = True
        cfg = self.cfg
        if not self.train_cases:
            raise ValueError("STEGO needs at least one training volume")
        train_set = make_crop_set(self.train_cases, cfg.slicing)
        # Label-free sampling: weights from the training images only (never the labels).
        volumes = {c.case_id: (c.image, c.brain_mask) for c in self.train_cases}
        self.sample_weights, pick = select_crops(train_set.crops, train_set.case_ids, volumes, cfg.sampling,
                                                 seed=cfg.train.seed)
        self.n_candidate_crops = len(train_set)
        pick = self._fit_cache_budget(pick)
        self.train_set: CropSet = subset_crop_set(train_set, pick) if len(pick) < len(train_set) else train_set
        self.features = self.features_for(self.train_set.crops)
        if self.online:  # the feature bank: pooled features, computed once, nothing cached
            bank = compute_pooled_features(self.backbone, self.train_set.crops,
                                           batch_size=cfg.train.feature_batch_size, device=self.device,
                                           amp=cfg.train.feature_amp, progress=cfg.train.progress)
            self.knn = knn_table(bank, k=cfg.loss.knn_k)
        else:
            self.knn = knn_table(self.features, k=cfg.loss.knn_k)
        self.train_labels = self.train_set.labels if not self.overlap else None
        dataset = CropPairDataset if self.online else CropFeatureDataset
        self.dataset = dataset(self.train_set.crops if self.online else self.features, self.knn,
                               self.train_labels, rank_max=cfg.loss.knn_rank_max, seed=cfg.train.seed)
        if len(self.dataset) < cfg.train.batch_size:
            raise ValueError(f"only {len(self.dataset)} training crops for train.batch_size="
                             f"{cfg.train.batch_size}")
        self.mapping_pick = subsample(len(self.train_set), cfg.train.max_mapping_crops, cfg.train.seed)
        self.val = self._validation(self.test_cases)

    def _fit_cache_budget(self, pick: np.ndarray) -> np.ndarray:
        """``pick``, or as many of its crops as ``train.cache_max_gb`` holds, drawn by their sampling weights."""
        self.cache_bytes_per_crop = feature_bytes_per_crop(self.backbone, self.cfg.slicing.patch_size)
        budget = self.cfg.train.cache_max_gb * 1e9
        n_fit = int(budget // self.cache_bytes_per_crop) if budget > 0 and not self.online else len(pick)
        if n_fit >= len(pick):
            return pick
        if n_fit < self.cfg.train.batch_size:
            raise ValueError(f"train.cache_max_gb={self.cfg.train.cache_max_gb} holds {n_fit} crops of "
                             f"{self.cache_bytes_per_crop} bytes, fewer than train.batch_size="
                             f"{self.cfg.train.batch_size}")
        log.warning("feature cache: %d crops x %d bytes exceed train.cache_max_gb=%g; keeping %d drawn by their "
                    "sampling weights", len(pick), self.cache_bytes_per_crop, self.cfg.train.cache_max_gb, n_fit)
        sub = draw_crops(self.sample_weights, n_fit, seed=self.cfg.train.seed)
        weights = self.sample_weights[sub]
        self.sample_weights = weights / weights.sum()
        return pick[sub]

    def train_dataloader(self) -> DataLoader:
        """Batches drawn by the sampling weights (with replacement) when ``sampling.method`` weights crops and
        every crop was kept (no ``sampling.max_crops``, or no more crops than it); uniformly shuffled otherwise
        (the ``sampling.max_crops`` subset was already drawn by weight).

        Under DDP every rank draws the same global batches of ``train.batch_size x world size`` crops and keeps
        its share (:class:`~stego_core.runtime.distributed.ShardedBatchSampler`): one process with the global batch
        size sees the same crops in the same order."""
        cfg = self.cfg.train
        generator = torch.Generator().manual_seed(cfg.seed)
        if self.cfg.sampling.method != "none" and len(self.train_set) == self.n_candidate_crops:
            sampler = WeightedRandomSampler(torch.from_numpy(self.sample_weights), num_samples=len(self.dataset),
                                            replacement=True, generator=generator)
        else:
            sampler = torch.utils.data.RandomSampler(self.dataset, generator=generator)
        batches = distributed.ShardedBatchSampler(sampler, cfg.batch_size, rank=distributed.global_rank(),
                                                  world_size=distributed.world_size())
        return DataLoader(self.dataset, batch_sampler=batches, num_workers=0)

    def mapping_data(self, with_labels: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Features, crops and (when ``with_labels`` and allowed) labels of the crops clusters are mapped on."""
        pick = self.mapping_pick
        labels = self.train_labels[pick] if (with_labels and self.train_labels is not None) else None
        crops = self.train_set.crops[pick]
        return (self.features_for(crops) if self.online else self.features[pick]), crops, labels

    def _validation(self, test_cases: list[PreparedCase]) -> ValidationData:
        """Held-out labelled crops (up to ``train.max_val_crops``) and the first held-out volume's crops."""
        cfg = self.cfg
        val = ValidationData(patch_size=cfg.slicing.patch_size, axis=cfg.slicing.axis)
        if not test_cases:
            return val
        test_set = make_crop_set(test_cases, cfg.slicing)
        if test_set.labels is not None:
            pick = subsample(len(test_set), cfg.train.max_val_crops, cfg.train.seed)
            val.crops, val.labels = test_set.crops[pick], test_set.labels[pick]
            val.features = self.features_for(val.crops)
        volume = test_cases[0]
        stride = cfg.val_stride or max(1, cfg.slicing.patch_size // 2)
        index = crop_index(volume.image.shape, axis=cfg.slicing.axis, patch_size=cfg.slicing.patch_size,
                           stride=stride, brain_mask=volume.brain_mask, min_brain_fraction=0.0)
        crops = take_crops(volume.image, index, axis=cfg.slicing.axis, patch_size=cfg.slicing.patch_size,
                           pad_value=0.0)
        val.volume, val.volume_index = volume, index
        val.volume_features = self.features_for(crops)
        return val
