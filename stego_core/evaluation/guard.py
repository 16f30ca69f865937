"""The out-of-domain guard: a preset's declared domain against a case's label-free profile and a method's mask.

Every preset declares the domain it was chosen for (:class:`DomainConfig`: modality, the in-plane voxel size, the
expected vessel fraction inside the mask, polarity, labelling convention). :func:`profile_warnings` compares a
case's profile (:func:`stego_core.data.profile.case_profile`, header and intensities only) with it;
:func:`mask_warnings` says when a method's mask is implausible for it (empty, near-empty, far outside the expected
fraction, every voxel). The evaluation logs each reason as a one-line warning, a ``domain_warning`` tag and a
column of the tables: a result outside its domain is never silent. No label is read here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stego_core._checks import check_choice, check_range
from stego_core.data.profile import RULE, guess_modality

__all__ = ["DomainConfig", "profile_warnings", "mask_warnings", "MODALITY_NAMES"]

#: How warnings name the modalities.
MODALITY_NAMES = {"mra": "MR angiography", "2pm": "two-photon microscopy", "any": "any modality"}


@dataclass(frozen=True)
class DomainConfig:
    """The domain a preset was chosen for (``domain:`` in a preset file; ``any`` checks the mask only).

    Attributes
    ----------
    name : str
        How warnings name the preset (``best_mra``...).
    modality : {"any", "mra", "2pm"}
        The modality the preset was chosen on; a case the profile rule places elsewhere is warned about.
    spacing_mm : (2,) tuple of float, optional
        The in-plane voxel sizes (mm) it was chosen on, checked when the header's unit is known.
    vessel_fraction : (2,) tuple of float
        The plausible fraction of the mask a method's vessel mask covers, low and high.
    polarity : {"bright", "any"}
        Vessels brighter than tissue (a profile with a dark tail is warned about).
    convention : str
        The labelling convention it was chosen for (``lumen``, ``tree``, ``dense``; documentation only).
    """

    name: str = "any"
    modality: str = "any"
    spacing_mm: tuple[float, float] | None = None
    vessel_fraction: tuple[float, float] = (1e-5, 0.6)
    polarity: str = "bright"
    convention: str = ""

    def __post_init__(self) -> None:
        check_choice(self.modality, "domain.modality", tuple(MODALITY_NAMES))
        check_choice(self.polarity, "domain.polarity", ("bright", "any"))
        lo, hi = self.vessel_fraction
        check_range(lo, "domain.vessel_fraction", 0.0, 1.0)
        check_range(hi, "domain.vessel_fraction", lo, 1.0)
        if self.spacing_mm is not None and not 0 < self.spacing_mm[0] <= self.spacing_mm[1]:
            raise ValueError(f"domain.spacing_mm={self.spacing_mm!r} must be a (low, high) pair, 0 < low <= high")


def _votes_text(profile: dict[str, Any], votes: dict[str, bool]) -> str:
    parts = []
    for key, (cut, side) in RULE.items():
        sign = ">" if side == "above" else "<"
        if not votes[key]:
            sign = "<=" if side == "above" else ">="
        parts.append(f"{key.replace('_', ' ')} {float(profile[key]):.3g} {sign} {cut:g}")
    return ", ".join(parts)


def profile_warnings(profile: dict[str, Any], domain: DomainConfig) -> list[str]:
    """Why a case's profile lies outside ``domain`` (empty when it does not).

    Examples
    --------
    >>> slab = {"shape_ratio": 0.03, "otsu_fraction": 0.05, "skewness": 4.0, "spacing_um": None}
    >>> profile_warnings(slab, DomainConfig(name="best_mra", modality="mra"))[0][:57]
    'the case looks like two-photon microscopy (shape ratio 0.'
    >>> profile_warnings(slab, DomainConfig())
    []
    """
    reasons = []
    if domain.modality != "any":
        modality, votes = guess_modality(profile)
        if modality != domain.modality:
            reasons.append(f"the case looks like {MODALITY_NAMES[modality]} ({_votes_text(profile, votes)}); "
                           f"{domain.name} was chosen for {MODALITY_NAMES[domain.modality]}")
    spacing_um = profile.get("spacing_um")
    if domain.spacing_mm is not None and spacing_um is not None:
        in_plane = min(spacing_um[:2]) / 1000.0
        lo, hi = domain.spacing_mm
        if not lo <= in_plane <= hi:
            reasons.append(f"its in-plane voxel size {in_plane:.3g} mm lies outside the {lo:g}-{hi:g} mm "
                           f"{domain.name} was chosen on")
    if domain.polarity == "bright" and float(profile.get("skewness", 0.0)) < -0.5:
        reasons.append(f"its intensities have a dark tail (skewness {float(profile['skewness']):.2g}): vessels "
                       "may be dark, and the method looks for bright ones")
    return reasons


def mask_warnings(mask: np.ndarray, brain_mask: np.ndarray, domain: DomainConfig) -> list[str]:
    """Why a method's mask is implausible for ``domain``: empty, near-empty, far outside the expected fraction.

    Parameters
    ----------
    mask, brain_mask : (I, J, K) bool ndarrays

    Examples
    --------
    >>> brain = np.ones((10, 10, 10), bool)
    >>> mask_warnings(brain, brain, DomainConfig())
    ['the mask marks 100% of the volume as vessel (expected 0.001-60%)']
    >>> mask_warnings(np.zeros_like(brain), brain, DomainConfig())
    ['the mask is empty']
    """
    inside = int(np.count_nonzero(brain_mask))
    if inside == 0:
        return ["the brain mask is empty"]
    n = int(np.count_nonzero(np.asarray(mask, bool) & np.asarray(brain_mask, bool)))
    if n == 0:
        return ["the mask is empty"]
    fraction = n / inside
    lo, hi = domain.vessel_fraction
    expected = f"expected {100 * lo:.2g}-{100 * hi:.2g}%"
    if fraction < lo:
        return [f"the mask is near-empty: {100 * fraction:.2g}% of the volume is vessel ({expected})"]
    if fraction > hi:
        return [f"the mask marks {100 * fraction:.3g}% of the volume as vessel ({expected})"]
    return []
