"""Hessian vesselness filters: Frangi and Sato on many 2D slices at once, and on whole 3D volumes.

2D (the per-slice baselines): the same filters as ``skimage.filters.frangi`` / ``sato(image, sigmas,
black_ridges=False)`` on each slice: Hessian by two successive first-order Gaussian-derivative filters of
scale ``sigma / sqrt(2)`` (as ``skimage.feature.hessian_matrix(..., use_gaussian_derivatives=True)``),
eigenvalues sorted by magnitude,
Frangi et al.'s blobness and structureness terms (or Sato's ``sigma**2 * max(lambda_max, 0)``), maximum over
scales. Two differences, both for speed:

- all slices of a batch are filtered in one ``scipy.ndimage.gaussian_filter`` call per derivative (scale 0
  along the slice axis), instead of one call per slice;
- Gaussian kernels are truncated at 8 standard deviations for every scale. skimage truncates at 100 when a
  scale is <= 1 voxel, a 143-tap kernel for ``sigma = 1`` whose outer taps are below 1e-13 of the centre; the
  difference is at float rounding level (``tests/test_baselines.py`` checks it against skimage).

Sato, Y., et al. (1998). Three-dimensional multi-scale line filter for segmentation and visualization of
curvilinear structures in medical images. Medical Image Analysis 2(2), 143-168.
3D (the volume-level baselines): :func:`hessian_eigenvalues` with scales in mm (anisotropic spacing), then
:func:`frangi_response` or :func:`sato_response` of the eigenvalues.

Frangi, A. F., Niessen, W. J., Vincken, K. L., & Viergever, M. A. (1998). Multiscale vessel enhancement
filtering. MICCAI, 130-137. :DOI:`10.1007/BFb0056195`
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage as ndi
from skimage.feature import hessian_matrix_eigvals

from stego_core._checks import check_ndim, check_range

__all__ = ["frangi_response", "frangi_slices", "hessian_eigenvalues", "hessian_slices", "sato_response",
           "sato_slices"]

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


# -------------------------------------------------------------------------------------------------- 3D


def hessian_eigenvalues(image: np.ndarray, sigma_mm: float, spacing: Sequence[float] | None = None, *,
                        truncate: float = 4.0, chunk: int = 32) -> np.ndarray:
    """Eigenvalues of the scale-normalised Hessian of a 3D image, in decreasing order.

    Second derivatives of a Gaussian of standard deviation ``sigma_mm`` (per axis ``sigma_mm / spacing``
    voxels; with ``spacing=None`` millimetres are voxels), in units of mm^-2, multiplied by ``sigma_mm**2``
    (Lindeberg's normalisation, so that scales compare). Eigenvalues come from
    ``skimage.feature.hessian_matrix_eigvals``, computed slab by slab to bound memory.

    Parameters
    ----------
    image : (I, J, K) float ndarray
    sigma_mm : float > 0
    spacing : (3,) sequence of float, optional
        Voxel size in mm.
    truncate : float
        Gaussian kernel radius in standard deviations.
    chunk : int
        Planes along axis 0 per eigenvalue slab.

    Returns
    -------
    (3, I, J, K) float32 ndarray
        ``[l0 >= l1 >= l2]`` per voxel. A bright tube has ``l1, l2 << 0`` and ``l0 ~ 0``.
    """
    image = np.asarray(image, dtype=np.float32)
    check_ndim(image, 3, "image")
    check_range(sigma_mm, "sigma_mm", 0.0, low_inclusive=False)
    sp = np.ones(3) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if sp.shape != (3,) or (sp <= 0).any():
        raise ValueError(f"spacing={spacing!r} must be 3 positive numbers (mm)")
    sigma_vox = tuple(float(sigma_mm / s) for s in sp)
    elems = []
    for a in range(3):
        for b in range(a, 3):
            order = [0, 0, 0]
            order[a] += 1
            order[b] += 1
            d = ndi.gaussian_filter(image, sigma_vox, order=order, mode="reflect", truncate=truncate)
            d *= np.float32(sigma_mm**2 / (sp[a] * sp[b]))
            elems.append(d)
    out = np.empty((3, *image.shape), dtype=np.float32)
    for start in range(0, image.shape[0], chunk):
        sl = slice(start, start + chunk)
        out[:, sl] = hessian_matrix_eigvals([e[sl] for e in elems])
    return out


def frangi_response(eigenvalues: np.ndarray, *, alpha: float = 0.5, beta: float = 0.5, gamma: float = 1.0
                    ) -> np.ndarray:
    """Frangi's 3D vesselness of bright tubes from Hessian eigenvalues (as ``skimage.filters.frangi``).

    Parameters
    ----------
    eigenvalues : (3, ...) ndarray
        From :func:`hessian_eigenvalues` (any order).
    alpha, beta : float
        Plate and blob sensitivities.
    gamma : float
        Structureness scale.

    Returns
    -------
    (...) float32 ndarray in [0, 1)
    """
    e = -np.asarray(eigenvalues, dtype=np.float32)  # bright tubes -> skimage's dark-ridge convention
    e = np.take_along_axis(e, np.abs(e).argsort(0), 0)
    l1 = e[0]
    l2, l3 = np.maximum(e[1], 1e-10), np.maximum(e[2], 1e-10)
    r_a = l2 / l3
    r_b = np.abs(l1) / np.sqrt(l2 * l3)
    s2 = (e**2).sum(0)
    v = 1.0 - np.exp(-(r_a**2) / (2 * alpha**2))
    v *= np.exp(-(r_b**2) / (2 * beta**2))
    v *= 1.0 - np.exp(-s2 / (2 * gamma**2))
    return v.astype(np.float32)


def sato_response(eigenvalues: np.ndarray) -> np.ndarray:
    """Sato's 3D tubeness of bright tubes: ``sqrt(max(-l1, 0) * max(-l2, 0))`` of the two most negative
    eigenvalues (as ``skimage.filters.sato``; the eigenvalues are already scale-normalised)."""
    e = np.sort(np.asarray(eigenvalues, dtype=np.float32), axis=0)  # ascending: most negative first
    return np.sqrt(np.maximum(-e[0], 0) * np.maximum(-e[1], 0)).astype(np.float32)
