"""Frozen feature extractors ("backbones") built by name, with their weights resolved in one place.

A backbone maps preprocessed MRA crops to a grid of feature vectors::

    crops (B, 1, P, P) float in [0, 1]  ->  features (B, C, h, w)

Two families share that contract:

- DINO / DINOv2 vision transformers from timm (STEGO's backbone, Hamilton et al., ICLR 2022). Features are
  the last block's patch tokens after the final norm, prefix (CLS) tokens dropped, reshaped to
  ``(B, C, res / p, res / p)``. The input transform :func:`to_model_input` (bilinear resize to ``res``, grey
  replicated to 3 channels, ImageNet normalisation) is the one used at training AND at inference.
- ``classical``: a weight-free multi-scale featurizer (intensity, Gaussian-smoothed intensity, gradient
  magnitude, Hessian eigenvalues, a vesselness response), so that STEGO can run meaningfully offline.

Weights come from exactly one place, chosen by :func:`build_backbone`'s ``weights`` argument: the Hugging
Face hub (``"hub"``, the default; fails fast offline with instructions), a local file (timm state dict,
``.safetensors`` or the original DINO release ``.pth``) or ``"random"`` (explicit, for tests). There is never
a silent fallback to random weights. ``runs:/<pretrain run id>`` becomes such a file in the platform
(:func:`stego_core.platform.weights.fetch_weights`, downloaded once into a cache keyed by run id).

Examples
--------
>>> bb = build_backbone("vit_small_patch16_dino", weights="random", res=32)
>>> bb(torch.rand(2, 1, 20, 20)).shape
torch.Size([2, 384, 2, 2])
>>> build_backbone("classical", res=8)(torch.rand(2, 1, 16, 16)).shape
torch.Size([2, 21, 8, 8])
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import logging
import math
import os
import socket
import threading
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "Backbone",
    "BackboneSpec",
    "ClassicalFeaturizer",
    "ViTBackbone",
    "activation_bytes_per_crop",
    "build_backbone",
    "cpu_cache_bytes",
    "create_vit",
    "forward_batch_size",
    "gaussian_derivative_kernels",
    "get_spec",
    "list_backbones",
    "load_weights_file",
    "normalize_input",
    "to_model_input",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_BACKBONE = "vit_small_patch8_dino"
#: Gaussian scales of the classical featurizer, in voxels of the crop.
CLASSICAL_SIGMAS_VOX = (0.5, 1.0, 2.0, 3.0)
_HUB_FILENAMES = ("model.safetensors", "pytorch_model.bin")
_HUB_PROBE_TIMEOUT_S = 3.0
#: Where a pretraining run keeps its teacher backbone (``runs:/<id>`` without a path means this artifact).
WEIGHTS_ARTIFACT = "backbone/teacher_backbone.safetensors"
#: Environment variable naming the folder that ``runs:/`` weights are downloaded into.
WEIGHTS_CACHE_ENV = "STEGO_WEIGHTS_CACHE"
#: Its default, relative to the working directory like the default tracking store ``sqlite:///mlflow.db``.
DEFAULT_WEIGHTS_CACHE = "outputs/weights_cache"


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


def _vit(name: str, timm_name: str, vit_patch: int, embed_dim: int, url: str) -> BackboneSpec:
    return BackboneSpec(name=name, timm_name=timm_name, vit_patch=vit_patch, embed_dim=embed_dim,
                        weights_url=url)


def _mra_vit(name: str, vit_patch: int, depth: int, embed_dim: int, heads: int, res: int = 32) -> BackboneSpec:
    """An in-domain ViT at the crop's own scale, to pretrain with DINO (``pretrain``); grey [0, 1] input is
    normalised with mean 0.5 / std 0.25 instead of ImageNet statistics."""
    return BackboneSpec(name=name, timm_name="vit_tiny_patch16_224", vit_patch=vit_patch, embed_dim=embed_dim,
                        res=res, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        timm_kwargs=(("patch_size", vit_patch), ("depth", depth), ("embed_dim", embed_dim),
                                     ("num_heads", heads)))


_DINO = "https://dl.fbaipublicfiles.com/dino"
#: Read-only table of known backbones, name -> spec.
BACKBONES: Mapping[str, BackboneSpec] = MappingProxyType({
    s.name: s for s in (
        _vit("vit_small_patch8_dino", "vit_small_patch8_224.dino", 8, 384,
             f"{_DINO}/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth"),
        _vit("vit_small_patch16_dino", "vit_small_patch16_224.dino", 16, 384,
             f"{_DINO}/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth"),
        _vit("vit_base_patch8_dino", "vit_base_patch8_224.dino", 8, 768,
             f"{_DINO}/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth"),
        _vit("vit_base_patch16_dino", "vit_base_patch16_224.dino", 16, 768,
             f"{_DINO}/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth"),
        _vit("vit_small_patch14_dinov2", "vit_small_patch14_dinov2.lvd142m", 14, 384,
             "https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth"),
        # In-domain ViTs (no published weights: pretrain them with `pretrain`, or weights="random").
        _mra_vit("mra_vit_t4_p2", 2, 4, 192, 3),
        # pixel-fine tokens: patch 1 on 16-pixel crops, one token per voxel (16 x 16 tokens, as the p2 on 32)
        _mra_vit("mra_vit_t4_p1", 1, 4, 192, 3, res=16),
        _mra_vit("mra_vit_t4_p4", 4, 4, 192, 3),
        _mra_vit("mra_vit_t12_p4", 4, 12, 192, 3),
        _mra_vit("mra_vit_s12_p8", 8, 12, 384, 6, res=64),
        BackboneSpec(name="classical", timm_name=None, vit_patch=1,
                     embed_dim=1 + 5 * len(CLASSICAL_SIGMAS_VOX), res=16, mean=(0.0,), std=(1.0,),
                     kind="classical"),
    )
})


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`, sorted."""
    return sorted(BACKBONES)


def get_spec(name: str, *, res: int | None = None) -> BackboneSpec:
    """Return the spec called ``name``, with ``res`` overridden when given.

    Raises
    ------
    ValueError
        For an unknown name (listing the valid names and the closest matches) or a ``res`` that is not a
        positive multiple of the patch size.
    """
    if name not in BACKBONES:
        close = difflib.get_close_matches(str(name), BACKBONES.keys(), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown backbone {name!r}.{hint} Valid names: {', '.join(list_backbones())}")
    spec = BACKBONES[name]
    if res is not None:
        if isinstance(res, bool) or not isinstance(res, int) or res <= 0 or res % spec.vit_patch:
            raise ValueError(f"res={res!r} for backbone {name!r} must be a positive multiple of its patch size "
                             f"{spec.vit_patch}")
        spec = dataclasses.replace(spec, res=res)
    return spec


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


class ViTBackbone(Backbone):
    """A timm ViT (DINO / DINOv2) as a frozen backbone; build it with :func:`build_backbone`.

    Parameters
    ----------
    spec : BackboneSpec
        Its spec (``kind == "vit"``).
    model : timm VisionTransformer
        Built with ``img_size=spec.res, num_classes=0``, weights already loaded.
    weights_id : str
        See :class:`Backbone`.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str) -> None:
        super().__init__(spec, weights_id)
        self.model = model
        self._freeze()

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Features of crops.

        Parameters
        ----------
        crops : (B, 1, P, P) float tensor
            Preprocessed crops in [0, 1].

        Returns
        -------
        features : (B, C, res / p, res / p) float tensor
            Last-block patch tokens after the final norm; prefix (CLS) tokens dropped.
        """
        self._check_crops(crops)
        with torch.no_grad():
            x = to_model_input(crops, self.spec)
            tokens = self.model.forward_features(x)  # (B, prefix + h*w, C), final norm applied
            tokens = tokens[:, self.model.num_prefix_tokens:]
            b, n, c = tokens.shape
            g = self.spec.grid
            if n != g * g:
                raise RuntimeError(f"{self.spec.name}: expected {g * g} patch tokens, got {n}")
            return tokens.transpose(1, 2).reshape(b, c, g, g)


# ----------------------------------------------------------------------------------------------------------
# Weight-free classical featurizer


def gaussian_derivative_kernels(sigma: float) -> torch.Tensor:
    """Correlation kernels (3, K) for the 0th, 1st and 2nd Gaussian derivative at scale ``sigma`` (voxels).

    Moment-normalised so that on the sampled grid they give exactly 1 for a constant, ``x`` and ``x**2 / 2``
    (a sampled Gaussian with ``sigma`` below one voxel is otherwise far from normalised).
    """
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    d1 = x * g  # correlation weights of d/dx (the derivative kernel flipped)
    d1 = d1 / (x * d1).sum()
    d2 = (x**2 / sigma**4 - 1.0 / sigma**2) * g
    d2 = d2 - g * d2.sum()  # zero response to a constant
    d2 = 2.0 * d2 / (x**2 * d2).sum()  # response 2 to x**2, i.e. d2/dx2 exact on quadratics
    return torch.stack([g, d1, d2]).float()


class ClassicalFeaturizer(Backbone):
    """Weight-free multi-scale features, same contract as a ViT backbone.

    For each crop (at its own resolution, scales in crop voxels) and each ``sigma`` in
    :data:`CLASSICAL_SIGMAS_VOX`: Gaussian-smoothed intensity, scale-normalised gradient magnitude
    ``sigma * |grad L|``, the scale-normalised Hessian eigenvalues ``sigma**2 * lambda_{1,2}`` sorted by
    magnitude (``|l1| <= |l2|``) and a bright-tube response ``max(-l2, 0) * exp(-(l1 / l2)**2 / (2 beta**2))``
    (Frangi et al., MICCAI 1998, 2D blobness term; ``beta = 0.5``; linear in contrast, so no image-dependent
    ``c`` constant is needed). Plus the raw intensity: ``1 + 5 * len(sigmas)`` channels. Derivatives are
    separable convolutions with sampled Gaussian-derivative kernels (edge-replicate padding), so it batches
    and runs on GPU. Maps are average-pooled to ``spec.res x spec.res`` (adaptive pooling) and finally
    standardised per channel (see ``standardize``). Everything is a function of the crop alone.

    Parameters
    ----------
    spec : BackboneSpec
        The ``classical`` spec; ``spec.res`` is the output grid side.
    standardize : {"crop", "fixed"}
        ``"crop"`` (default): z-score each channel over the grid of each crop (instance normalisation).
        ``"fixed"``: divide each channel by a constant typical scale (absolute values kept across crops). On
        synthetic tube crops, spherical 2-means on the tokens matched the tube tokens with Dice 0.57 for
        ``"crop"`` against 0.29 for ``"fixed"`` (the intensity channels dominate the cosine there).
    beta : float
        Tube-versus-blob sensitivity of the vesselness response.
    """

    def __init__(self, spec: BackboneSpec, *, standardize: str = "crop", beta: float = 0.5) -> None:
        super().__init__(spec, weights_id="none")
        if standardize not in ("fixed", "crop"):
            raise ValueError(f"standardize={standardize!r}; expected 'fixed' or 'crop'")
        self.standardize = standardize
        self.beta = float(beta)
        self.sigmas_vox = CLASSICAL_SIGMAS_VOX
        for i, s in enumerate(self.sigmas_vox):
            g, d1, d2 = k = gaussian_derivative_kernels(s)
            zero = torch.zeros_like(g)
            # One pass down the rows (smooth, d/dy, d2/dy2), then one grouped pass along the columns: from the
            # smoothed rows (g, d/dx, d2/dx2), from d/dy (g, d/dx), from d2/dy2 (g); zero kernels pad the groups.
            self.register_buffer(f"_ky{i}", k.view(3, 1, -1, 1), persistent=False)
            self.register_buffer(f"_kx{i}", torch.stack([g, d1, d2, g, d1, zero, g, zero, zero]).view(9, 1, 1, -1),
                                 persistent=False)
        names = ["intensity"]
        for s in self.sigmas_vox:
            names += [f"{k}_s{s:g}" for k in ("smooth", "gradmag", "hess_l1", "hess_l2", "vesselness")]
        self.channel_names: tuple[str, ...] = tuple(names)
        # Typical magnitudes on [0, 1] crops (intensity-like ~0.5, derivatives ~0.1), used by "fixed".
        scale = [0.5] + [v for _ in self.sigmas_vox for v in (0.5, 0.1, 0.05, 0.1, 0.1)]
        self.register_buffer("_scale", torch.tensor(scale).view(1, -1, 1, 1), persistent=False)
        self.weights_id = f"none:classical:standardize={standardize}:beta={self.beta:g}"
        self._freeze()

    def _derivatives(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, ...]:
        """``(L, Lx, Ly, Lxx, Lyy, Lxy)`` at scale ``sigmas_vox[i]``: two separable convolution calls (rows,
        then grouped columns) instead of one call per derivative and direction (4x faster on a CPU, same
        values)."""
        ky, kx = getattr(self, f"_ky{i}"), getattr(self, f"_kx{i}")
        r = ky.shape[2] // 2
        rows = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), ky)  # (B, 3, P, P): g, d1, d2 along y
        o = F.conv2d(F.pad(rows, (r, r, 0, 0), mode="replicate"), kx, groups=3)
        return o[:, 0:1], o[:, 1:2], o[:, 3:4], o[:, 2:3], o[:, 6:7], o[:, 4:5]

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        """Classical features of crops.

        Parameters
        ----------
        crops : (B, 1, P, P) float tensor
            Preprocessed crops in [0, 1].

        Returns
        -------
        features : (B, 1 + 5 * n_sigmas, res, res) float32 tensor
            Channels in the order of :attr:`channel_names`.
        """
        self._check_crops(crops)
        with torch.no_grad():
            x = to_model_input(crops, self.spec)
            chans = [x]
            for i, s in enumerate(self.sigmas_vox):
                smooth, lx, ly, lxx, lyy, lxy = self._derivatives(x, i)  # last dim is x (columns)
                gradmag = s * torch.sqrt(lx**2 + ly**2 + 1e-12)
                half_tr = 0.5 * (lxx + lyy) * s**2
                rad = torch.sqrt((0.5 * (lxx - lyy)) ** 2 + lxy**2 + 1e-12) * s**2
                ea, eb = half_tr + rad, half_tr - rad
                swap = ea.abs() > eb.abs()
                l1, l2 = torch.where(swap, eb, ea), torch.where(swap, ea, eb)  # |l1| <= |l2|
                rb = l1 / torch.where(l2.abs() < 1e-8, torch.full_like(l2, 1e-8), l2)
                vessel = torch.relu(-l2) * torch.exp(-(rb**2) / (2.0 * self.beta**2))
                chans += [smooth, gradmag, l1, l2, vessel]
            f = torch.cat(chans, dim=1)
            f = F.adaptive_avg_pool2d(f, (self.spec.res, self.spec.res))
            if self.standardize == "fixed":
                return f / self._scale
            mean = f.mean(dim=(2, 3), keepdim=True)
            std = f.std(dim=(2, 3), keepdim=True, unbiased=False)
            return (f - mean) / (std + 1e-6)


# ----------------------------------------------------------------------------------------------------------
# Weights


def _unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint, preferring DINO's ``teacher``; strip wrapper prefixes."""
    sd = obj
    for _ in range(4):  # nested wrappers, e.g. {"state_dict": {"model": {...}}}
        if not isinstance(sd, Mapping):
            break
        wrapper = next((k for k in ("teacher", "state_dict", "model", "module", "student")
                        if isinstance(sd.get(k), Mapping)), None)
        if wrapper is None:
            break
        logger.info("weights %s: using the %r entry of the checkpoint", path.name, wrapper)
        sd = sd[wrapper]
    if not isinstance(sd, Mapping):
        raise ValueError(f"weights file {path} does not hold a state dict (found {type(obj).__name__})")
    out = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        changed = True
        while changed:
            changed = False
            for prefix in ("module.", "backbone."):
                if k.startswith(prefix):
                    k, changed = k[len(prefix):], True
        out[k] = v
    if not out:
        raise ValueError(f"weights file {path} holds no tensors")
    return out


def _sha256(path: Path, n_hex: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:n_hex]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):  # DINO full checkpoints keep their args
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        text = str(exc).strip()
        reason = f"{type(exc).__name__}: {text.splitlines()[0].split('. ')[0][:200]}" if text else type(exc).__name__
        raise ValueError(f"{path} is not a weights file: expected a .safetensors file, a torch state dict "
                         f"(.pth / .pt / .bin) or a DINO release checkpoint, but reading it failed ({reason})"
                         ) from None
    return _unwrap_state_dict(obj, path)


def _check_safetensors_spec(path: Path, model: nn.Module, backbone_name: str) -> None:
    """Refuse a ``.safetensors`` file whose recorded spec (written by ``pretrain``) names another patch/width."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
    meta = {**meta, "vit_patch": meta.get("vit_patch", meta.get("patch_size"))}  # files written before the rename
    if meta["vit_patch"] is None:
        return
    patch = model.patch_embed.proj.kernel_size[0]
    dim = model.patch_embed.proj.out_channels
    if int(meta["vit_patch"]) != patch or int(meta.get("embed_dim", dim)) != dim:
        raise ValueError(f"weights file {path} holds backbone {meta.get('backbone', '?')!r} (patch "
                         f"{meta['vit_patch']}, dim {meta.get('embed_dim')}) but backbone {backbone_name!r} has "
                         f"patch {patch}, dim {dim}; use model.backbone={meta.get('backbone', '?')}")


def load_weights_file(model: nn.Module, path: str | Path, *, backbone_name: str = "?") -> None:
    """Load a local weights file into a timm ViT, checking that it fits.

    Accepts a timm state dict (``.pth``/``.pt``/``.bin``), a ``.safetensors`` file or an original DINO /
    DINOv2 release ``.pth`` (possibly wrapped in ``teacher``/``student``/``state_dict``/``model`` with
    ``module.``/``backbone.`` prefixes, which are stripped). ``head.*`` keys are ignored; ``pos_embed`` is
    resampled (timm's ``resample_abs_pos_embed``) when the model's ``res`` differs from the file's. Logs the
    source and unexpected keys.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is unreadable, misses model keys, or a tensor's shape does not fit (e.g. another
        architecture or patch size).
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} for backbone {backbone_name!r} does not exist")
    sd = _read_tensors(path)
    if path.suffix == ".safetensors":
        _check_safetensors_spec(path, model, backbone_name)
        sd = _unwrap_state_dict(sd, path)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    model_sd = model.state_dict()
    # Refuse a different patch size up front: timm's filter would silently resample the patch embedding.
    pe = sd.get("patch_embed.proj.weight")
    if pe is not None and tuple(pe.shape) != tuple(model_sd["patch_embed.proj.weight"].shape):
        raise ValueError(f"weights file {path} does not fit backbone {backbone_name!r}: patch_embed.proj.weight "
                         f"has shape {tuple(pe.shape)}, the model expects "
                         f"{tuple(model_sd['patch_embed.proj.weight'].shape)} (another patch size or width?)")
    try:
        sd = checkpoint_filter_fn(sd, model)
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"weights file {path} does not fit backbone {backbone_name!r}: {exc}") from exc
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
                  for k, v in sd.items() if k in model_sd and tuple(v.shape) != tuple(model_sd[k].shape)]
    missing = [k for k in model_sd if k not in sd and not k.startswith("head.")]
    unexpected = [k for k in sd if k not in model_sd]
    if bad_shapes or missing:
        parts = []
        if bad_shapes:
            parts.append(f"{len(bad_shapes)} shape mismatches ({'; '.join(bad_shapes[:4])})")
        if missing:
            parts.append(f"{len(missing)} missing keys ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''})")
        raise ValueError(f"weights file {path} does not fit backbone {backbone_name!r}: {' and '.join(parts)}")
    model.load_state_dict(sd, strict=False)
    if unexpected:
        logger.warning("weights %s: %d unexpected keys ignored: %s", path, len(unexpected), unexpected[:10])
    logger.info("backbone %s: loaded weights from %s (%d tensors, missing keys: none)", backbone_name, path,
                len(sd))


def _truthy(value: str | None) -> bool:
    return str(value or "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_offline() -> bool:
    import huggingface_hub.constants as hf_constants

    return (_truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))
            or bool(getattr(hf_constants, "HF_HUB_OFFLINE", False)))


def _hub_reachable(endpoint: str, timeout_s: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """True when a TCP connection to the hub endpoint opens within ``timeout_s`` (DNS included)."""
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)

    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                result.append(True)
        except OSError:
            pass

    # A daemon thread bounds the wait, DNS resolution included, and never blocks interpreter exit.
    thread = threading.Thread(target=probe, name="hf-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return bool(result)


def _resolve_hub_file(spec: BackboneSpec, hf_hub_id: str) -> Path:
    """Path of the hub weights file: from the local HF cache, else downloaded; fails fast offline."""
    import huggingface_hub
    import huggingface_hub.constants as hf_constants

    for filename in _HUB_FILENAMES:
        cached = huggingface_hub.try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(cached, str) and Path(cached).is_file():
            logger.info("backbone %s: hub weights %s/%s found in the local cache", spec.name, hf_hub_id, filename)
            return Path(cached)
    example = Path(urllib.parse.urlparse(spec.weights_url or "").path).name or "weights.pth"
    how = (f"Pass a local weights file instead: build_backbone({spec.name!r}, weights='/path/to/{example}') "
           f"(the original release is {spec.weights_url}; a timm state dict or .safetensors file from "
           f"hub repo {hf_hub_id} also works), or weights='random' for tests only.")
    if _hub_offline():
        raise RuntimeError(f"pretrained weights for backbone {spec.name!r} (hub repo {hf_hub_id}) are not in the "
                           f"local Hugging Face cache and HF_HUB_OFFLINE is set. {how}")
    endpoint = getattr(hf_constants, "ENDPOINT", "https://huggingface.co")
    if not _hub_reachable(endpoint):
        raise RuntimeError(f"pretrained weights for backbone {spec.name!r} (hub repo {hf_hub_id}) are not in the "
                           f"local Hugging Face cache and {endpoint} is unreachable (offline?). {how}")
    try:
        return Path(huggingface_hub.hf_hub_download(hf_hub_id, _HUB_FILENAMES[0]))
    except Exception as exc:  # noqa: BLE001 - re-raised with instructions
        raise RuntimeError(f"downloading weights for backbone {spec.name!r} from hub repo {hf_hub_id} failed "
                           f"({type(exc).__name__}: {exc}). {how}") from exc


def create_vit(spec: BackboneSpec, *, seed: int = 0, dynamic_img_size: bool = False) -> nn.Module:
    """The bare timm ViT of ``spec`` (random init with ``seed``; the global RNG is left untouched).

    ``dynamic_img_size=True`` lets inputs of other sizes through (DINO's local views); the state dict is the
    same either way.
    """
    import timm

    if spec.kind != "vit" or spec.timm_name is None:
        raise ValueError(f"backbone {spec.name!r} is not a ViT")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(spec.timm_name, pretrained=False, img_size=spec.res, num_classes=0,
                                 dynamic_img_size=dynamic_img_size, **dict(spec.timm_kwargs))


def build_backbone(name: str = DEFAULT_BACKBONE, *, weights: str | Path = "hub", res: int | None = None,
                   seed: int = 0, standardize: str = "crop") -> Backbone:
    """Build a frozen backbone by name; the single door to backbones and their weights.

    Parameters
    ----------
    name : str
        One of :func:`list_backbones` (default ``"vit_small_patch8_dino"``, timm ``vit_small_patch8_224.dino``).
    weights : {"hub", "random"} or path
        ``"hub"``: timm's pretrained weights from the Hugging Face hub (the local HF cache first; offline and
        not cached, fails within seconds with instructions). ``"random"``: random init, only when asked for
        (tests). A path: a local timm state dict (``.pth``/``.pt``/``.bin``), ``.safetensors`` file, or the
        original DINO release ``.pth``. ``runs:/<pretrain run id>``: that run's teacher backbone (see
        :func:`resolve_weights`). Ignored by ``classical``, which has no weights (logged).
    res : int, optional
        Model input side in pixels, a multiple of the patch size (default: the spec's, 224); for
        ``classical`` the output grid side (default 16). Smaller ``res`` (e.g. 112) runs faster on CPU.
    seed : int
        Seed of the random init (``weights="random"`` only; the global RNG is left untouched).
    standardize : {"crop", "fixed"}
        ``classical`` only: see :class:`ClassicalFeaturizer`.

    Returns
    -------
    Backbone
        Frozen, in eval mode; ``backbone(crops (B, 1, P, P)) -> (B, C, h, w)``.

    Raises
    ------
    ValueError
        Unknown name (valid names and close matches listed), bad ``res``, or a weights file that does not fit.
    FileNotFoundError
        A weights path that does not exist.
    RuntimeError
        ``weights="hub"`` when the weights are neither cached nor downloadable (says how to pass a file).
    """
    spec = get_spec(name, res=res)
    if spec.kind == "classical":
        if str(weights) not in ("hub", "none", "random"):
            logger.info("backbone classical has no weights; weights=%r ignored", str(weights))
        return ClassicalFeaturizer(spec, standardize=standardize)

    if isinstance(weights, str) and weights.startswith("runs:/"):
        raise ValueError(f"model.weights={weights!r}: a run's weights are fetched by the platform first "
                         "(stego_core.platform.weights.fetch_weights), then given here as a file")
    model = create_vit(spec, seed=seed)
    if isinstance(weights, str) and weights == "hub" and spec.trainable:
        raise RuntimeError(f"backbone {spec.name!r} is an in-domain ViT without published weights: pretrain it "
                           f"(`mlflow run . -e pretrain -P backbone={spec.name}`) and pass "
                           f"model.weights=runs:/<pretrain run id> or model.weights=/path/to/teacher_backbone."
                           f"safetensors (weights='random' for the untrained control)")
    if isinstance(weights, str) and weights == "random":
        logger.warning("backbone %s: RANDOM weights (seed %d), as explicitly requested", spec.name, seed)
        weights_id = f"random:seed={seed}"
    elif isinstance(weights, str) and weights == "hub":
        hf_hub_id = model.pretrained_cfg.get("hf_hub_id") or f"timm/{spec.timm_name}"
        path = _resolve_hub_file(spec, hf_hub_id)
        logger.info("backbone %s: weights source hub %s (%s)", spec.name, hf_hub_id, path)
        load_weights_file(model, path, backbone_name=spec.name)
        weights_id = f"hub:{hf_hub_id}/{path.name}:sha256={_sha256(path)}"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights={str(weights)!r} for backbone {spec.name!r} is neither 'hub', "
                                    f"'random' nor an existing file")
        logger.info("backbone %s: weights source file %s", spec.name, path)
        load_weights_file(model, path, backbone_name=spec.name)
        weights_id = f"file:{path.name}:sha256={_sha256(path)}"
    return ViTBackbone(spec, model, weights_id)
