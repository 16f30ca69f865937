"""The STEGO LightningModule and its dataset: step logic only (no data loading, no tracking).

Head, probes and loss settings are injected; the Trainer owns logging. :mod:`stego_core.steps.training` wires them.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from stego_core.features.cache import draw_knn_partners
from stego_core.methods.stego.model import (
    ClusterProbe,
    LinearProbe,
    LossConfig,
    StegoHead,
    correspondence_loss,
)
from stego_core.runtime.distributed import all_gather_with_grad


class CropFeatureDataset(Dataset):
    """Cached features of training crops, each paired with one of its k nearest neighbours.

    The neighbour is drawn uniformly from ranks ``1..rank_max`` of the kNN table (rank 0 is the crop itself) by
    :func:`~stego_core.features.cache.draw_knn_partners` with a generator seeded with ``seed``.
    """

    def __init__(self, features: np.ndarray, knn: np.ndarray, labels: np.ndarray | None, *, rank_max: int,
                 seed: int) -> None:
        self.features = features
        self.knn = knn
        self.labels = labels
        self.rank_max = rank_max
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.features)

    def _pair(self, i: int, j: int) -> dict[str, torch.Tensor]:
        return {"features": torch.from_numpy(np.asarray(self.features[i], dtype=np.float32)),
                "knn_features": torch.from_numpy(np.asarray(self.features[j], dtype=np.float32))}

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j = int(draw_knn_partners(self.knn, np.array([i]), rank_max=self.rank_max, rng=self.rng)[0])
        item = self._pair(i, j)
        if self.labels is not None:
            item["labels"] = torch.from_numpy(self.labels[i].astype(np.int64))
        return item


class CropPairDataset(CropFeatureDataset):
    """Training crops ``(1, P, P)`` (``crops``, ``knn_crops``), each paired with one of its k nearest neighbours
    as :class:`CropFeatureDataset` pairs their features (same table, same draws): for ``train.features=online``,
    where :class:`StegoModule` computes the features in the training step."""

    def _pair(self, i: int, j: int) -> dict[str, torch.Tensor]:
        return {"crops": torch.from_numpy(np.asarray(self.features[i:i + 1], dtype=np.float32)),
                "knn_crops": torch.from_numpy(np.asarray(self.features[j:j + 1], dtype=np.float32))}


class StegoModule(L.LightningModule):
    """The STEGO training step: correspondence loss on the head, plus probes on detached codes.

    Head, probes and loss settings are injected; head, cluster probe and linear probe each have their own Adam
    learning rate (parameter groups of one optimiser). The probes see detached codes, so their losses never
    reach the head.

    Batches hold cached ``features`` / ``knn_features``, or ``crops`` / ``knn_crops`` whose features the frozen
    ``backbone`` computes in the step (``train.features=online``; bfloat16 autocast on CUDA with
    ``feature_amp``). The backbone is not a submodule: it is neither trained, checkpointed nor wrapped by DDP.
    """

    def __init__(self, head: StegoHead, cluster_probe: ClusterProbe, linear_probe: LinearProbe,
                 loss_config: LossConfig, *, lr_head: float, lr_cluster: float, lr_linear: float,
                 seed: int = 0, backbone: torch.nn.Module | None = None, feature_amp: bool = False) -> None:
        super().__init__()
        self._frozen: tuple[torch.nn.Module, ...] = (backbone,) if backbone is not None else ()
        self.feature_amp = feature_amp
        self.head = head
        self.cluster_probe = cluster_probe
        self.linear_probe = linear_probe
        self.loss_config = loss_config
        self.lrs = (lr_head, lr_cluster, lr_linear)
        self.seed = seed
        self._generator: torch.Generator | None = None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # One Adam with a parameter group per part (equivalent to three Adams; one step per batch keeps
        # Lightning's global_step equal to the number of batches).
        return torch.optim.Adam([
            {"params": self.head.parameters(), "lr": self.lrs[0]},
            {"params": self.cluster_probe.parameters(), "lr": self.lrs[1]},
            {"params": self.linear_probe.parameters(), "lr": self.lrs[2]}])

    def _points_generator(self) -> torch.Generator:
        if self._generator is None or self._generator.device != self.device:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._generator

    @torch.no_grad()
    def batch_features(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's features and its kNN partners' features: cached, or computed by the frozen backbone from
        the crops in one forward pass."""
        if "features" in batch:
            return batch["features"], batch["knn_features"]
        if not self._frozen:
            raise ValueError("a batch of crops (train.features=online) needs StegoModule(backbone=...)")
        backbone = self._frozen[0].to(self.device)
        crops = torch.cat([batch["crops"], batch["knn_crops"]])
        with torch.autocast(self.device.type, dtype=torch.bfloat16,
                            enabled=self.feature_amp and self.device.type == "cuda"):
            feats = backbone(crops).float()
        return feats[:len(batch["crops"])], feats[len(batch["crops"]):]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        feats, knn_feats = self.batch_features(batch)
        codes, knn_codes = self.head(feats), self.head(knn_feats)
        # Under DDP every rank computes the loss of the whole global batch (STEGO's loss is not a mean of
        # per-crop terms: negatives, centring and sampling grids span the batch); the gather's backward and
        # DDP's mean then give each parameter the gradient of one process holding that batch.
        feats, codes, knn_feats, knn_codes = (all_gather_with_grad(t) for t in (feats, codes, knn_feats, knn_codes))
        if "labels" in batch:
            batch = {**batch, "labels": all_gather_with_grad(batch["labels"])}
        loss, terms = correspondence_loss(feats, codes, knn_feats, knn_codes, self.loss_config,
                                          generator=self._points_generator())
        cluster_loss, _ = self.cluster_probe(codes.detach())
        total = loss + cluster_loss
        logs = {"train/loss": loss, "train/cluster_loss": cluster_loss}
        if "labels" in batch:
            linear_loss = self.linear_probe.loss(codes.detach(), batch["labels"])
            total = total + linear_loss
            logs["train/linear_loss"] = linear_loss
        logs.update({f"train/{k}": v for k, v in terms.items()})
        self.log_dict(logs, prog_bar=False, on_step=True, on_epoch=False, batch_size=len(feats))
        self.log("loss", loss, prog_bar=True, logger=False, on_step=True, on_epoch=False, batch_size=len(feats))
        return total
