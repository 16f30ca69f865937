"""Label-free vessel segmentation of two-photon microscopy (2PM) stacks of cortical vasculature: the ``twophoton``
method of the registry and the ``best_2pm.yaml`` preset.

One fixed recipe for the modality, chosen on the six shared vesselNN stacks (mean over stacks, never per stack;
``docs/domains.md`` has the per-stack table and the ablation), as plain functions on numpy arrays (scikit-image
style). The default recipe (:func:`segment_2pm`) is

1. ``valid_voxels``: voxels at the stack's minimum or maximum value are treated as clipped (detector floor /
   saturation) and left out of every statistic; they are still segmented.
2. ``smooth_slices``: in-plane Gaussian, ``sigma_vox = 1`` voxel (the noise is per voxel, so its scale is in
   voxels; z is not smoothed: its step is ~5x the in-plane step and smoothing across slices erases capillaries).
3. ``slice_thresholds``: one triangle threshold (Zack et al. 1977, ``skimage.filters.threshold_triangle``) per
   z-slice, from that slice's valid voxels. Depth attenuation makes deep slices dimmer; a per-slice rule follows
   it, and the triangle rule suits a histogram with one background peak and a long bright tail.
4. ``threshold_probability``: a logistic score, 0.5 exactly at the threshold, with the width of the slice's
   background noise (1.4826 * MAD of its valid voxels below the threshold): ``prob > 0.5`` is the mask.

Optional steps (off by default; measured, see ``docs/domains.md``): ``flatten_background`` (large-scale Gaussian
subtraction), ``local_threshold`` (a fraction of the local maximum above background: a half-maximum-style rule),
``tubularity`` (2D Sato tubeness at physical scales, added to the mask), ``fill_holes_slices`` and
``remove_small_components``.

Axes are ``(x, y, z)`` as loaded from the NIfTI files, z the slice (optical section) axis, last. Spacings are in
micrometres per axis, or ``None`` when the header unit is unknown: physical sizes are then read as voxels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage import filters

from stego_core._checks import check_choice, check_range
from stego_core.methods.registry import BuildContext, MethodEntry, Result

__all__ = [
    "TwoPhotonSettings",
    "TwoPhotonMethod",
    "TWOPHOTON",
    "um_to_voxels",
    "valid_voxels",
    "smooth_slices",
    "flatten_background",
    "slice_thresholds",
    "local_threshold",
    "threshold_probability",
    "tubularity",
    "fill_holes_slices",
    "remove_small_components",
    "segment_2pm",
    "THRESHOLD",
]

#: ``segment_2pm`` probabilities above this are vessel.
THRESHOLD = 0.5

_RULES = {
    "triangle": filters.threshold_triangle,
    "otsu": filters.threshold_otsu,
    "li": filters.threshold_li,
}


@dataclass(frozen=True)
class TwoPhotonSettings:
    """Settings of :func:`segment_2pm`; the defaults are the recipe.

    Attributes
    ----------
    smooth_vox : float
        In-plane Gaussian sigma in voxels before thresholding (0: none).
    rule : {"triangle", "otsu", "li"}
        Histogram threshold rule applied to each slice's valid voxels.
    per_slice : bool
        One threshold per z-slice (True) or one for the whole stack.
    flatten_um : float or None
        Sigma in um of the Gaussian background subtracted before thresholding (None: no flattening).
    local_radius_um : float or None
        Radius in um of the local maximum of :func:`local_threshold` (None: not used).
    local_fraction : float
        Fraction of (local maximum - slice background) a voxel must exceed with ``local_radius_um``.
    tubular_sigmas_um : tuple of float or None
        Scales in um of the tubularity variant (None: intensity only).
    tubular_min_fraction : float
        A tubular voxel must also be brighter than this fraction of its slice's intensity threshold.
    fill_holes : bool
        Fill enclosed holes slice by slice (hollow-looking lumens).
    min_size_um2 : float
        Remove 2D components smaller than this area in um^2 (0: keep all).
    """

    smooth_vox: float = 1.0
    rule: str = "triangle"
    per_slice: bool = True
    flatten_um: float | None = None
    local_radius_um: float | None = None
    local_fraction: float = 0.25
    tubular_sigmas_um: tuple[float, ...] | None = None
    tubular_min_fraction: float = 0.5
    fill_holes: bool = False
    min_size_um2: float = 0.0

    def __post_init__(self) -> None:
        check_choice(self.rule, "settings.rule", tuple(_RULES))
        check_range(self.smooth_vox, "settings.smooth_vox", 0.0)
        check_range(self.min_size_um2, "settings.min_size_um2", 0.0)
        check_range(self.local_fraction, "settings.local_fraction", 0.0, 1.0)
        check_range(self.tubular_min_fraction, "settings.tubular_min_fraction", 0.0, 1.0)
        for name in ("flatten_um", "local_radius_um"):
            if getattr(self, name) is not None:
                check_range(getattr(self, name), f"settings.{name}", 0.0, low_inclusive=False)
        if self.tubular_sigmas_um is not None and (not self.tubular_sigmas_um or min(self.tubular_sigmas_um) <= 0):
            raise ValueError(f"settings.tubular_sigmas_um={self.tubular_sigmas_um!r} must be positive scales")


#: The tubularity variant: the recipe plus 2D Sato tubeness at 1, 2 and 4 um.
TUBULAR = TwoPhotonSettings(tubular_sigmas_um=(1.0, 2.0, 4.0))


def _check_stack(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D (X, Y, Z), got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("image has non-finite values")
    return image


def um_to_voxels(size_um: float, spacing_um: Sequence[float] | None, ndim: int = 3) -> np.ndarray:
    """A physical length as a length in voxels along each axis.

    Parameters
    ----------
    size_um : float
        Length in micrometres.
    spacing_um : sequence of float, length ``ndim``, or None
        Voxel size in um per axis; None (unknown unit) reads ``size_um`` as voxels.
    ndim : int

    Returns
    -------
    (ndim,) float ndarray
        ``size_um / spacing_um``.

    Examples
    --------
    >>> um_to_voxels(5.0, (0.994, 0.994, 5.0)).round(2).tolist()
    [5.03, 5.03, 1.0]
    >>> um_to_voxels(5.0, None).tolist()
    [5.0, 5.0, 5.0]
    """
    if spacing_um is None:
        return np.full(ndim, float(size_um))
    spacing = np.asarray(spacing_um, dtype=np.float64)
    if spacing.shape != (ndim,) or np.any(spacing <= 0):
        raise ValueError(f"spacing_um={spacing_um!r} must be {ndim} positive numbers")
    return float(size_um) / spacing


def valid_voxels(image: np.ndarray) -> np.ndarray:
    """Voxels that carry a measurement: not at the stack's minimum or maximum value (clipped floor, saturation).

    Parameters
    ----------
    image : (X, Y, Z) ndarray

    Returns
    -------
    (X, Y, Z) bool ndarray
        All True for a constant image (nothing to tell apart).
    """
    image = _check_stack(image)
    lo, hi = image.min(), image.max()
    if lo == hi:
        return np.ones(image.shape, dtype=bool)
    return (image > lo) & (image < hi)


def smooth_slices(image: np.ndarray, sigma_vox: float) -> np.ndarray:
    """In-plane Gaussian smoothing of each z-slice.

    Parameters
    ----------
    image : (X, Y, Z) ndarray
    sigma_vox : float
        Sigma in voxels along x and y; z is not smoothed.

    Returns
    -------
    (X, Y, Z) float32 ndarray
    """
    image = _check_stack(image).astype(np.float32, copy=False)
    if sigma_vox <= 0:
        return image.copy()
    return ndi.gaussian_filter(image, (sigma_vox, sigma_vox, 0.0))


def flatten_background(image: np.ndarray, sigma_um: float, spacing_um: Sequence[float] | None) -> np.ndarray:
    """Subtract a large-scale in-plane Gaussian background from each slice.

    Parameters
    ----------
    image : (X, Y, Z) ndarray
    sigma_um : float
        Background scale in um (in voxels when ``spacing_um`` is None); it should exceed the largest vessel.
    spacing_um : (3,) sequence of float or None

    Returns
    -------
    (X, Y, Z) float32 ndarray
        ``image - G(image)``, shifted so that its minimum is 0.
    """
    image = _check_stack(image).astype(np.float32, copy=False)
    sigma = um_to_voxels(sigma_um, spacing_um)
    flat = image - ndi.gaussian_filter(image, (sigma[0], sigma[1], 0.0))
    return flat - flat.min()


def slice_thresholds(image: np.ndarray, valid: np.ndarray | None = None, *, rule: str = "triangle",
                     per_slice: bool = True) -> np.ndarray:
    """One histogram threshold per z-slice (or one for the stack) from the valid voxels.

    Parameters
    ----------
    image : (X, Y, Z) ndarray
    valid : (X, Y, Z) bool ndarray, optional
        Voxels whose intensities enter the histograms (default: all). A slice with fewer than 64 valid voxels
        takes the stack's threshold.
    rule : {"triangle", "otsu", "li"}
    per_slice : bool

    Returns
    -------
    (Z,) float64 ndarray
        Threshold of each slice, in the units of ``image``.
    """
    image = _check_stack(image)
    valid = np.ones(image.shape, bool) if valid is None else np.asarray(valid, dtype=bool)
    if rule not in _RULES:
        raise ValueError(f"rule={rule!r} must be one of {sorted(_RULES)}")
    threshold = _RULES[rule]
    values = image[valid] if valid.any() else image.ravel()
    whole = float(threshold(values))
    if not per_slice:
        return np.full(image.shape[2], whole)
    out = np.full(image.shape[2], whole)
    for k in range(image.shape[2]):
        v = image[:, :, k][valid[:, :, k]]
        if v.size >= 64 and v.min() < v.max():
            out[k] = float(threshold(v))
    return out


def local_threshold(image: np.ndarray, radius_um: float, spacing_um: Sequence[float] | None, *,
                    fraction: float = 0.25, background: np.ndarray | None = None) -> np.ndarray:
    """A half-maximum-style local threshold: ``background + fraction * (local max - background)`` per slice.

    Parameters
    ----------
    image : (X, Y, Z) ndarray
    radius_um : float
        Radius of the in-plane square neighbourhood of the local maximum, in um (voxels when unknown).
    spacing_um : (3,) sequence of float or None
    fraction : float in [0, 1]
        0.5 is the full-width-at-half-maximum boundary.
    background : (Z,) ndarray, optional
        Background level per slice (default: the median of each slice).

    Returns
    -------
    (X, Y, Z) float32 ndarray
        The threshold at each voxel.
    """
    image = _check_stack(image).astype(np.float32, copy=False)
    r = np.maximum(1, np.round(um_to_voxels(radius_um, spacing_um))).astype(int)
    local_max = ndi.maximum_filter(image, size=(2 * r[0] + 1, 2 * r[1] + 1, 1))
    bg = np.median(image, axis=(0, 1)) if background is None else np.asarray(background, np.float32)
    return (bg + fraction * (local_max - bg)).astype(np.float32)


def threshold_probability(image: np.ndarray, thresholds: np.ndarray, valid: np.ndarray | None = None
                          ) -> np.ndarray:
    """Logistic vessel probability, exactly 0.5 at each slice's threshold, with the slice's noise as width.

    ``p = 1 / (1 + exp(-(x - t_k) / w_k))`` with ``w_k`` = 1.4826 * MAD of slice ``k``'s valid voxels below
    ``t_k`` (its background noise), so a voxel two noise sigmas above the threshold scores 0.88.

    Parameters
    ----------
    image : (X, Y, Z) ndarray
    thresholds : (Z,) or (X, Y, Z) ndarray
        Threshold per slice, or per voxel.
    valid : (X, Y, Z) bool ndarray, optional

    Returns
    -------
    (X, Y, Z) float32 ndarray in [0, 1]
    """
    image = _check_stack(image).astype(np.float32, copy=False)
    t = np.asarray(thresholds, dtype=np.float32)
    t_vol = np.broadcast_to(t, image.shape) if t.ndim == 1 else t
    valid = np.ones(image.shape, bool) if valid is None else valid
    width = np.empty(image.shape[2], np.float32)
    for k in range(image.shape[2]):
        below = image[:, :, k][valid[:, :, k] & (image[:, :, k] <= t_vol[:, :, k])]
        mad = float(np.median(np.abs(below - np.median(below)))) if below.size else 0.0
        width[k] = max(1.4826 * mad, 1e-3 * max(float(np.abs(t_vol[:, :, k]).max()), 1e-6))
    z = np.clip((image - t_vol) / width, -50.0, 50.0)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def tubularity(image: np.ndarray, sigmas_um: Sequence[float], spacing_um: Sequence[float] | None) -> np.ndarray:
    """2D Sato tubeness of bright tubes in each z-slice, at physical scales.

    Parameters
    ----------
    image : (X, Y, Z) ndarray
    sigmas_um : sequence of float
        Gaussian scales in um (voxels when ``spacing_um`` is None), converted with the in-plane spacing.
    spacing_um : (3,) sequence of float or None

    Returns
    -------
    (X, Y, Z) float32 ndarray, >= 0
    """
    image = _check_stack(image).astype(np.float32, copy=False)
    sigmas = [float(um_to_voxels(s, spacing_um)[0]) for s in sigmas_um]
    return np.stack([filters.sato(image[:, :, k], sigmas=sigmas, black_ridges=False)
                     for k in range(image.shape[2])], axis=2).astype(np.float32)


def fill_holes_slices(mask: np.ndarray) -> np.ndarray:
    """Fill enclosed background holes in each z-slice (``scipy.ndimage.binary_fill_holes``).

    Parameters
    ----------
    mask : (X, Y, Z) bool ndarray

    Returns
    -------
    (X, Y, Z) bool ndarray
    """
    mask = np.asarray(mask, bool)
    return np.stack([ndi.binary_fill_holes(mask[:, :, k]) for k in range(mask.shape[2])], axis=2)


def remove_small_components(mask: np.ndarray, min_size_um2: float, spacing_um: Sequence[float] | None
                            ) -> np.ndarray:
    """Drop 2D (in-slice, 8-connected) components smaller than an area in um^2.

    Parameters
    ----------
    mask : (X, Y, Z) bool ndarray
    min_size_um2 : float
        Minimum area in um^2 (voxels when ``spacing_um`` is None).
    spacing_um : (3,) sequence of float or None

    Returns
    -------
    (X, Y, Z) bool ndarray
    """
    mask = np.asarray(mask, bool)
    if min_size_um2 <= 0:
        return mask.copy()
    area = 1.0 if spacing_um is None else float(spacing_um[0]) * float(spacing_um[1])
    min_vox = max(1, int(np.ceil(min_size_um2 / area)))
    structure = np.zeros((3, 3, 3), bool)
    structure[:, :, 1] = True
    labels, n = ndi.label(mask, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_vox
    keep[0] = False
    return keep[labels]


def segment_2pm(image: np.ndarray, spacing_um: Sequence[float] | None,
                settings: TwoPhotonSettings = TwoPhotonSettings()) -> np.ndarray:
    """Vessel probability of a two-photon stack (bright vessels on a dark field).

    Parameters
    ----------
    image : (X, Y, Z) ndarray
        Raw intensities (any dtype), z the optical-section axis.
    spacing_um : (3,) sequence of float or None
        Voxel size in um per axis; None when unknown (physical sizes are then read as voxels).
    settings : TwoPhotonSettings
        The recipe's steps and parameters (defaults: the recipe).

    Returns
    -------
    (X, Y, Z) float32 ndarray in [0, 1]
        Vessel probability; ``prob > THRESHOLD`` (0.5) is the segmentation.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> stack = rng.normal(10, 2, (64, 64, 3)).astype(np.float32)
    >>> stack[20:26, :, :] += 60  # a bright horizontal vessel
    >>> mask = segment_2pm(stack, (1.0, 1.0, 5.0)) > THRESHOLD
    >>> bool(mask[20:26].mean() > 0.9), bool(mask[40:].mean() < 0.05)
    (True, True)
    """
    image = _check_stack(image)
    valid = valid_voxels(image)
    x = smooth_slices(image, settings.smooth_vox)
    if settings.flatten_um is not None:
        x = flatten_background(x, settings.flatten_um, spacing_um)
    t = slice_thresholds(x, valid, rule=settings.rule, per_slice=settings.per_slice)
    prob = threshold_probability(x, t, valid)
    if settings.local_radius_um is not None:
        bg = np.array([np.median(x[:, :, k][valid[:, :, k]]) if valid[:, :, k].any() else 0.0
                       for k in range(x.shape[2])], np.float32)
        t_local = local_threshold(x, settings.local_radius_um, spacing_um, fraction=settings.local_fraction,
                                  background=bg)
        prob = np.minimum(prob, threshold_probability(x, t_local, valid))
    if settings.tubular_sigmas_um is not None:
        tube = tubularity(x, settings.tubular_sigmas_um, spacing_um)
        t_tube = slice_thresholds(tube, valid, rule="otsu", per_slice=settings.per_slice)
        bright = x > settings.tubular_min_fraction * t[None, None, :]
        prob = np.maximum(prob, np.where(bright, threshold_probability(tube, t_tube, valid), 0.0))
    if settings.fill_holes or settings.min_size_um2 > 0:
        mask = prob > THRESHOLD
        post = fill_holes_slices(mask) if settings.fill_holes else mask
        post = remove_small_components(post, settings.min_size_um2, spacing_um)
        # added voxels just pass, removed voxels just fail: the mask is exactly ``post``
        prob = np.where(post & ~mask, np.float32(0.5 + 1e-3), prob)
        prob = np.where(~post & mask, np.float32(0.5 - 1e-3), prob)
    return prob.astype(np.float32)


class TwoPhotonMethod:
    """The two-photon recipe as a registered method (nothing to fit across volumes): per-slice triangle
    thresholds of the in-plane smoothed stack, a logistic probability (:func:`segment_2pm`). Scales in um when
    the header's unit is known, in voxels otherwise. Voxels outside the brain mask (with ``skull_strip: none``:
    none) get 0."""

    name = "twophoton"
    threshold = THRESHOLD

    def __init__(self, settings: TwoPhotonSettings, context: BuildContext) -> None:
        self._settings = settings

    def fit(self, cases: Sequence, validation: Sequence = ()) -> None:
        """Nothing to learn across volumes."""

    def predict(self, case) -> Result:
        spacing_um = None if case.spacing_mm is None else tuple(1000.0 * s for s in case.spacing_mm)
        prob = segment_2pm(case.image, spacing_um, self._settings)
        return Result(np.where(case.brain_mask, prob, 0.0).astype(np.float32))

    def settings(self) -> TwoPhotonSettings:
        return self._settings

    def state(self) -> None:
        return None

    def load_state(self, state: object) -> None:
        raise ValueError("method 'twophoton' is classical: it has no trained state to load")


#: The registry entry (registered in :mod:`stego_core.methods`).
TWOPHOTON = MethodEntry("twophoton", "classical", TwoPhotonMethod, settings=TwoPhotonSettings,
                        summary="two-photon stacks: per-slice triangle thresholds of the smoothed stack")
