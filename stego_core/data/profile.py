"""Label-free case profiles: what a volume looks like, from its header and its intensities only.

For the domain guard (:mod:`stego_core.evaluation.guard`) and ``preset: auto``: :func:`case_profile`
summarises one volume in a flat dict of numbers and strings (computed when a case is preprocessed, from the image
as stored), and :func:`guess_modality` applies the stated rule that separates MRA heads (real and phantom) from
two-photon microscopy stacks without relying on the spacing unit alone (``docs/domains.md``: the profiles of
the eleven shared cases and the project's phantoms, and the margins of each cut).

Axes are as stored, ``(I, J, K)``; for two-photon stacks K is the optical-section (z) axis.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import stats
from skimage import filters

__all__ = ["case_profile", "guess_modality", "RULE", "SPACING_UNITS", "MODALITIES"]

#: The modalities the rule tells apart.
MODALITIES = ("mra", "2pm")

#: Header units recognised; anything else is ``"unknown"`` (a placeholder spacing of 1.0 carries no size).
SPACING_UNITS = {"mm": "mm", "meter": "m", "m": "m", "micron": "um", "um": "um"}

#: The rule of :func:`guess_modality`: feature -> (cut, the side that votes two-photon). Each feature alone
#: separates the 11 shared cases and the project's phantoms (NOTES.md gives the margins); a majority of two
#: out of three tolerates one feature failing (e.g. a deep 2PM z-stack that is not a thin slab).
RULE = {
    "shape_ratio": (0.1, "below"),     # a thin slab: few optical sections under a wide field (MRA >= 0.19)
    "otsu_fraction": (0.2, "below"),   # Otsu splits off sparse vessels (2PM <= 0.14), not a head from air (>= 0.27)
    "skewness": (1.7, "above"),        # dark field with a long bright tail (2PM >= 2.2); MRA heads <= 1.3
}


def _sample(values: np.ndarray, n: int = 2_000_000) -> np.ndarray:
    """At most ``n`` values, evenly strided (deterministic), for the costlier statistics."""
    step = max(1, values.size // n)
    return values[::step]


def case_profile(image: np.ndarray, spacing: Sequence[float] | None, unit: str | None,
                 brain_mask: np.ndarray | None = None) -> dict[str, Any]:
    """Profile of one volume from its header (spacing, unit, shape, dtype) and intensities (no label).

    Parameters
    ----------
    image : (I, J, K) ndarray
        Raw intensities as stored (any dtype; the dtype is reported).
    spacing : (3,) sequence of float or None
        Voxel size per axis in ``unit``.
    unit : str or None
        The header's spatial unit (NIfTI ``xyzt_units``: ``"mm"``, ``"micron"``, ``"meter"``, ``"unknown"``).
    brain_mask : (I, J, K) bool ndarray, optional
        When given, the intensity statistics are computed on its voxels only (the geometry on the whole field).

    Returns
    -------
    dict
        ``unit`` (m / mm / um / unknown), ``spacing`` (as given), ``spacing_um`` (None when unknown),
        ``anisotropy`` (max / min spacing), ``shape``, ``shape_ratio`` (fewest / most voxels along an axis),
        ``dtype``, ``value_min`` / ``value_max`` / ``dynamic_range`` / ``integer_valued``, ``p1`` / ``p50`` /
        ``p99`` (percentiles), ``skewness``, ``saturated_fraction`` (at the maximum value), ``floor_fraction``
        (at the minimum value), ``bright_fraction`` (above median + 5 * 1.4826 * MAD of the valid voxels, those
        not at the floor or the maximum), ``otsu_fraction`` (above Otsu's threshold),
        ``foreground_fraction`` (voxels above 5 % of the p1..p99 range: a head in air on MRA, nearly the whole
        field on 2PM), ``border_ratio`` (median of the outer 10 % rim in the first two axes / median of the
        central half; ~0 for a head in air, ~1 for tissue filling the field).
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {image.shape}")
    if image.size == 0:
        raise ValueError("image is empty")
    unit_name = SPACING_UNITS.get(str(unit).lower(), "unknown") if unit else "unknown"
    sp = None if spacing is None else tuple(float(s) for s in spacing)
    scale = {"m": 1e6, "mm": 1000.0, "um": 1.0}.get(unit_name)
    data = image.astype(np.float32, copy=False)
    values = data[np.asarray(brain_mask, bool)] if brain_mask is not None else data.ravel()
    if values.size == 0:
        raise ValueError("brain_mask is empty")
    lo, hi = float(values.min()), float(values.max())
    p1, p50, p99 = (float(v) for v in np.percentile(values, (1, 50, 99)))
    sample = _sample(values)
    valid = values[(values > lo) & (values < hi)] if hi > lo else values
    med = float(np.median(valid)) if valid.size else p50
    mad = 1.4826 * float(np.median(np.abs(valid - med))) if valid.size else 0.0
    rim = max(1, int(round(0.1 * min(image.shape[:2]))))
    border = np.ones(image.shape[:2], bool)
    border[rim:-rim, rim:-rim] = False
    centre = tuple(slice(n // 4, n - n // 4) for n in image.shape)
    c_med = float(np.median(data[centre]))
    b_med = float(np.median(data[border]))
    return {
        "unit": unit_name,
        "spacing": sp,
        "spacing_um": None if (sp is None or scale is None) else tuple(s * scale for s in sp),
        "anisotropy": None if sp is None else max(sp) / min(sp),
        "shape": tuple(int(n) for n in image.shape),
        "shape_ratio": min(image.shape) / max(image.shape),
        "dtype": str(image.dtype),
        "value_min": lo,
        "value_max": hi,
        "dynamic_range": hi - lo,
        "integer_valued": bool(np.all(np.mod(sample, 1) == 0)),
        "p1": p1,
        "p50": p50,
        "p99": p99,
        "skewness": float(stats.skew(sample.astype(np.float64))) if hi > lo else 0.0,
        "saturated_fraction": float(np.mean(values == hi)),
        "floor_fraction": float(np.mean(values == lo)),
        "bright_fraction": float(np.mean(values > med + 5.0 * mad)) if mad > 0 else float(np.mean(values > med)),
        "otsu_fraction": float(np.mean(values > filters.threshold_otsu(sample))) if hi > lo else 0.0,
        "foreground_fraction": float(np.mean(values > p1 + 0.05 * (p99 - p1))) if p99 > p1 else 0.0,
        "border_ratio": b_med / c_med if c_med > 0 else float("inf") if b_med > 0 else 1.0,
    }


def guess_modality(profile: dict[str, Any]) -> tuple[str, dict[str, bool]]:
    """Apply :data:`RULE` to a profile: ``"2pm"`` when at least two of its three features vote two-photon.

    Parameters
    ----------
    profile : dict
        A :func:`case_profile` result.

    Returns
    -------
    modality : {"2pm", "mra"}
    votes : dict of str to bool
        Each feature's vote for two-photon.

    Notes
    -----
    A spacing unit of ``um`` (or a known in-plane spacing below 20 um) decides ``"2pm"`` outright; the rule
    itself never needs the unit, since the shared MRA headers and two of the 2PM headers say ``unknown``.
    """
    votes = {}
    for key, (cut, side) in RULE.items():
        v = float(profile[key])
        votes[key] = v > cut if side == "above" else v < cut
    sp_um = profile.get("spacing_um")
    if sp_um is not None and min(sp_um[:2]) < 20.0:
        return "2pm", votes
    return ("2pm" if sum(votes.values()) >= 2 else "mra"), votes
