"""What every backbone shares: its spec, the input transform, the frozen module contract, the forward batch.

A backbone maps preprocessed MRA crops to a grid of feature vectors::

    crops (B, 1, P, P) float in [0, 1]  ->  features (B, C, h, w)

:class:`BackboneSpec` says what a backbone is and what input it expects; :func:`to_model_input` (resize to
``res``, grey replicated to 3 channels, the spec's normalisation) is the one input transform used at training AND
at inference, :func:`normalize_input` its second half (no resize, for DINO's smaller views); :class:`Backbone` is
the frozen ``nn.Module`` both families subclass (:class:`~stego_core.features.vit.ViTBackbone`,
:class:`~stego_core.features.classical.ClassicalFeaturizer`); :func:`forward_batch_size` is how many crops one
forward pass takes. The table of backbones by name and :func:`~stego_core.features.backbones.build_backbone` are
in :mod:`stego_core.features.backbones`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "BackboneSpec",
    "activation_bytes_per_crop",
    "cpu_cache_bytes",
    "forward_batch_size",
    "normalize_input",
    "to_model_input",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is and what input it expects.

    Attributes
    ----------
    name : str
        Our name for it (the key of :data:`BACKBONES`).
    timm_name : str or None
        timm architecture with its weight tag (``arch.tag``); None for the classical featurizer.
    vit_patch : int
        ViT patch size in pixels of the model input; 1 for the classical featurizer.
    embed_dim : int
        Feature channels ``C`` of the output.
    res : int
        Side of the model input in pixels (crops are resized to ``res x res``); the output grid is
        ``res // vit_patch``. For ``classical`` it is the side of the output grid itself.
    mean, std : tuple of float
        Per-channel input normalisation (ImageNet for the ViTs).
    kind : {"vit", "classical"}
        Family, selecting the input transform and the model class.
    weights_url : str or None
        Where the original release weights can be downloaded by hand (shown in error messages).
    timm_kwargs : tuple of (str, int)
        Architecture overrides passed to ``timm.create_model`` (patch size, depth, width, heads) for the
        in-domain ViTs; empty for the published backbones.
    """

    name: str
    timm_name: str | None
    vit_patch: int
    embed_dim: int
    res: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    kind: str = "vit"
    weights_url: str | None = None
    timm_kwargs: tuple[tuple[str, int], ...] = ()

    @property
    def trainable(self) -> bool:
        """True for the in-domain ViTs built at the crop's scale, meant for :mod:`stego_core.steps.pretrain`."""
        return bool(self.timm_kwargs)

    @property
    def grid(self) -> int:
        """Side ``h = w`` of the output feature grid."""
        return self.res // self.vit_patch


#: Last-level cache assumed when the OS does not say (bytes).
_DEFAULT_CPU_CACHE = 32 * 2 ** 20


def cpu_cache_bytes() -> int:
    """Size of the CPU's last-level cache in bytes, from ``/sys`` (Linux), else 32 MiB."""
    for index in (3, 2):
        path = Path(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size")
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit() and int(digits) > 0:
            return int(digits) * scale
    return _DEFAULT_CPU_CACHE


def activation_bytes_per_crop(spec: BackboneSpec, *, dtype_bytes: int = 4) -> int:
    """Bytes of the largest activation one crop creates in ``spec``'s forward pass.

    For a ViT it is the MLP's hidden layer, ``tokens x 4 x width`` values (``tokens = grid^2 + 1`` with the CLS
    token); for ``classical``, its ``res^2 x width`` feature maps, counted the same way.
    """
    tokens = spec.grid ** 2 + (1 if spec.kind == "vit" else 0)
    return tokens * 4 * spec.embed_dim * dtype_bytes


def forward_batch_size(spec: BackboneSpec, device: str | torch.device = "cpu", *, dtype_bytes: int = 4,
                       max_batch: int = 1024) -> int:
    """Crops per forward pass for throughput, chosen from the model and the memory it runs in.

    CPU: the largest activation of a batch (:func:`activation_bytes_per_crop`) stays within a quarter of the
    last-level cache (:func:`cpu_cache_bytes`). Throughput falls once it spills: on a 2-core EPYC with a 32 MiB
    L3, ``mra_vit_t4_p2`` reached 79-83 % of the GEMM peak at 6-20 crops per batch and 67 % at 24;
    ``vit_small_patch8_dino`` at 224 px reached 83-89 % at 1-4 crops and 71 % at 8 (benchmarks/RESULTS.md).
    GPU: larger batches fill the card; the batch keeps eight times that activation (the other live tensors)
    within a quarter of the free memory.

    Parameters
    ----------
    spec : BackboneSpec
    device : str or torch.device
    dtype_bytes : int
        Bytes per activation value (4 for float32, 2 under bfloat16 autocast).
    max_batch : int
        Upper bound.

    Returns
    -------
    int
        Between 1 and ``max_batch``.
    """
    per_crop = activation_bytes_per_crop(spec, dtype_bytes=dtype_bytes)
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        budget, per_crop = free // 4, per_crop * 8
    else:
        budget = cpu_cache_bytes() // 4
    return int(min(max_batch, max(1, budget // per_crop)))


def to_model_input(crops: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """Turn preprocessed crops into what the backbone expects; used at training AND at inference.

    For ViTs: bilinear resize (antialiased) to ``spec.res``, grey replicated to 3 channels, then
    ``(x - mean) / std`` with ``spec``'s (ImageNet) statistics. For ``classical``: the crops unchanged.

    Parameters
    ----------
    crops : (B, 1, P, P) float tensor
        Preprocessed crops, intensities in [0, 1].
    spec : BackboneSpec
        The backbone's spec (carries ``res``, ``mean``, ``std``).

    Returns
    -------
    x : (B, 3, res, res) float tensor for ViTs; (B, 1, P, P) for ``classical``.
    """
    if crops.ndim != 4 or crops.shape[1] != 1:
        raise ValueError(f"crops must have shape (B, 1, P, P); got {tuple(crops.shape)}")
    x = crops.float()
    if spec.kind == "classical":
        return x
    if tuple(x.shape[-2:]) != (spec.res, spec.res):
        x = F.interpolate(x, size=(spec.res, spec.res), mode="bilinear", align_corners=False, antialias=True)
    return normalize_input(x, spec)


def normalize_input(x: torch.Tensor, spec: BackboneSpec) -> torch.Tensor:
    """Grey ``(B, 1, S, S)`` -> ``(B, 3, S, S)`` normalised with ``spec``'s mean and std, without resizing.

    The second half of :func:`to_model_input`; DINO pretraining feeds its (smaller) local views through it so
    that pretraining and feature extraction see the same intensity transform.
    """
    x = x.float().expand(-1, 3, -1, -1)
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std



class Backbone(nn.Module):
    """A frozen feature extractor: ``(B, 1, P, P)`` crops in [0, 1] -> ``(B, C, h, w)`` features.

    Parameters are frozen (``requires_grad=False``) and the module stays in eval mode: :meth:`train` is a
    no-op, so a Lightning module holding it may call ``.train()`` freely. ``forward`` runs without autograd.

    Attributes
    ----------
    spec : BackboneSpec
        Its spec, with the ``res`` actually used.
    weights_id : str
        Identifies the weights (``"random:seed=0"``, ``"file:<name>:sha256=<digest>"``,
        ``"hub:<repo>/<file>:sha256=<digest>"``, ``"none"``); part of the feature-cache key.
    """

    def __init__(self, spec: BackboneSpec, weights_id: str) -> None:
        super().__init__()
        self.spec = spec
        self.weights_id = weights_id

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> Backbone:  # noqa: ARG002 - frozen: always eval
        """Keep eval mode whatever ``mode`` says (the backbone is frozen)."""
        return super().train(False)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def feature_dim(self) -> int:
        """Feature channels ``C``."""
        return self.spec.embed_dim

    def output_shape(self, crop_size: int) -> tuple[int, int, int]:  # noqa: ARG002 - same for every P
        """Shape ``(C, h, w)`` of one crop's features (independent of ``crop_size``)."""
        return (self.spec.embed_dim, self.spec.grid, self.spec.grid)

    def cache_key(self) -> dict[str, object]:
        """What the features depend on besides the crops (backbone name, res, weights)."""
        return {"backbone": self.spec.name, "res": self.spec.res, "weights": self.weights_id}

    def _check_crops(self, crops: torch.Tensor) -> None:
        if crops.ndim != 4 or crops.shape[1] != 1 or crops.shape[2] != crops.shape[3]:
            raise ValueError(f"crops must have shape (B, 1, P, P); got {tuple(crops.shape)}")

    def extra_repr(self) -> str:
        return f"name={self.spec.name!r}, res={self.spec.res}, weights={self.weights_id!r}"
