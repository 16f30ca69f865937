"""A trained STEGO segmenter as one ``nn.Module`` (what MLflow logs and loads) and its engine adapter.

``crops (B, 1, P, P) in [0, 1] -> backbone features -> head codes -> cluster probabilities -> vessel
probability (B, 1, P, P)``. The module holds everything inference needs (backbone, head, centroids, which
clusters are vessel, the crop size it was trained on), so ``mlflow.pytorch.load_model`` gives a working model.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from stego_core.features.backbones import Backbone
from stego_core.features.base import forward_batch_size
from stego_core.methods.stego.mapping import cluster_vessel_probability, pixel_codes
from stego_core.methods.stego.model import ClusterProbe, StegoHead


class StegoSegmenterModel(nn.Module):
    """Backbone + STEGO head + cluster probe + cluster-to-vessel mapping.

    Parameters
    ----------
    backbone : Backbone
        Frozen feature extractor (its own input transform is applied inside).
    head : StegoHead
    cluster_probe : ClusterProbe
    vessel_clusters : (K,) bool tensor
        Which clusters are vessel.
    patch_size : int
        Crop side the model was trained on; the engine uses it unless told otherwise.
    threshold : float
        Probability above which a voxel is vessel (a-priori 0.5, never tuned on test labels).
    alpha : float
        Inverse temperature of the cluster softmax behind the vessel probability
        (:meth:`~stego_core.methods.stego.model.ClusterProbe.probabilities`); it leaves the argmax, so the 0.5 decision, as it
        is and sets how confident the probabilities are for what comes after (blending, the dense CRF).
    mapping_rule : str
        How the vessel clusters were chosen (recorded with the run).
    preprocessing : dict
        The data settings it was trained with (``skull_strip``, ``standardize``, ``axis``); reconstruction
        checks them.
    """

    def __init__(self, backbone: Backbone, head: StegoHead, cluster_probe: ClusterProbe,
                 vessel_clusters: torch.Tensor, *, patch_size: int, alpha: float, threshold: float = 0.5,
                 mapping_rule: str = "brightness",
                 preprocessing: dict | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.cluster_probe = cluster_probe
        self.register_buffer("vessel_clusters", torch.as_tensor(vessel_clusters, dtype=torch.bool).clone())
        self.patch_size = int(patch_size)
        self.threshold = float(threshold)
        self.alpha = float(alpha)
        self.mapping_rule = mapping_rule
        self.preprocessing = dict(preprocessing or {})

    @torch.no_grad()
    def probabilities_from_features(self, features: torch.Tensor, out_size: int) -> torch.Tensor:
        """Vessel probability (B, 1, out_size, out_size) from backbone features (B, C, h, w): the codes are
        upsampled to the crop before the cluster probe (:func:`~stego_core.methods.stego.mapping.pixel_codes`)."""
        codes = pixel_codes(self.head(features.float()), out_size)
        cluster_probs = self.cluster_probe.probabilities(codes, alpha=self.alpha)
        return cluster_vessel_probability(cluster_probs, self.vessel_clusters, out_size)

    @torch.no_grad()
    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Vessel probability (B, 1, P, P) of preprocessed crops (B, 1, P, P) in [0, 1]."""
        return self.probabilities_from_features(self.backbone(crops), crops.shape[-1])


class TorchSegmenter:
    """Adapts :class:`StegoSegmenterModel` to the engine's :class:`~stego_core.engine.segmenter.Segmenter` protocol.

    The engine hands over crops in batches of ``engine.batch_size`` (what it cuts and blends at once); they run
    through the model in forward passes of ``batch_size`` crops, by default chosen from the backbone and the
    device's memory (:func:`~stego_core.features.base.forward_batch_size`): small enough to stay in a CPU's cache,
    large enough to fill a GPU.
    """

    def __init__(self, model: StegoSegmenterModel, *, device: str = "cpu", name: str = "stego",
                 amp: bool = False, compile: bool = False, batch_size: int | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.name = name
        self.threshold = float(getattr(model, "threshold", 0.5))
        self.amp = amp and torch.device(device).type == "cuda"
        if batch_size is None:
            batch_size = forward_batch_size(model.backbone.spec, device, dtype_bytes=2 if self.amp else 4)
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1 (crops per forward pass)")
        self.batch_size = int(batch_size)
        # the fast path: a compiled graph of the same module (outputs equal to float rounding, tested); every
        # forward pass is padded to the first pass's size, so the graph sees one shape and compiles once
        self.compile = compile
        self._forward = torch.compile(self.model, dynamic=False) if compile else self.model
        self._compiled_size = 0

    def fit_volume(self, image: np.ndarray, brain_mask: np.ndarray | None) -> None:
        """Nothing to fit: the model is trained already."""

    def predict_slices(self, slices: np.ndarray) -> np.ndarray:
        """(N, P, P) crops in [0, 1] -> (N, P, P) vessel probabilities."""
        x = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]
        out = np.empty(slices.shape, dtype=np.float32)
        with torch.inference_mode(), torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.amp):
            for start in range(0, len(x), self.batch_size):
                chunk = x[start:start + self.batch_size].to(self.device, non_blocking=True)
                n = len(chunk)
                if self.compile:
                    self._compiled_size = self._compiled_size or n
                    if n < self._compiled_size:
                        chunk = torch.cat([chunk, chunk.new_zeros((self._compiled_size - n, *chunk.shape[1:]))])
                out[start:start + n] = self._forward(chunk)[:n, 0].float().cpu().numpy()
        return out
