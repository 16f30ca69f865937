"""Label-free post-processing of 3D vessel predictions: an ordered list of small steps on arrays.

Every step is a plain function of the prediction (and, for the CRF, the image), with parameters fixed a priori;
no step ever sees a label. Two kinds:

Probability steps (run first, on the ``(I, J, K)`` float vessel probability)
    ``smooth`` (:func:`smooth_probability`): Gaussian smoothing, in voxels or mm, which removes single-voxel
    noise of voxel-wise rules and thins partial-volume rims of wide intensity classes;
    ``crf`` (:func:`crf_refine`): the dense CRF (:mod:`stego_core.engine.crf`) slice by slice, the seed's settings or a
    named ``preset`` (``thin`` keeps one-to-three-pixel vessels).
Mask steps (after the probability is thresholded at the segmenter's threshold, inside the brain mask)
    ``cc`` (:func:`remove_small_components`): drop connected components smaller than a size in voxels or mm^3;
    ``largest`` (:func:`keep_largest_trees`): keep the components at least a fraction of the largest one
    (the main vessel tree and the trees of comparable size);
    ``fill_holes`` (:func:`fill_small_holes`): fill enclosed cavities up to a size in voxels or mm^3.

:data:`STEPS` registers them (a new step is one function and one line there);
:func:`apply_postprocessing` runs a list of :class:`~stego_core.engine.postprocess.PostprocessStep` in order, and
:func:`steps_tag` names it for the ``method`` tag (``gmm+smooth+largest``). Components are counted with
26-connectivity in 3D (8 in 2D), the convention of :func:`stego_core.evaluation.metrics.n_components`.

>>> mask = np.zeros((8, 8, 8), bool); mask[1:4, 1:4, 1:4] = True; mask[6, 6, 6] = True
>>> int(remove_small_components(mask, min_size_vox=2).sum())
27
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from stego_core._arrays import connectivity_structure, foreground_bbox
from stego_core._checks import check_choice, check_ndim, check_range, check_same_shape
from stego_core.engine.crf import CRF_PRESETS


@dataclass(frozen=True)
class PostprocessStep:
    """One label-free post-processing step (:data:`stego_core.engine.postprocess.STEPS`), parameters fixed a priori.
    The fields are the union of the registered steps' parameters; each step accepts its own (checked here).

    ``step`` is one of

    - ``smooth``: Gaussian smoothing of the probability, ``sigma_vox`` or ``sigma_mm``;
    - ``crf``: the dense CRF on every slice along ``engine.axis`` (``crf_settings``, or a named ``preset`` of
      :data:`stego_core.engine.crf.CRF_PRESETS`: ``thin`` keeps one-to-three-pixel vessels);
    - ``cc``: drop connected components (26-connectivity unless ``connectivity``) smaller than
      ``min_size_vox`` voxels or ``min_size_mm3`` mm^3;
    - ``largest``: keep components of at least ``min_fraction`` times the largest one's size;
    - ``fill_holes``: fill enclosed cavities of at most ``max_size_vox`` voxels or ``max_size_mm3`` mm^3.

    Probability steps (``smooth``, ``crf``) must come before mask steps. In YAML:
    ``postprocess: [{step: cc, min_size_mm3: 10}, {step: fill_holes, max_size_vox: 8}]``.
    """

    step: str = "cc"
    min_size_vox: int | None = None
    min_size_mm3: float | None = None
    min_fraction: float | None = None
    max_size_vox: int | None = None
    max_size_mm3: float | None = None
    sigma_vox: float | None = None
    sigma_mm: float | None = None
    connectivity: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.step, "postprocess.step", tuple(STEPS))
        spec = STEPS[self.step]
        given = {f.name for f in dataclasses.fields(self) if f.name != "step" and getattr(self, f.name) is not None}
        extra = given - set(spec.params)
        if extra:
            raise ValueError(f"postprocess step {self.step!r} takes {sorted(spec.params) or 'no parameters'}; "
                             f"got {sorted(extra)}")
        if spec.one_of and len(given & set(spec.one_of)) != 1:
            raise ValueError(f"postprocess step {self.step!r} needs exactly one of {list(spec.one_of)}")
        if self.connectivity is not None:
            check_choice(self.connectivity, "postprocess.connectivity", (6, 18, 26))
        if self.preset is not None:
            check_choice(self.preset, "postprocess.preset", tuple(CRF_PRESETS))
        if self.min_fraction is not None:
            check_range(self.min_fraction, "postprocess.min_fraction", 0.0, 1.0, low_inclusive=False)
        for name in ("min_size_vox", "min_size_mm3", "max_size_vox", "max_size_mm3", "sigma_vox", "sigma_mm"):
            if getattr(self, name) is not None:
                check_range(getattr(self, name), f"postprocess.{name}", 0.0)



__all__ = [
    "MASK_STEPS",
    "PROB_STEPS",
    "STEPS",
    "PostprocessResult",
    "StepSpec",
    "apply_postprocessing",
    "component_sizes",
    "crf_refine",
    "fill_small_holes",
    "keep_largest_trees",
    "remove_small_components",
    "smooth_probability",
    "steps_tag",
]



def _as_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    check_ndim(mask, (2, 3), name)
    return mask if mask.dtype == bool else mask > 0


def _voxel_volume(spacing: Sequence[float] | None, ndim: int) -> float:
    if spacing is None:
        raise ValueError("a size in mm^3 needs the voxel spacing (spacing=None); give the size in voxels instead")
    sp = np.asarray(spacing, dtype=np.float64)
    if sp.shape != (ndim,) or not np.all(np.isfinite(sp)) or (sp <= 0).any():
        raise ValueError(f"spacing={spacing!r} must be {ndim} positive numbers (mm)")
    return float(np.prod(sp))


def _size_in_voxels(size_vox: float | None, size_mm3: float | None, spacing: Sequence[float] | None,
                    ndim: int, name: str) -> float:
    if (size_vox is None) == (size_mm3 is None):
        raise ValueError(f"give exactly one of {name}_vox and {name}_mm3")
    if size_vox is not None:
        check_range(size_vox, f"{name}_vox", 0)
        return float(size_vox)
    check_range(size_mm3, f"{name}_mm3", 0.0)
    return float(size_mm3) / _voxel_volume(spacing, ndim)


def component_sizes(mask: np.ndarray, *, connectivity: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Label connected components and count their voxels.

    Parameters
    ----------
    mask : (I, J[, K]) bool ndarray
    connectivity : {6, 18, 26} in 3D, {4, 8} in 2D, or None (full: 26 / 8)

    Returns
    -------
    labels : (I, J[, K]) int32 ndarray
        0 for background, 1..n for the components.
    sizes : (n + 1,) int64 ndarray
        Voxels per label; ``sizes[0] = 0``.
    """
    mask = _as_mask(mask)
    structure = connectivity_structure(mask.ndim, connectivity)
    labels = np.zeros(mask.shape, dtype=np.int32)
    box = foreground_bbox(mask)
    n = 0
    if box is not None:  # label inside the foreground's bounding box only (vessels fill a sliver of the volume)
        labels[box], n = ndi.label(mask[box], structure=structure)
    sizes = np.bincount(labels[box].ravel() if box is not None else [], minlength=n + 1).astype(np.int64)
    sizes[0] = 0
    return labels, sizes


def remove_small_components(mask: np.ndarray, *, min_size_vox: float | None = None,
                            min_size_mm3: float | None = None, spacing: Sequence[float] | None = None,
                            connectivity: int | None = None) -> np.ndarray:
    """Drop connected components smaller than a size fixed a priori.

    Parameters
    ----------
    mask : (I, J[, K]) bool ndarray
    min_size_vox : float, optional
        Components with fewer voxels are removed.
    min_size_mm3 : float, optional
        The same size in mm^3 (needs ``spacing``); give exactly one of the two.
    spacing : (ndim,) sequence of float, optional
        Voxel size in mm (anisotropic allowed).
    connectivity : int, optional
        Default full connectivity (26 in 3D).

    Returns
    -------
    (I, J[, K]) bool ndarray
        Components with at least ``min_size`` voxels (``min_size_mm3 / prod(spacing)``).
    """
    mask = _as_mask(mask)
    min_vox = _size_in_voxels(min_size_vox, min_size_mm3, spacing, mask.ndim, "min_size")
    labels, sizes = component_sizes(mask, connectivity=connectivity)
    keep = sizes >= min_vox
    keep[0] = False
    return keep[labels]


def keep_largest_trees(mask: np.ndarray, *, min_fraction: float = 0.05,
                       connectivity: int | None = None) -> np.ndarray:
    """Keep the largest component and every component at least ``min_fraction`` of its size.

    With ``min_fraction=1`` only the largest tree is kept; a small fraction also keeps separate trees of
    comparable size (the two carotid territories, a sinus cut from the arteries by the brain mask).

    Parameters
    ----------
    mask : (I, J[, K]) bool ndarray
    min_fraction : float in (0, 1]
    connectivity : int, optional
        Default full connectivity (26 in 3D).

    Returns
    -------
    (I, J[, K]) bool ndarray
    """
    check_range(min_fraction, "min_fraction", 0.0, 1.0, low_inclusive=False)
    mask = _as_mask(mask)
    labels, sizes = component_sizes(mask, connectivity=connectivity)
    if sizes.size <= 1:
        return mask.copy()
    keep = sizes >= min_fraction * sizes.max()
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, *, max_size_vox: float | None = None, max_size_mm3: float | None = None,
                     spacing: Sequence[float] | None = None) -> np.ndarray:
    """Fill enclosed background cavities (not connected to the outside) of at most a given size.

    Parameters
    ----------
    mask : (I, J[, K]) bool ndarray
    max_size_vox, max_size_mm3 : float
        Largest cavity filled, in voxels or in mm^3 (with ``spacing``); exactly one.
    spacing : (ndim,) sequence of float, optional

    Returns
    -------
    (I, J[, K]) bool ndarray
        ``mask`` plus its small holes (face connectivity for the background, full for the foreground).
    """
    mask = _as_mask(mask)
    max_vox = _size_in_voxels(max_size_vox, max_size_mm3, spacing, mask.ndim, "max_size")
    box = foreground_bbox(mask, pad=1)  # enclosed cavities lie inside the foreground's bounding box
    if box is None:
        return mask.copy()
    holes = np.zeros(mask.shape, dtype=bool)
    holes[box] = ndi.binary_fill_holes(mask[box]) & ~mask[box]
    if not holes.any():
        return mask.copy()
    labels, sizes = component_sizes(holes, connectivity=6 if mask.ndim == 3 else 4)
    small = sizes <= max_vox
    small[0] = False
    return mask | small[labels]


def smooth_probability(prob: np.ndarray, *, sigma_vox: float | None = None, sigma_mm: float | None = None,
                       spacing: Sequence[float] | None = None) -> np.ndarray:
    """Gaussian smoothing of a probability map.

    Parameters
    ----------
    prob : (I, J[, K]) float ndarray in [0, 1]
    sigma_vox : float, optional
        Standard deviation in voxels (the same on every axis).
    sigma_mm : float, optional
        Standard deviation in mm, converted per axis with ``spacing``; exactly one of the two.
    spacing : (ndim,) sequence of float, optional

    Returns
    -------
    (I, J[, K]) float32 ndarray in [0, 1]
    """
    prob = np.asarray(prob, dtype=np.float32)
    check_ndim(prob, (2, 3), "prob")
    if (sigma_vox is None) == (sigma_mm is None):
        raise ValueError("give exactly one of sigma_vox and sigma_mm")
    if sigma_vox is not None:
        check_range(sigma_vox, "sigma_vox", 0.0)
        sigma = float(sigma_vox)
    else:
        check_range(sigma_mm, "sigma_mm", 0.0)
        _voxel_volume(spacing, prob.ndim)  # validates spacing
        sigma = tuple(float(sigma_mm) / s for s in spacing)
    return np.clip(ndi.gaussian_filter(prob, sigma, mode="nearest", truncate=4.0), 0.0, 1.0).astype(np.float32)


def crf_refine(prob: np.ndarray, image: np.ndarray, *, axis: int = 2, settings=None) -> np.ndarray:
    """The seed's dense CRF (:func:`stego_core.engine.crf.refine_slice`) applied to every slice along ``axis``.

    Parameters
    ----------
    prob : (I, J, K) float ndarray in [0, 1]
    image : (I, J, K) float ndarray in [0, 1]
        The preprocessed image (the bilateral kernel compares its intensities).
    axis : {0, 1, 2}
    settings : stego_core.engine.crf.CRFSettings, optional

    Returns
    -------
    (I, J, K) float32 ndarray in [0, 1]
    """
    from stego_core.engine.crf import CRFSettings, refine_slice

    prob = np.asarray(prob, dtype=np.float32)
    check_ndim(prob, 3, "prob")
    check_same_shape(prob, image, "prob", "image")
    check_range(axis, "axis", 0, 2)
    settings = settings or CRFSettings()
    p = np.moveaxis(prob, axis, 0)
    im = np.moveaxis(np.asarray(image, dtype=np.float32), axis, 0)
    out = np.stack([refine_slice(i, s, settings) if s.max() > 0 else s for i, s in zip(im, p)])
    return np.moveaxis(out, 0, axis)


@dataclass
class PostprocessResult:
    """What :func:`apply_postprocessing` returns.

    Attributes
    ----------
    prob : (I, J, K) float32 ndarray
        The probability after the probability steps.
    mask : (I, J, K) bool ndarray
        The final segmentation.
    n_components_before, n_components_after : int
        Components of the thresholded probability before any mask step, and of the final mask.
    """

    prob: np.ndarray
    mask: np.ndarray
    n_components_before: int
    n_components_after: int


def _get(step, name: str, default=None):
    return step.get(name, default) if isinstance(step, dict) else getattr(step, name, default)


@dataclass(frozen=True)
class StepContext:
    """What a step may read besides the prediction: the image (CRF), voxel size, brain mask, slice axis."""

    image: np.ndarray | None
    spacing: Sequence[float] | None
    brain_mask: np.ndarray | None
    slice_axis: int
    crf_settings: object


@dataclass(frozen=True)
class StepSpec:
    """A registered post-processing step.

    ``kind`` is ``prob`` (float probability in, float out; runs before thresholding) or ``mask`` (bool in,
    bool out). ``run(data, context, **params)`` does the work; ``params`` are the keys a config may set and
    ``one_of`` the group of which exactly one must be given (e.g. a size in voxels or in mm^3).
    """

    kind: str
    run: Callable[..., np.ndarray]
    params: tuple[str, ...] = ()
    one_of: tuple[str, ...] = ()


def _crf(prob: np.ndarray, ctx: StepContext, preset: str | None = None) -> np.ndarray:
    """The ``crf`` step: a named preset's settings (:data:`stego_core.engine.crf.CRF_PRESETS`) or the run's own."""
    from stego_core.engine.crf import crf_preset

    if ctx.image is None:
        raise ValueError("the crf step needs the image")
    settings = crf_preset(preset) if preset else ctx.crf_settings
    return crf_refine(prob, ctx.image, axis=ctx.slice_axis, settings=settings)


def _fill_holes(mask: np.ndarray, ctx: StepContext, **params) -> np.ndarray:
    mask = fill_small_holes(mask, spacing=ctx.spacing, **params)
    return mask & ctx.brain_mask if ctx.brain_mask is not None else mask


#: The registry of steps: adding one is one function and one line here (its parameters must be fields of
#: :class:`stego_core.engine.postprocess.PostprocessStep`).
STEPS: dict[str, StepSpec] = {
    "smooth": StepSpec("prob", lambda p, ctx, **kw: smooth_probability(p, spacing=ctx.spacing, **kw),
                       ("sigma_vox", "sigma_mm"), ("sigma_vox", "sigma_mm")),
    "crf": StepSpec("prob", _crf, ("preset",)),
    "cc": StepSpec("mask", lambda m, ctx, **kw: remove_small_components(m, spacing=ctx.spacing, **kw),
                   ("min_size_vox", "min_size_mm3", "connectivity"), ("min_size_vox", "min_size_mm3")),
    "largest": StepSpec("mask", lambda m, ctx, **kw: keep_largest_trees(m, **kw), ("min_fraction", "connectivity")),
    "fill_holes": StepSpec("mask", _fill_holes, ("max_size_vox", "max_size_mm3"), ("max_size_vox", "max_size_mm3")),
}
#: Steps on the probability map (before thresholding).
PROB_STEPS = tuple(n for n, s in STEPS.items() if s.kind == "prob")
#: Steps on the binary mask (after thresholding).
MASK_STEPS = tuple(n for n, s in STEPS.items() if s.kind == "mask")


def _threshold(data: np.ndarray, prob: np.ndarray, is_mask: bool, threshold: float,
               brain_mask: np.ndarray | None) -> np.ndarray:
    mask = data.copy() if is_mask else prob > threshold
    if brain_mask is not None:
        mask &= brain_mask
    return mask


def apply_postprocessing(mask_or_prob: np.ndarray, image: np.ndarray | None, steps: Sequence,
                         spacing: Sequence[float] | None = None, *, threshold: float = 0.5,
                         brain_mask: np.ndarray | None = None, slice_axis: int = 2,
                         crf_settings=None) -> PostprocessResult:
    """Run an ordered list of label-free steps on a prediction.

    Parameters
    ----------
    mask_or_prob : (I, J, K) ndarray
        A bool mask, or a float probability in [0, 1] (thresholded at ``threshold``, strictly above, after the
        probability steps). A bool input accepts mask steps only.
    image : (I, J, K) float ndarray in [0, 1] or None
        The preprocessed image; needed by ``crf`` only.
    steps : sequence of PostprocessStep or dict
        Each has ``step`` (a name of :data:`STEPS`) and that step's parameters
        (:class:`stego_core.engine.postprocess.PostprocessStep`). Probability steps must come before mask steps.
    spacing : (3,) sequence of float, optional
        Voxel size in mm, for sizes in mm^3 and sigmas in mm.
    threshold : float
        The segmenter's a-priori threshold.
    brain_mask : (I, J, K) bool ndarray, optional
        The result is restricted to it.
    slice_axis : int
        Axis of the slices the CRF refines (the engine's axis).
    crf_settings : stego_core.config.CRFSettings, optional
        Settings of the ``crf`` step (the seed's by default).

    Returns
    -------
    PostprocessResult
    """
    data = np.asarray(mask_or_prob)
    check_ndim(data, (2, 3), "mask_or_prob")
    is_mask = data.dtype == bool
    prob = data.astype(np.float32)
    seen_mask_step = False
    names = [str(_get(s, "step")) for s in steps]
    for name in names:
        if name not in STEPS:
            raise ValueError(f"unknown post-processing step {name!r}; expected one of {tuple(STEPS)}")
        if STEPS[name].kind == "mask":
            seen_mask_step = True
        elif seen_mask_step:
            raise ValueError(f"probability step {name!r} after a mask step; order probability steps "
                             f"({', '.join(PROB_STEPS)}) first: {names}")
        elif is_mask:
            raise ValueError(f"step {name!r} needs a probability map, but a binary mask was given")
    ctx = StepContext(image=image, spacing=spacing, brain_mask=brain_mask, slice_axis=slice_axis,
                      crf_settings=crf_settings)
    mask = None
    before = None
    for step, name in zip(steps, names):
        spec = STEPS[name]
        params = {p: _get(step, p) for p in spec.params if _get(step, p) is not None}
        if spec.kind == "prob":
            prob = spec.run(prob, ctx, **params)
            continue
        if mask is None:
            mask = _threshold(data, prob, is_mask, threshold, brain_mask)
            before = int(component_sizes(mask)[1].size - 1)
        mask = spec.run(mask, ctx, **params)
    if mask is None:
        mask = _threshold(data, prob, is_mask, threshold, brain_mask)
        before = after = int(component_sizes(mask)[1].size - 1)
    else:
        after = int(component_sizes(mask)[1].size - 1)
    return PostprocessResult(prob=prob, mask=mask, n_components_before=before, n_components_after=after)


def steps_tag(steps: Sequence) -> str:
    """The steps as a method-tag suffix: ``"+smooth+largest"``, a CRF preset as ``"+crf-thin"`` (empty for no
    steps)."""
    return "".join(f"+{_get(s, 'step')}" + (f"-{_get(s, 'preset')}" if _get(s, "preset") else "") for s in steps)
