"""Frozen feature extractors ("backbones") by name: the table of specs and :func:`build_backbone`, the one door.

A backbone maps preprocessed MRA crops to a grid of feature vectors::

    crops (B, 1, P, P) float in [0, 1]  ->  features (B, C, h, w)

Two families share that contract (:class:`~stego_core.features.base.Backbone`, in :mod:`stego_core.features.base`
with the spec, the input transform and the forward batch size):

- DINO / DINOv2 vision transformers from timm (STEGO's backbone, Hamilton et al., ICLR 2022) and the in-domain
  ViTs that ``pretrain`` trains: :mod:`stego_core.features.vit` (model creation, weights from files, the hub
  or DINO release ``.pth``). The input transform :func:`~stego_core.features.base.to_model_input` (bilinear
  resize to ``res``, grey replicated to 3 channels, ImageNet normalisation) is the one used at training AND at
  inference.
- ``classical``: a weight-free multi-scale featurizer (intensity, Gaussian-smoothed intensity, gradient
  magnitude, Hessian eigenvalues, a vesselness response), so that STEGO can run meaningfully offline:
  :mod:`stego_core.features.classical`.

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

import dataclasses
import difflib
import logging
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

import torch  # noqa: F401 - the examples above

from stego_core.features.base import Backbone, BackboneSpec
from stego_core.features.classical import CLASSICAL_SIGMAS_VOX, ClassicalFeaturizer
from stego_core.features.vit import build_vit

__all__ = [
    "BACKBONES",
    "DEFAULT_BACKBONE",
    "Backbone",
    "BackboneSpec",
    "build_backbone",
    "get_spec",
    "list_backbones",
]

logger = logging.getLogger(__name__)

DEFAULT_BACKBONE = "vit_small_patch8_dino"


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
        original DINO release ``.pth``. A ``runs:/<pretrain run id>`` is refused here: the platform turns it into
        that run's teacher backbone file first (:func:`stego_core.platform.weights.fetch_weights`). Ignored by
        ``classical``, which has no weights (logged).
    res : int, optional
        Model input side in pixels, a multiple of the patch size (default: the spec's, 224); for
        ``classical`` the output grid side (default 16). Smaller ``res`` (e.g. 112) runs faster on CPU.
    seed : int
        Seed of the random init (``weights="random"`` only; the global RNG is left untouched).
    standardize : {"crop", "fixed"}
        ``classical`` only: see :class:`~stego_core.features.classical.ClassicalFeaturizer`.

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
    return build_vit(spec, weights=weights, seed=seed)
