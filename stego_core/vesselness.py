"""Frangi vesselness and Sato tubeness of many 2D slices at once (the 2D vesselness baselines' filters).

Same filters as ``skimage.filters.frangi`` / ``sato(image, sigmas, black_ridges=False)`` on each slice: Hessian by two
successive first-order Gaussian-derivative filters of scale ``sigma / sqrt(2)`` (as
``skimage.feature.hessian_matrix(..., use_gaussian_derivatives=True)``), eigenvalues sorted by magnitude,
Frangi et al.'s blobness and structureness terms (or Sato's ``sigma**2 * max(lambda_max, 0)``), maximum over
scales. Two differences, both for speed:

- all slices of a batch are filtered in one ``scipy.ndimage.gaussian_filter`` call per derivative (scale 0
  along the slice axis), instead of one call per slice;
- Gaussian kernels are truncated at 8 standard deviations for every scale. skimage truncates at 100 when a
  scale is <= 1 voxel, a 143-tap kernel for ``sigma = 1`` whose outer taps are below 1e-13 of the centre; the
  difference is at float rounding level (``tests/test_baselines.py`` checks it against skimage).

Sato, Y., et al. (1998). Three-dimensional multi-scale line filter for segmentation and visualization of
curvilinear structures in medical images. Medical Image Analysis 2(2), 143-168.
Frangi, A. F., Niessen, W. J., Vincken, K. L., & Viergever, M. A. (1998). Multiscale vessel enhancement
filtering. MICCAI, 130-137. :DOI:`10.1007/BFb0056195`
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi

from stego_core._checks import check_ndim

__all__ = ["frangi_slices", "hessian_slices", "sato_slices"]

#: Gaussian kernels are cut at this many standard deviations.
TRUNCATE = 8.0


def hessian_slices(slices: np.ndarray, sigma: float, *, mode: str = "reflect") -> tuple[np.ndarray, ...]:
    """Scale-space Hessian ``(Hrr, Hrc, Hcc)`` of every slice.

    Parameters
    ----------
    slices : (N, H, W) float ndarray
    sigma : float > 0
        Gaussian scale in pixels.
    mode : str
        Border handling of ``scipy.ndimage`` (``reflect`` as skimage's Frangi).

    Returns
    -------
    hrr, hrc, hcc : (N, H, W) ndarrays
        Second derivatives along rows, rows and columns, and columns.
    """
    check_ndim(slices, 3, "slices")
    s = sigma / math.sqrt(2.0)

    def g(x: np.ndarray, order: tuple[int, int, int]) -> np.ndarray:
        return ndi.gaussian_filter(x, sigma=(0.0, s, s), order=order, mode=mode, truncate=TRUNCATE)

    d_r, d_c = g(slices, (0, 1, 0)), g(slices, (0, 0, 1))
    return g(d_r, (0, 1, 0)), g(d_r, (0, 0, 1)), g(d_c, (0, 0, 1))


def frangi_slices(slices: np.ndarray, sigmas: Sequence[float], *, alpha: float = 0.5, beta: float = 0.5,
                  gamma: float, mode: str = "reflect") -> np.ndarray:
    """Frangi vesselness of bright ridges on every slice, maximum over ``sigmas``.

    Parameters
    ----------
    slices : (N, H, W) float ndarray
    sigmas : sequence of float > 0
        Scales in pixels.
    alpha : float
        Plate sensitivity (unused in 2D, where the plate term is 1; kept for the signature of skimage's).
    beta : float
        Blob sensitivity.
    gamma : float > 0
        Structureness scale (the caller fixes it once per volume).

    Returns
    -------
    vesselness : (N, H, W) ndarray in [0, 1), same float type as ``slices`` (float32 or float64)
    """
    check_ndim(slices, 3, "slices")
    dtype = np.float64 if slices.dtype == np.float64 else np.float32
    image = -np.asarray(slices, dtype=dtype)  # bright ridges -> dark ridges, as skimage's black_ridges=False
    out = np.zeros_like(image)
    for sigma in sigmas:
        hrr, hrc, hcc = hessian_slices(image, sigma, mode=mode)
        half_trace = (hrr + hcc) / 2
        root = np.sqrt(hrc**2 + ((hrr - hcc) / 2) ** 2)
        e_hi, e_lo = half_trace + root, half_trace - root
        swap = np.abs(e_lo) < np.abs(e_hi)  # sort by magnitude: |lambda1| <= |lambda2|
        lambda1 = np.where(swap, e_lo, e_hi)
        lambda2 = np.maximum(np.where(swap, e_hi, e_lo), 1e-10)
        r_b = np.abs(lambda1) / lambda2
        s2 = e_hi**2 + e_lo**2
        vals = np.exp(-(r_b**2) / (2 * beta**2), dtype=dtype)
        vals *= 1.0 - np.exp(-s2 / (2 * gamma**2), dtype=dtype)
        np.maximum(out, vals, out=out)
    return out


def sato_slices(slices: np.ndarray, sigmas: Sequence[float], *, mode: str = "reflect") -> np.ndarray:
    """Sato tubeness of bright ridges on every slice, maximum over ``sigmas``.

    Parameters
    ----------
    slices : (N, H, W) float ndarray
    sigmas : sequence of float > 0
        Scales in pixels.

    Returns
    -------
    tubeness : (N, H, W) ndarray >= 0, same float type as ``slices`` (float32 or float64)
    """
    check_ndim(slices, 3, "slices")
    dtype = np.float64 if slices.dtype == np.float64 else np.float32
    image = -np.asarray(slices, dtype=dtype)
    out = np.zeros_like(image)
    for sigma in sigmas:
        hrr, hrc, hcc = hessian_slices(image, sigma, mode=mode)
        e_hi = (hrr + hcc) / 2 + np.sqrt(hrc**2 + ((hrr - hcc) / 2) ** 2)
        np.maximum(out, sigma**2 * np.maximum(e_hi, 0), out=out)
    return out
