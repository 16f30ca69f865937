"""Label-free crop sampling: weights from an a-priori image statistic, never from labels.

Vessels are about 1 % of brain voxels, so uniformly drawn crops (and the point pairs STEGO's correspondence loss
samples from them) are almost all background. These functions weight crops by how much bright lumen they
contain, judged from the image alone:

    t_v = q-th percentile of the brain intensities of volume v         (q = 99 by default, fixed a priori)
    s_i = fraction of the pixels of crop i (from volume v) above t_v
    w_i = s_i + floor * mean(s)                                         (every crop keeps a chance)

Functions take images, masks and crops; none accepts a label, so a label cannot leak into a weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from stego_core._checks import check_choice, check_range
from stego_core.data.preprocess import bright_percentile

SAMPLING_METHODS = ("none", "bright")


@dataclass(frozen=True)
class SamplingConfig:
    """Label-free crop sampling (:mod:`stego_core.data.sampling`): crops are weighted by the fraction of their pixels
    above the ``quantile``-th percentile of their volume's brain intensities, plus ``floor`` times the mean.

    ``method: none`` draws uniformly. ``max_crops`` (STEGO training) keeps that many crops, drawn by weight
    without replacement, before features are computed; when every crop is kept (0, or no more crops than
    ``max_crops``) the loader draws batches by weight instead.
    """

    method: str = "bright"
    quantile: float = 99.0
    floor: float = 0.05
    max_crops: int = 0

    def __post_init__(self) -> None:
        check_choice(self.method, "sampling.method", SAMPLING_METHODS)
        check_range(self.quantile, "sampling.quantile", 0.0, 100.0, low_inclusive=False, high_inclusive=False)
        check_range(self.floor, "sampling.floor", 0.0)
        check_range(self.max_crops, "sampling.max_crops", 0)



__all__ = ["SAMPLING_METHODS", "bright_threshold", "crop_weights", "draw_crops", "select_crops"]

#: ``none``: uniform; ``bright``: fraction of pixels above the volume's ``q``-th brain percentile.


def bright_threshold(image: np.ndarray, brain_mask: np.ndarray | None, q: float = 99.0) -> float:
    """The ``q``-th percentile of the brain intensities of one preprocessed volume (the next lower intensity
    when nothing exceeds it, as for saturated images).

    Parameters
    ----------
    image : (I, J, K) float ndarray
    brain_mask : (I, J, K) bool ndarray or None
        Without a mask all voxels count.
    q : float in (0, 100)
    """
    if not 0.0 < q < 100.0:
        raise ValueError(f"q={q!r} must be in (0, 100)")
    values = image[brain_mask] if brain_mask is not None else image.ravel()
    if values.size == 0:
        raise ValueError("the brain mask is empty: no intensities to take a percentile of")
    return bright_percentile(values, q)


def crop_weights(crops: np.ndarray, thresholds: np.ndarray | float, *, method: str = "bright",
                 floor: float = 0.05) -> np.ndarray:
    """Sampling weights of crops from their intensities alone.

    Parameters
    ----------
    crops : (N, P, P) float ndarray
        Preprocessed crops.
    thresholds : float or (N,) float ndarray
        Bright threshold of each crop's volume (:func:`bright_threshold`).
    method : {"none", "bright"}
    floor : float >= 0
        Added weight, as a fraction of the mean statistic, so that crops without bright pixels stay possible.

    Returns
    -------
    weights : (N,) float64 ndarray
        Non-negative, summing to 1.
    """
    if method not in SAMPLING_METHODS:
        raise ValueError(f"sampling method {method!r} is not one of {SAMPLING_METHODS}")
    if floor < 0:
        raise ValueError(f"floor={floor!r} must be >= 0")
    crops = np.asarray(crops)
    if crops.ndim != 3:
        raise ValueError(f"crops must have shape (N, P, P); got {crops.shape}")
    n = len(crops)
    if n == 0:
        raise ValueError("no crops to weight")
    if method == "none":
        return np.full(n, 1.0 / n)
    t = np.broadcast_to(np.asarray(thresholds, dtype=np.float64), (n,))
    stat = (crops.reshape(n, -1) > t[:, None]).mean(axis=1)
    mean = stat.mean()
    w = stat + floor * mean if mean > 0 else np.ones(n)
    return w / w.sum()


def draw_crops(weights: np.ndarray, n: int, *, seed: int = 0) -> np.ndarray:
    """``min(n, N)`` distinct crop indices drawn by ``weights`` without replacement, sorted."""
    weights = np.asarray(weights, dtype=np.float64)
    if n >= len(weights):
        return np.arange(len(weights))
    nz = int((weights > 0).sum())
    rng = np.random.default_rng(seed)
    if nz < n:  # not enough positive weights: take them all and fill uniformly from the rest
        pos = np.flatnonzero(weights > 0)
        rest = rng.choice(np.flatnonzero(weights <= 0), size=n - nz, replace=False)
        return np.sort(np.concatenate([pos, rest]))
    return np.sort(rng.choice(len(weights), size=n, replace=False, p=weights / weights.sum()))


def select_crops(crops: np.ndarray, case_ids: np.ndarray, volumes: Mapping[str, tuple[np.ndarray, np.ndarray | None]],
                 sampling: SamplingConfig, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Weights of crops and the crops kept, from the images of their volumes only.

    Parameters
    ----------
    crops : (N, P, P) float ndarray
    case_ids : (N,) str ndarray
        Volume of each crop.
    volumes : mapping case id -> (image (I, J, K), brain_mask (I, J, K) or None)
        Preprocessed images; the per-volume bright threshold is their ``sampling.quantile``-th brain percentile.
    sampling : SamplingConfig
        ``method``, ``quantile``, ``floor`` and ``max_crops`` (0 keeps every crop).
    seed : int

    Returns
    -------
    weights : (M,) float64 ndarray
        Sampling weights of the kept crops, summing to 1 (uniform for ``method: none``).
    pick : (M,) int ndarray
        Sorted indices of the kept crops: ``max_crops`` of them drawn by weight without replacement.
    """
    thresholds = {cid: bright_threshold(img, mask, sampling.quantile) for cid, (img, mask) in volumes.items()}
    t = np.array([thresholds[str(c)] for c in case_ids], dtype=np.float64)
    weights = crop_weights(crops, t, method=sampling.method, floor=sampling.floor)
    pick = draw_crops(weights, sampling.max_crops, seed=seed) if sampling.max_crops else np.arange(len(crops))
    kept = weights[pick]
    return kept / kept.sum(), pick
