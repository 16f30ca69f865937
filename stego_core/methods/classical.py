"""Classical unsupervised vessel segmenters: the baselines STEGO is compared against.

Every method implements :class:`stego_core.engine.segmenter.Segmenter` and never sees a label. Two families:

Intensity methods (``percentile``, ``otsu``, ``multiotsu``, ``kmeans``, ``gmm``)
    ``fit_volume`` learns one global intensity rule from the brain voxels of the preprocessed volume (bright
    blood: vessels are the brightest tissue of a TOF MRA); ``predict_slices`` applies it voxel by voxel, so a
    crop scores exactly as the same pixels of a whole slice.
Vesselness methods (``frangi``, ``sato``)
    2D Hessian ridge filters (Frangi et al., MICCAI 1998, :DOI:`10.1007/BFb0056195`; Sato et al., MedIA 1998,
    :DOI:`10.1016/S1361-8415(98)80009-1`) for bright ridges (``black_ridges=False``) on each slice, thresholded
    by a rule fixed a priori and computed in ``fit_volume`` from the responses of brain voxels on a sample of
    slices: Otsu's threshold of the response (``rule="otsu"``, default) or its mean + ``k_std`` standard
    deviations (``rule="mean_std"``). With ``require_bright`` (default) a vessel must also be brighter than the
    brain's median intensity, which rejects ridges of dim tissue (a gyrus between darker sulci). When
    ``fit_volume`` finds the voxels outside the brain mask all equal (skull stripping set them to the volume
    minimum), that background value is replaced by the median brain intensity before filtering
    (``fill_background``), so the brain edge does not respond as a ridge. Scores near crop borders differ
    from whole-slice scores (filter support); whole slices are preferred.

3D vesselness methods (``frangi3d``, ``sato3d``)
    Volume-level segmenters (``volume_level = True``): the engine calls their ``predict_volume(image,
    brain_mask)`` once on the whole preprocessed volume instead of sliding a window. Multi-scale 3D Hessian
    eigenvalues (Gaussian derivatives, scales in mm when the spacing is known, else in voxels), Frangi's
    vesselness or Sato's tubeness of bright tubes, a response rule fixed a priori (``frangi3d``: the
    dimensionless response above 0.2; ``sato3d``: Otsu's threshold of brain responses) and a brightness rule
    (intensity at or above the 99th percentile of the brain, the same prior as ``percentile``).

Scores are in [0, 1] with ``threshold = 0.5``: a score above 0.5 means exactly "passes the method's rule"; it
grows monotonically with intensity or response so that blending overlapping crops is meaningful. ``gmm``
returns the posterior probability of its brightest component.

Methods are built by name::

    >>> seg = build_segmenter("otsu")
    >>> seg.name, seg.threshold
    ('otsu', 0.5)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np
from scipy.cluster.vq import kmeans2
from skimage.filters import threshold_multiotsu, threshold_otsu

from stego_core._checks import (
    as_binary,
    check_finite,
    check_ndim,
    check_range,
    check_same_shape,
)
from stego_core.config import from_dict
from stego_core.data.preprocess import bright_percentile
from stego_core.engine.segmenter import Segmenter
from stego_core.methods.vesselness import (
    frangi_response,
    frangi_slices,
    hessian_eigenvalues,
    hessian_slices,
    sato_response,
    sato_slices,
)

__all__ = [
    "SEGMENTERS",
    "Frangi3DSegmenter",
    "FrangiSegmenter",
    "GMMSegmenter",
    "KMeansSegmenter",
    "MultiOtsuSegmenter",
    "OtsuSegmenter",
    "PercentileSegmenter",
    "Sato3DSegmenter",
    "SatoSegmenter",
    "available_segmenters",
    "build_segmenter",
]


# ------------------------------------------------------------------------------------------------ helpers


def _brain_values(image: np.ndarray, brain_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (volume, brain mask) pair; return the mask (all-True if None) and the brain intensities."""
    image = np.asarray(image)
    check_ndim(image, 3, "image")
    check_finite(image, "image")
    if brain_mask is None:
        mask = np.ones(image.shape, dtype=bool)
    else:
        brain_mask = np.asarray(brain_mask)
        check_same_shape(image, brain_mask, "image", "brain_mask")
        mask = brain_mask if brain_mask.dtype == bool else as_binary(brain_mask, "brain_mask")
    if not mask.any():
        raise ValueError("brain_mask is empty; fit_volume needs brain voxels to compute its statistics")
    values = np.clip(image[mask].astype(np.float64, copy=False), 0.0, 1.0)
    return mask, values


def _check_slices(slices: np.ndarray) -> np.ndarray:
    """Validate (N, H, W) slices; return them as float32 clipped to [0, 1]."""
    slices = np.asarray(slices)
    check_ndim(slices, 3, "slices")
    check_finite(slices, "slices")
    return np.clip(slices, 0.0, 1.0).astype(np.float32, copy=False)


def _score_linear(values: np.ndarray, threshold: float) -> np.ndarray:
    """Map values in [0, 1] to scores in [0, 1], piecewise linearly, so that score > 0.5 iff value > threshold.

    [0, threshold] -> [0, 0.5] and [threshold, 1] -> [0.5, 1].
    """
    values = values.astype(np.float64, copy=False)
    t = float(threshold)
    below = 0.5 * values / t if t > 0 else np.zeros_like(values)
    above = 0.5 + 0.5 * (values - t) / (1.0 - t) if t < 1 else np.full_like(values, 0.5)
    return np.where(values > t, above, below).astype(np.float32)


def _score_ratio(response: np.ndarray, threshold: float) -> np.ndarray:
    """Map non-negative responses to scores in [0, 1) so that score > 0.5 iff response > threshold.

    ``r / (2 t)`` below the threshold, ``1 - t / (2 r)`` above it: continuous, increasing, scale-free.
    """
    r = np.maximum(response.astype(np.float64, copy=False), 0.0)
    t = float(threshold)
    if t <= 0:
        return (r > 0).astype(np.float32)  # everything with any response passes
    with np.errstate(divide="ignore"):
        above = 1.0 - t / (2.0 * r)
    return np.where(r > t, above, r / (2.0 * t)).astype(np.float32)


def _require_fitted(segmenter: object, attribute: str) -> float:
    value = getattr(segmenter, attribute)
    if value is None:
        raise RuntimeError(f"{type(segmenter).__name__} is not fitted; call fit_volume(image, brain_mask) first")
    return value


class _Baseline:
    """Settings are the dataclass fields given to ``__init__``; fitted statistics end with ``_``."""

    name: ClassVar[str]
    threshold: ClassVar[float] = 0.5

    def settings(self) -> dict[str, object]:
        """The method's settings (constructor arguments), e.g. for logging as run parameters."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def fitted_statistics(self) -> dict[str, float]:
        """Volume-level statistics learnt by ``fit_volume`` (empty before fitting)."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not f.init and f.name.endswith("_") and isinstance(value, (int, float)):
                out[f.name.rstrip("_")] = float(value)
        return out


# ------------------------------------------------------------------------------------- intensity methods


@dataclass
class _IntensitySegmenter(_Baseline):
    """Vessel = intensity above one global threshold learnt from the brain voxels."""

    intensity_threshold_: float | None = field(default=None, init=False, repr=False)

    def _fit_threshold(self, values: np.ndarray) -> float:
        raise NotImplementedError

    def fit_volume(self, image: np.ndarray, brain_mask: np.ndarray | None) -> None:
        """Learn the intensity threshold from brain voxels of ``image`` ((I, J, K) in [0, 1])."""
        _, values = _brain_values(image, brain_mask)
        self.intensity_threshold_ = float(self._fit_threshold(values))

    def predict_slices(self, slices: np.ndarray) -> np.ndarray:
        """Score (N, H, W) slices in [0, 1]; returns (N, H, W) float32, > 0.5 where above the threshold."""
        t = _require_fitted(self, "intensity_threshold_")
        return _score_linear(_check_slices(slices), t)


@dataclass
class PercentileSegmenter(_IntensitySegmenter):
    """Vessel = brighter than the ``q``-th percentile of brain intensities.

    Parameters
    ----------
    q : float in (0, 100)
        Percentile. The default 99.0 encodes the prior, fixed before looking at any label, that about 1 % of
        intracranial voxels are bright vessel lumen in TOF MRA.
    """

    name: ClassVar[str] = "percentile"
    q: float = 99.0

    def __post_init__(self) -> None:
        check_range(self.q, "q", 0.0, 100.0, low_inclusive=False, high_inclusive=False)

    def _fit_threshold(self, values: np.ndarray) -> float:
        return bright_percentile(values, self.q)  # saturated images: the saturated voxels count as vessel


@dataclass
class OtsuSegmenter(_IntensitySegmenter):
    """Vessel = brighter than Otsu's threshold of the brain intensities (``skimage.filters.threshold_otsu``).

    Parameters
    ----------
    nbins : int >= 2
        Histogram bins.
    """

    name: ClassVar[str] = "otsu"
    nbins: int = 256

    def __post_init__(self) -> None:
        check_range(self.nbins, "nbins", 2)

    def _fit_threshold(self, values: np.ndarray) -> float:
        if values.min() == values.max():
            return float(values.max())
        return float(threshold_otsu(values, nbins=self.nbins))


@dataclass
class MultiOtsuSegmenter(_IntensitySegmenter):
    """Vessel = the brightest of ``classes`` multi-Otsu classes of the brain intensities.

    Parameters
    ----------
    classes : int in [2, 4]
        Number of intensity classes (``skimage.filters.threshold_multiotsu``; its cost grows as
        ``nbins ** (classes - 1)``); 3 reads as CSF / tissue / vessel.
    nbins : int >= classes
        Histogram bins.
    """

    name: ClassVar[str] = "multiotsu"
    classes: int = 3
    nbins: int = 256

    def __post_init__(self) -> None:
        check_range(self.classes, "classes", 2, 4)
        check_range(self.nbins, "nbins", self.classes)

    def _fit_threshold(self, values: np.ndarray) -> float:
        try:
            return float(threshold_multiotsu(values, classes=self.classes, nbins=self.nbins)[-1])
        except ValueError:  # fewer distinct levels than classes: nothing is brighter than the brightest
            return float(values.max())


@dataclass
class KMeansSegmenter(_IntensitySegmenter):
    """Vessel = the brightest of ``k`` k-means clusters of the brain intensities (``scipy.cluster.vq.kmeans2``).

    In one dimension the nearest-centroid rule is a threshold: the midpoint between the two brightest
    centroids.

    Parameters
    ----------
    k : int in [2, 10]
        Number of clusters (capped at the number of distinct intensities).
    seed : int
        Seeds the k-means++ initialisations and the voxel subsample.
    n_init : int >= 1
        Initialisations; the one with the lowest within-cluster sum of squares wins.
    max_samples : int >= 1000
        Brain voxels drawn (without replacement) to fit the clusters.
    """

    name: ClassVar[str] = "kmeans"
    k: int = 3
    seed: int = 0
    n_init: int = 4
    max_samples: int = 200_000

    def __post_init__(self) -> None:
        check_range(self.k, "k", 2, 10)
        check_range(self.n_init, "n_init", 1)
        check_range(self.max_samples, "max_samples", 1000)

    def _fit_threshold(self, values: np.ndarray) -> float:
        rng = np.random.default_rng(self.seed)
        if values.size > self.max_samples:
            values = rng.choice(values, self.max_samples, replace=False)
        k = min(self.k, np.unique(values).size)  # no more clusters than distinct intensities
        if k < 2:
            return float(values.max())
        data = values[:, None]
        best, best_sse = None, math.inf
        for _ in range(self.n_init):
            with warnings.catch_warnings():  # an emptied cluster keeps its centroid; the SSE judges the run
                warnings.simplefilter("ignore", UserWarning)
                centroids, labels = kmeans2(data, k, minit="++", iter=50, missing="warn", rng=rng)
            sse = float(((data[:, 0] - centroids[labels, 0]) ** 2).sum())
            if sse < best_sse:
                best, best_sse = np.sort(centroids[:, 0]), sse
        return float(0.5 * (best[-1] + best[-2]))


@dataclass
class GMMSegmenter(_IntensitySegmenter):
    """Vessel = posterior of the brightest component of a 1D Gaussian mixture of brain intensities > 0.5.

    The mixture is fitted by expectation-maximisation on a ``nbins``-bin histogram of the brain intensities
    (deterministic, no sampling), initialised from the multi-Otsu classes. The posterior is tabulated on the
    bin centres and made non-decreasing in intensity (a brighter voxel is never less likely to be vessel),
    which removes the artefacts of components of unequal width overtaking each other far in the tails;
    ``predict_slices`` interpolates that table, so its output is the vessel probability itself.

    Parameters
    ----------
    n_components : int in [2, 4]
        Mixture components.
    nbins : int >= 64
        Histogram bins on [0, 1].
    max_iter : int >= 1
        EM iterations at most.
    tol : float > 0
        Stop when the mean log-likelihood improves by less than this.
    min_std : float in [0, 0.5] or None
        Smallest standard deviation of a component, in intensity units of [0, 1] (default: one histogram bin).
        8-bit TOF images clip the vessel lumen at the maximum, a spike that a free component fits with a
        near-zero width; a floor of a few grey levels keeps such a spike inside a real vessel class.
    """

    name: ClassVar[str] = "gmm"
    n_components: int = 3
    nbins: int = 1024
    max_iter: int = 500
    tol: float = 1e-7
    min_std: float | None = None
    means_: np.ndarray | None = field(default=None, init=False, repr=False)
    stds_: np.ndarray | None = field(default=None, init=False, repr=False)
    weights_: np.ndarray | None = field(default=None, init=False, repr=False)
    _grid: np.ndarray | None = field(default=None, init=False, repr=False)
    _table: np.ndarray | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        check_range(self.n_components, "n_components", 2, 4)
        check_range(self.nbins, "nbins", 64)
        check_range(self.max_iter, "max_iter", 1)
        check_range(self.tol, "tol", 0.0, low_inclusive=False)
        if self.min_std is not None:
            check_range(self.min_std, "min_std", 0.0, 0.5)

    def _fit_threshold(self, values: np.ndarray) -> float:
        n = self.n_components
        counts, edges = np.histogram(values, bins=self.nbins, range=(0.0, 1.0))
        centres = 0.5 * (edges[:-1] + edges[1:])
        coarse, coarse_edges = np.histogram(values, bins=256, range=(0.0, 1.0))
        try:  # initial classes: multi-Otsu on a 256-bin histogram
            cuts = threshold_multiotsu(hist=(coarse, 0.5 * (coarse_edges[:-1] + coarse_edges[1:])), classes=n)
        except ValueError:  # fewer distinct levels than components: a step at the brightest level
            self._set_table(centres, (centres >= values.max()).astype(np.float64))
            return float(values.max())
        keep = counts > 0
        x, w = centres[keep], counts[keep] / counts.sum()
        var_floor = (edges[1] - edges[0]) ** 2  # the histogram cannot resolve narrower components
        if self.min_std is not None:  # no component narrower than this: a saturation spike is not a class
            var_floor = max(var_floor, float(self.min_std) ** 2)
        cls = np.digitize(x, cuts)
        nk = np.bincount(cls, w, minlength=n)
        means = np.bincount(cls, w * x, minlength=n) / np.maximum(nk, 1e-12)
        variances = np.bincount(cls, w * (x - means[cls]) ** 2, minlength=n) / np.maximum(nk, 1e-12)
        weights, variances = np.maximum(nk, 1e-6), np.maximum(variances, var_floor)
        previous = -math.inf
        for _ in range(self.max_iter):
            log_p = self._log_joint(x, weights / weights.sum(), means, variances)  # (n, bins) E-step
            log_norm = np.logaddexp.reduce(log_p, axis=0)
            resp = np.exp(log_p - log_norm) * w
            nk = np.maximum(resp.sum(axis=1), 1e-12)  # M-step, histogram-weighted
            weights = nk
            means = (resp * x).sum(axis=1) / nk
            variances = np.maximum((resp * (x - means[:, None]) ** 2).sum(axis=1) / nk, var_floor)
            loglik = float((w * log_norm).sum())
            if loglik - previous < self.tol:
                break
            previous = loglik
        order = np.argsort(means)
        self.means_, self.stds_ = means[order], np.sqrt(variances[order])
        self.weights_ = weights[order] / weights.sum()
        log_p = self._log_joint(centres, self.weights_, self.means_, self.stds_**2)
        posterior = np.exp(log_p[-1] - np.logaddexp.reduce(log_p, axis=0))
        # non-decreasing in intensity: running min leftwards of the vessel mean, running max rightwards of it
        m = int(np.clip(np.searchsorted(centres, self.means_[-1]), 0, centres.size - 1))
        left = np.minimum.accumulate(posterior[: m + 1][::-1])[::-1]
        right = np.maximum.accumulate(posterior[m:])
        self._set_table(centres, np.concatenate([left[:-1], right]))
        above = np.flatnonzero(self._table > 0.5)
        return float(centres[above[0]]) if above.size else 1.0

    @staticmethod
    def _log_joint(x: np.ndarray, weights: np.ndarray, means: np.ndarray, variances: np.ndarray) -> np.ndarray:
        return (np.log(weights)[:, None] - 0.5 * np.log(2 * np.pi * variances)[:, None]
                - 0.5 * (x[None, :] - means[:, None]) ** 2 / variances[:, None])

    def _set_table(self, grid: np.ndarray, table: np.ndarray) -> None:
        self._grid, self._table = grid.astype(np.float64), np.clip(table, 0.0, 1.0)

    def predict_slices(self, slices: np.ndarray) -> np.ndarray:
        """Posterior probability (N, H, W) float32 of the brightest mixture component."""
        _require_fitted(self, "intensity_threshold_")
        slices = _check_slices(slices)
        return np.interp(slices, self._grid, self._table).astype(np.float32)

    def fitted_statistics(self) -> dict[str, float]:
        out = super().fitted_statistics()
        if self.means_ is not None:
            out.update({"vessel_mean": float(self.means_[-1]), "vessel_std": float(self.stds_[-1]),
                        "vessel_weight": float(self.weights_[-1])})
        return out


# ------------------------------------------------------------------------------------ vesselness methods


_RULES = ("otsu", "mean_std")


@dataclass
class _VesselnessSegmenter(_Baseline):
    """Vessel = 2D ridge response above an a-priori rule (and, optionally, intensity above the brain median).

    Scales: ``sigmas_vox`` in voxels, or ``sigmas_mm`` in mm, converted with the slice plane's voxel size when the
    volume's spacing is known (:meth:`set_spacing`; ``sigmas_vox`` otherwise). A slice plane whose two voxel sizes
    differ by more than 10 % is refused with ``sigmas_mm`` (2D filters are isotropic: slice along the axis whose
    plane is isotropic, or use ``frangi3d`` / ``sato3d``, which take per-axis scales)."""

    sigmas_vox: Sequence[float] = (1.0, 2.0, 3.0)
    sigmas_mm: Sequence[float] | None = None
    rule: str = "otsu"
    k_std: float = 3.0
    require_bright: bool = True
    slice_axis: int = 2
    n_fit_slices: int = 32
    fill_background: bool = True
    response_threshold_: float | None = field(default=None, init=False, repr=False)
    intensity_threshold_: float | None = field(default=None, init=False, repr=False)
    background_value_: float | None = field(default=None, init=False, repr=False)
    spacing_mm_: tuple[float, ...] | None = field(default=None, init=False, repr=False)

    def set_spacing(self, spacing_mm: Sequence[float] | None) -> None:
        """The volume's voxel size in mm (None when unknown): what ``sigmas_mm`` are converted with."""
        self.spacing_mm_ = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)

    @property
    def scales_vox(self) -> tuple[float, ...]:
        """The scales in voxels of the slice plane: ``sigmas_mm`` / its voxel size when both are known, else
        ``sigmas_vox``."""
        if self.sigmas_mm is None or self.spacing_mm_ is None:
            return tuple(self.sigmas_vox)
        plane = [s for a, s in enumerate(self.spacing_mm_) if a != self.slice_axis]
        if max(plane) > 1.1 * min(plane):
            raise ValueError(f"sigmas_mm on slices along axis {self.slice_axis}, whose voxels measure "
                             f"{plane[0]:g} x {plane[1]:g} mm: a 2D filter needs an isotropic plane; slice along "
                             "another axis (engine.axis) or use frangi3d / sato3d")
        size = float(np.mean(plane))
        return tuple(float(s) / size for s in self.sigmas_mm)

    def __post_init__(self) -> None:
        if self.sigmas_mm is not None:
            self.sigmas_mm = _positive_tuple(self.sigmas_mm, "sigmas_mm")
        if isinstance(self.sigmas_vox, (int, float)):
            self.sigmas_vox = (self.sigmas_vox,)
        try:
            self.sigmas_vox = tuple(float(s) for s in self.sigmas_vox)
        except (TypeError, ValueError):
            raise ValueError(f"sigmas_vox must be a sequence of positive numbers; got {self.sigmas_vox!r}") from None
        if not self.sigmas_vox or min(self.sigmas_vox) <= 0:
            raise ValueError(f"sigmas_vox must be a non-empty sequence of positive numbers; got {self.sigmas_vox!r}")
        if self.rule not in _RULES:
            raise ValueError(f"rule={self.rule!r} is not valid; expected one of {list(_RULES)}")
        check_range(self.k_std, "k_std", 0.0)
        check_range(self.slice_axis, "slice_axis", 0, 2)
        check_range(self.n_fit_slices, "n_fit_slices", 1)
        self.require_bright = bool(self.require_bright)
        self.fill_background = bool(self.fill_background)

    def _responses(self, slices: np.ndarray) -> np.ndarray:
        """Filter responses (N, H, W) of (N, H, W) slices, all at once (:mod:`stego_core.methods.vesselness`)."""
        raise NotImplementedError

    def _fit_filter(self, slices: list[np.ndarray], masks: list[np.ndarray]) -> None:
        """Hook for filter constants computed on the fit slices (Frangi's gamma)."""

    def _filled(self, slices: np.ndarray) -> np.ndarray:
        """Replace the constant skull-stripped background by the brain median (no ridge at the brain edge)."""
        if self.fill_background and self.background_value_ is not None:
            return np.where(slices == self.background_value_, np.float32(self.intensity_threshold_), slices)
        return slices

    def fit_volume(self, image: np.ndarray, brain_mask: np.ndarray | None) -> None:
        """Fix the thresholds from ``n_fit_slices`` evenly spaced brain slices along ``slice_axis``."""
        mask, values = _brain_values(image, brain_mask)
        self.intensity_threshold_ = float(np.median(values))
        outside = np.clip(np.asarray(image)[~mask], 0.0, 1.0).astype(np.float32)
        constant = outside.size > 0 and outside.min() == outside.max()
        self.background_value_ = float(outside[0]) if constant else None
        other = tuple(a for a in range(3) if a != self.slice_axis)
        with_brain = np.flatnonzero(mask.any(axis=other))
        picks = with_brain[np.unique(np.linspace(0, with_brain.size - 1, self.n_fit_slices).round().astype(int))]
        def plane(volume: np.ndarray, i: int) -> np.ndarray:
            index = [slice(None)] * 3
            index[self.slice_axis] = int(i)
            return np.ascontiguousarray(volume[tuple(index)])

        slices = [self._filled(np.clip(plane(image, i).astype(np.float32), 0.0, 1.0)) for i in picks]
        masks = [plane(mask, i) for i in picks]
        self._fit_filter(slices, masks)
        responses = self._responses(np.stack(slices))[np.stack(masks)].astype(np.float64)
        if self.rule == "otsu":
            t = float(threshold_otsu(responses)) if responses.min() < responses.max() else float(responses.max())
        else:
            t = float(responses.mean() + self.k_std * responses.std())
        self.response_threshold_ = t

    def predict_slices(self, slices: np.ndarray) -> np.ndarray:
        """Score (N, H, W) slices; returns (N, H, W) float32, > 0.5 where the rule holds."""
        t = _require_fitted(self, "response_threshold_")
        slices = _check_slices(slices)
        filled = self._filled(slices)
        out = _score_ratio(self._responses(filled), t)
        if self.require_bright:
            np.minimum(out, _score_linear(slices, self.intensity_threshold_), out=out)
        return out


@dataclass
class FrangiSegmenter(_VesselnessSegmenter):
    """Frangi vesselness (``skimage.filters.frangi``, bright ridges) on each 2D slice.

    Parameters
    ----------
    sigmas_vox : sequence of float > 0
        Gaussian scales in voxels (a tube of radius r responds most near sigma = r / sqrt(2)).
    rule : {"otsu", "mean_std"}
        Response threshold: Otsu on brain-voxel responses, or their mean + ``k_std`` std.
    k_std : float >= 0
        Used by ``rule="mean_std"``.
    require_bright : bool
        Also require intensity above the median brain intensity.
    slice_axis : {0, 1, 2}
        Axis the engine slices along; fit slices are taken along it.
    n_fit_slices : int >= 1
        Evenly spaced brain slices used to fix the thresholds.
    fill_background : bool
        Fill a constant (skull-stripped) background with the median brain intensity before filtering.
    alpha, beta : float > 0
        Frangi's plate and blob sensitivities (skimage defaults).
    gamma : float > 0 or None
        Structureness scale. None: half the largest Hessian norm (first sigma) over brain voxels of the fit
        slices, Frangi's rule applied once per volume instead of once per image, so every slice and crop
        is filtered with the same constant.
    """

    name: ClassVar[str] = "frangi"
    alpha: float = 0.5
    beta: float = 0.5
    gamma: float | None = None
    gamma_: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.alpha, "alpha", 0.0, low_inclusive=False)
        check_range(self.beta, "beta", 0.0, low_inclusive=False)
        if self.gamma is not None:
            check_range(self.gamma, "gamma", 0.0, low_inclusive=False)

    def _fit_filter(self, slices: list[np.ndarray], masks: list[np.ndarray]) -> None:
        if self.gamma is not None:
            self.gamma_ = float(self.gamma)
            return
        hrr, hrc, hcc = hessian_slices(np.stack(slices), self.scales_vox[0])
        norm = np.sqrt(hrr**2 + 2 * hrc**2 + hcc**2)  # Frobenius norm = sqrt(sum of squared eigenvalues)
        largest = float(norm[np.stack(masks)].max())
        self.gamma_ = largest / 2 if largest > 0 else 1.0

    def _responses(self, slices: np.ndarray) -> np.ndarray:
        gamma = _require_fitted(self, "gamma_")
        return frangi_slices(slices, self.scales_vox, alpha=self.alpha, beta=self.beta, gamma=gamma)


@dataclass
class SatoSegmenter(_VesselnessSegmenter):
    """Sato tubeness (``skimage.filters.sato``, bright ridges) on each 2D slice.

    Parameters
    ----------
    sigmas_vox, rule, k_std, require_bright, slice_axis, n_fit_slices, fill_background
        As for :class:`FrangiSegmenter`.
    """

    name: ClassVar[str] = "sato"

    def _responses(self, slices: np.ndarray) -> np.ndarray:
        return sato_slices(slices, self.scales_vox)


# ------------------------------------------------------------------------------ 3D vesselness methods


_RULES_3D = ("fixed", "otsu")


@dataclass
class _Vesselness3DSegmenter(_Baseline):
    """A volume-level segmenter: multi-scale 3D Hessian response on the whole volume, and a brightness rule.

    The engine calls :meth:`predict_volume` once instead of sliding a window (``volume_level = True``).
    """

    volume_level: ClassVar[bool] = True

    sigmas_vox: Sequence[float] = (1.0, 2.0, 3.0)
    sigmas_mm: Sequence[float] | None = None
    rule: str = "fixed"
    response_threshold: float = 0.2
    require_bright: bool = True
    bright_percentile: float = 99.0
    spacing_mm: Sequence[float] | None = None
    response_threshold_: float | None = field(default=None, init=False, repr=False)
    intensity_threshold_: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.sigmas_vox = _positive_tuple(self.sigmas_vox, "sigmas_vox")
        if self.sigmas_mm is not None:
            self.sigmas_mm = _positive_tuple(self.sigmas_mm, "sigmas_mm")
        if self.spacing_mm is not None:
            self.spacing_mm = _positive_tuple(self.spacing_mm, "spacing_mm")
            if len(self.spacing_mm) != 3:
                raise ValueError(f"spacing_mm must be 3 numbers; got {self.spacing_mm!r}")
        if self.rule not in _RULES_3D:
            raise ValueError(f"rule={self.rule!r} is not valid; expected one of {list(_RULES_3D)}")
        check_range(self.response_threshold, "response_threshold", 0.0)
        check_range(self.bright_percentile, "bright_percentile", 0.0, 100.0, high_inclusive=False)
        self.require_bright = bool(self.require_bright)

    def scales(self, spacing: Sequence[float] | None = None) -> tuple[tuple[float, ...], tuple[float, ...] | None]:
        """(sigmas, spacing): ``sigmas_mm`` with the spacing (``spacing_mm``, else the volume's) when both are
        known, else ``sigmas_vox`` in voxels (spacing None)."""
        spacing = self.spacing_mm if self.spacing_mm is not None else spacing
        if self.sigmas_mm is not None and spacing is not None:
            return tuple(self.sigmas_mm), tuple(float(s) for s in spacing)
        return tuple(self.sigmas_vox), None

    def _response(self, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
        raise NotImplementedError

    def fit_volume(self, image: np.ndarray, brain_mask: np.ndarray | None) -> None:
        """Fix the brightness threshold (a percentile of the brain intensities, >= kept)."""
        _, values = _brain_values(image, brain_mask)
        t = float(np.percentile(values, self.bright_percentile))
        self.intensity_threshold_ = float(np.nextafter(t, -np.inf))  # score > it  <=>  intensity >= t

    def predict_volume(self, image: np.ndarray, brain_mask: np.ndarray | None, *,
                       spacing: Sequence[float] | None = None) -> np.ndarray:
        """Score the whole volume.

        Parameters
        ----------
        image : (I, J, K) float ndarray in [0, 1]
            The preprocessed volume.
        brain_mask : (I, J, K) bool ndarray or None
        spacing : (3,) sequence of float, optional
            Voxel size in mm (used with ``sigmas_mm``).

        Returns
        -------
        (I, J, K) float32 ndarray in [0, 1]
            > 0.5 where the response rule (and, with ``require_bright``, the brightness rule) holds; 0 outside
            the brain mask.
        """
        self.fit_volume(image, brain_mask)
        mask, _ = _brain_values(image, brain_mask)
        img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
        response = self._response(img, mask, spacing)
        if self.rule == "fixed":
            t = float(self.response_threshold)
        else:
            r = response[mask]
            t = float(threshold_otsu(r)) if r.min() < r.max() else float(r.max())
        self.response_threshold_ = t
        score = _score_ratio(response, t)
        if self.require_bright:
            np.minimum(score, _score_linear(img, self.intensity_threshold_), out=score)
        score[~mask] = 0.0
        return score

    def predict_slices(self, slices: np.ndarray) -> np.ndarray:
        raise TypeError(f"{self.name} is a volume-level segmenter: the engine calls predict_volume(image, "
                        "brain_mask) on the whole volume, not predict_slices on crops")


@dataclass
class Frangi3DSegmenter(_Vesselness3DSegmenter):
    """Frangi vesselness (Frangi et al. 1998) of bright tubes on the whole 3D volume.

    The response is the maximum over scales of :func:`frangi_response` of :func:`hessian_eigenvalues`; per
    scale, ``gamma`` is half the largest Hessian norm over brain voxels (Frangi's rule, skimage's default,
    taken on the brain). The response is dimensionless in [0, 1), so a fixed threshold carries across scanners.

    Parameters
    ----------
    sigmas_vox : sequence of float > 0
        Scales in voxels (used when the spacing or ``sigmas_mm`` is unknown). A tube of radius r responds
        most near sigma = r / sqrt(3).
    sigmas_mm : sequence of float > 0, optional
        Scales in mm, used with ``spacing_mm`` (per-axis Gaussians on anisotropic grids).
    rule : {"fixed", "otsu"}
        Response threshold: ``response_threshold`` (default 0.2), or Otsu's threshold of brain responses.
    response_threshold : float >= 0
    require_bright : bool
        Also require intensity >= the ``bright_percentile``-th percentile of brain intensities.
    bright_percentile : float in [0, 100)
        99 encodes the prior that about 1 % of the brain voxels are bright vessel.
    spacing_mm : (3,) sequence of float, optional
        Voxel size (the evaluation fills it from the NIfTI header when known).
    alpha, beta : float > 0
        Plate and blob sensitivities.
    """

    name: ClassVar[str] = "frangi3d"
    alpha: float = 0.5
    beta: float = 0.5

    def _response(self, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
        sigmas, spacing = self.scales(spacing)
        out = np.zeros(image.shape, dtype=np.float32)
        for s in sigmas:
            ev = hessian_eigenvalues(image, s, spacing)
            norm = np.sqrt((ev[:, mask] ** 2).sum(0))
            gamma = float(norm.max()) / 2 if norm.size and norm.max() > 0 else 1.0
            np.maximum(out, frangi_response(ev, alpha=self.alpha, beta=self.beta, gamma=gamma), out=out)
        return out


@dataclass
class Sato3DSegmenter(_Vesselness3DSegmenter):
    """Sato tubeness (Sato et al. 1998) of bright tubes on the whole 3D volume.

    The response is the maximum over scales of :func:`sato_response`; it is in units of image contrast, so
    the default rule is Otsu's threshold of the brain responses (``rule="otsu"``).

    Parameters
    ----------
    sigmas_vox, sigmas_mm, rule, response_threshold, require_bright, bright_percentile, spacing_mm
        As for :class:`Frangi3DSegmenter`.
    """

    name: ClassVar[str] = "sato3d"
    rule: str = "otsu"

    def _response(self, image: np.ndarray, mask: np.ndarray, spacing: Sequence[float] | None) -> np.ndarray:
        sigmas, spacing = self.scales(spacing)
        out = np.zeros(image.shape, dtype=np.float32)
        for s in sigmas:
            np.maximum(out, sato_response(hessian_eigenvalues(image, s, spacing)), out=out)
        return out


def _positive_tuple(values: object, name: str) -> tuple[float, ...]:
    """A non-empty tuple of positive floats from a number or a sequence, or a ValueError naming ``name``."""
    if isinstance(values, (int, float)):
        values = (values,)
    try:
        out = tuple(float(s) for s in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive numbers; got {values!r}") from None
    if not out or min(out) <= 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive numbers; got {values!r}")
    return out


# ---------------------------------------------------------------------------------------------- registry


#: Registered baselines: name -> class. Read-only.
SEGMENTERS: Mapping[str, type[_Baseline]] = MappingProxyType({
    cls.name: cls
    for cls in (PercentileSegmenter, OtsuSegmenter, MultiOtsuSegmenter, KMeansSegmenter, GMMSegmenter,
                FrangiSegmenter, SatoSegmenter, Frangi3DSegmenter, Sato3DSegmenter)
})


def available_segmenters() -> tuple[str, ...]:
    """Names accepted by :func:`build_segmenter`."""
    return tuple(SEGMENTERS)


def build_segmenter(name: str, **settings: object) -> Segmenter:
    """Build a baseline segmenter by its registered name.

    Parameters
    ----------
    name : str
        One of :func:`available_segmenters` (``percentile``, ``otsu``, ``multiotsu``, ``kmeans``, ``gmm``,
        ``frangi``, ``sato``).
    **settings
        The method's settings (see each class); omitted ones take their documented defaults.

    Returns
    -------
    Segmenter
        Unfitted; call ``fit_volume`` first.

    Raises
    ------
    ValueError
        Unknown name (listing valid names and close matches), unknown setting (listing the valid ones), or a
        setting out of range (naming it).

    Examples
    --------
    >>> build_segmenter("percentile", q=98.5).q
    98.5
    >>> build_segmenter("otsh")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: unknown segmenter 'otsh' (did you mean 'otsu'?); valid names: percentile, otsu, ...
    """
    if name not in SEGMENTERS:
        close = difflib.get_close_matches(str(name), list(SEGMENTERS), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown segmenter {name!r}{hint}; valid names: {', '.join(SEGMENTERS)}")
    cls = SEGMENTERS[name]
    valid = [f.name for f in dataclasses.fields(cls) if f.init]
    for key in settings:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown setting {key!r} for segmenter {name!r}{hint}; valid settings: {valid}")
    return from_dict(cls, dict(settings), prefix="settings.")  # values converted to their types, a bad one named


# ---------------------------------------------------------------------------------------- as registered methods


def _entry(name: str) -> Any:
    """The registry entry of baseline ``name``: settings checked by the segmenter's own constructor; slice-based
    filters run on the slices the engine feeds them."""
    from stego_core.methods.registry import BuildContext, MethodEntry, SegmenterMethod

    cls = SEGMENTERS[name]
    has_axis = "slice_axis" in {f.name for f in dataclasses.fields(cls)}

    def resolve(settings: Mapping[str, Any]) -> dict[str, Any]:
        full = build_segmenter(name, **dict(settings)).settings()  # validates, names a bad key
        # the slicing axis is the engine's unless the config pins it
        return {k: v for k, v in full.items()
                if k != "slice_axis" or "slice_axis" in settings}

    def build(settings: Mapping[str, Any], context: BuildContext) -> Any:
        settings, engine = dict(settings), context.engine
        if has_axis:
            if engine.axes is not None:  # tri-planar: thresholds fitted on slices along the first axis
                settings.setdefault("slice_axis", engine.axes[0])
            elif settings.setdefault("slice_axis", engine.axis) != engine.axis:
                raise ValueError(f"settings.slice_axis={settings['slice_axis']} differs from engine.axis="
                                 f"{engine.axis}; the filter must run on the slices the engine feeds it")
        return SegmenterMethod(build_segmenter(name, **settings), engine, progress=context.progress)

    summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    return MethodEntry(name, "classical", build, resolve=resolve, summary=summary)


#: The classical methods' registry entries (registered in :mod:`stego_core.methods`).
CLASSICAL = tuple(_entry(name) for name in SEGMENTERS)
