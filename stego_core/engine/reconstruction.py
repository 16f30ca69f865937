"""The reconstruction engine: any segmenter, a sliding window over every slice, one 3D vessel volume.

``preprocessed volume -> crops (batched) -> segmenter -> blended probabilities -> threshold -> brain mask``.
With ``engine.axes`` the same window runs along several axes and the probabilities are fused (tri-planar
fusion); volume-level segmenters (3D vesselness) score the whole volume in one call instead.
Only the image enters the segmenter; labels are used by :mod:`stego_core.evaluation.metrics`, never here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from stego_core._checks import check_choice, check_ndim, check_range, check_same_shape
from stego_core.data.slicing import CropBlender, crop_index, take_crops
from stego_core.engine.segmenter import Segmenter

BLEND_MODES = ("constant", "gaussian")


FUSION_MODES = ("mean", "max")


@dataclass(frozen=True)
class EngineConfig:
    """Sliding-window settings, one default for every method.

    ``patch_size: null`` (default) is the method's own window: whole slices for the classical methods, the
    training crop size for a learned model. ``stride`` defaults to half a patch. ``blend`` weights overlapping
    crops (``constant`` or ``gaussian``); whole slices do not overlap and are taken as they are. ``batch_size``
    is the number of slices or crops cut and blended at once.

    Tri-planar fusion: ``axes: [0, 1, 2]`` runs the same sliding window along each listed axis (``axis`` is then
    ignored) and fuses the probabilities voxel by voxel, ``fusion: mean`` (the average: a voxel needs support
    from the views on average, which suppresses one-view streaks) or ``max`` (any one view suffices: more
    recall, more false positives). ``axes: null`` (default) slices along ``axis`` only. Volume-level
    segmenters (``frangi3d``, ``sato3d``) ignore the axes.
    """

    axis: int = 2
    patch_size: int | None = None
    stride: int | None = None
    batch_size: int = 64
    blend: str = "gaussian"
    axes: tuple[int, ...] | None = None
    fusion: str = "mean"

    def __post_init__(self) -> None:
        check_choice(self.axis, "engine.axis", (0, 1, 2))
        check_choice(self.fusion, "engine.fusion", FUSION_MODES)
        if self.axes is not None:
            if not self.axes or len(set(self.axes)) != len(self.axes):
                raise ValueError(f"engine.axes={self.axes!r} must list distinct axes among 0, 1, 2")
            for a in self.axes:
                check_choice(a, "engine.axes", (0, 1, 2))
        check_choice(self.blend, "engine.blend", BLEND_MODES)
        check_range(self.batch_size, "engine.batch_size", 1)
        if self.patch_size is not None:
            check_range(self.patch_size, "engine.patch_size", 4)
        if self.stride is not None:
            check_range(self.stride, "engine.stride", 1, self.patch_size)




def window(volume_shape: tuple[int, int, int], engine: EngineConfig) -> tuple[int, int]:
    """The (patch_size, stride) the engine uses on a volume of this shape."""
    if engine.patch_size is None:
        patch = max(s for i, s in enumerate(volume_shape) if i != engine.axis)
        return patch, patch
    return engine.patch_size, engine.stride or max(1, engine.patch_size // 2)


def sliding_window(volume_shape: tuple[int, int, int], index: np.ndarray,
                   predict: Callable[[slice], np.ndarray], *, axis: int, patch_size: int, blend: str,
                   batch_size: int, brain_mask: np.ndarray | None = None, progress: bool = False,
                   desc: str = "predict") -> np.ndarray:
    """The one sliding window: predict crops batch by batch and blend them back into a volume.

    Evaluation (:func:`predict_volume`, crops cut from the image) and training validation (cached features
    of the same crops) both call it, so blending and masking are defined once.

    Parameters
    ----------
    volume_shape : (I, J, K) tuple of int
    index : (N, 3) int ndarray
        ``(slice, row, col)`` of every crop (:func:`stego_core.data.slicing.crop_index`).
    predict : callable
        ``predict(batch)`` with ``batch`` a ``slice`` of ``index`` returns the (n, P, P) probabilities of those
        crops.
    axis, patch_size, blend
        Slicing axis, crop side ``P`` and overlap weighting (``constant`` or ``gaussian``).
    batch_size : int
        Crops per call of ``predict``.
    brain_mask : (I, J, K) bool ndarray, optional
        Voxels outside it get probability 0.

    Returns
    -------
    prob : (I, J, K) float32 ndarray in [0, 1]
    """
    blender = CropBlender(volume_shape, axis=axis, patch_size=patch_size, blend=blend)
    starts = range(0, len(index), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=None if progress else True, leave=False):
        batch = slice(start, start + batch_size)
        pred = np.asarray(predict(batch), dtype=np.float32)
        expected = (len(index[batch]), patch_size, patch_size)
        if pred.shape != expected:
            raise ValueError(f"{desc}: predictions of shape {pred.shape} for crops of shape {expected}")
        blender.add(pred, index[batch])
    prob = blender.result()
    if brain_mask is not None:
        prob[~brain_mask] = 0.0
    return np.clip(prob, 0.0, 1.0)


def is_volume_level(segmenter: Segmenter) -> bool:
    """True for segmenters that score the whole volume at once (``volume_level = True``, e.g. ``frangi3d``):
    the engine calls their ``predict_volume(image, brain_mask, spacing)`` instead of sliding a window."""
    return bool(getattr(segmenter, "volume_level", False))


def _predict_axis(segmenter: Segmenter, image: np.ndarray, brain_mask: np.ndarray, engine: EngineConfig,
                  axis: int, progress: bool) -> np.ndarray:
    """One sliding-window pass along ``axis`` (the segmenter is fitted on the volume first)."""
    view = dataclasses.replace(engine, axis=axis, axes=None)
    patch, stride = window(image.shape, view)
    if hasattr(segmenter, "slice_axis"):  # 2D filters fit their thresholds on slices along the axis fed to them
        segmenter.slice_axis = axis
    segmenter.fit_volume(image, brain_mask)
    index = crop_index(image.shape, axis=axis, patch_size=patch, stride=stride, brain_mask=brain_mask,
                       min_brain_fraction=0.0)

    def predict(batch: slice) -> np.ndarray:
        crops = take_crops(image, index[batch], axis=axis, patch_size=patch, pad_value=0.0)
        return segmenter.predict_slices(crops)

    # whole slices do not overlap: nothing to blend (constant weights return each slice's scores as they are)
    blend = "constant" if engine.patch_size is None else engine.blend
    return sliding_window(image.shape, index, predict, axis=axis, patch_size=patch, blend=blend,
                          batch_size=engine.batch_size, brain_mask=brain_mask, progress=progress,
                          desc=f"predict {segmenter.name} (axis {axis})")


def fuse_probabilities(probs: Sequence[np.ndarray], fusion: str = "mean") -> np.ndarray:
    """Fuse per-axis probability volumes voxel by voxel.

    Parameters
    ----------
    probs : sequence of (I, J, K) float ndarray in [0, 1]
        One volume per slicing axis.
    fusion : {"mean", "max"}
        ``mean`` averages the views; ``max`` takes the most confident view.

    Returns
    -------
    (I, J, K) float32 ndarray in [0, 1]
    """
    check_choice(fusion, "fusion", FUSION_MODES)
    if len(probs) == 0:
        raise ValueError("fuse_probabilities needs at least one probability volume")
    for p in probs[1:]:
        check_same_shape(probs[0], p, "probs[0]", "probs[i]")
    out = np.array(probs[0], dtype=np.float32, copy=True)
    for p in probs[1:]:
        if fusion == "mean":
            out += p
        else:
            np.maximum(out, p, out=out)
    if fusion == "mean":
        out /= len(probs)
    return out


def predict_volume(segmenter: Segmenter, image: np.ndarray, brain_mask: np.ndarray, engine: EngineConfig, *,
                   progress: bool = True, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Vessel probabilities of a preprocessed volume.

    Slice-based segmenters: ``fit_volume(image, brain_mask)`` is called once per slicing axis (image
    statistics only), then ``predict_slices`` on batches of ``engine.batch_size`` crops through
    :func:`sliding_window`; with ``engine.axes`` the pass runs along every listed axis and the probabilities are
    fused (:func:`fuse_probabilities`, ``engine.fusion``). Volume-level segmenters (:func:`is_volume_level`)
    are called once on the whole volume.

    Parameters
    ----------
    segmenter : Segmenter
    image : (I, J, K) float32 ndarray in [0, 1]
    brain_mask : (I, J, K) bool ndarray
        Crops without brain are not predicted; voxels outside the mask get probability 0.
    engine : EngineConfig
    spacing : (3,) sequence of float, optional
        Voxel size in mm, passed to volume-level segmenters (scales in mm).

    Returns
    -------
    prob : (I, J, K) float32 ndarray in [0, 1]
    """
    check_ndim(image, 3, "image")
    check_same_shape(image, brain_mask, "image", "brain_mask")
    if is_volume_level(segmenter):
        prob = np.asarray(segmenter.predict_volume(image, brain_mask, spacing=spacing), dtype=np.float32)
        check_same_shape(image, prob, "image", f"{segmenter.name} prediction")
        prob = np.where(brain_mask, prob, 0.0).astype(np.float32)
        return np.clip(prob, 0.0, 1.0)
    axes = engine.axes if engine.axes is not None else (engine.axis,)
    probs = [_predict_axis(segmenter, image, brain_mask, engine, axis, progress) for axis in axes]
    return fuse_probabilities(probs, engine.fusion) if len(probs) > 1 else probs[0]


def binarize(prob: np.ndarray, threshold: float, brain_mask: np.ndarray | None = None) -> np.ndarray:
    """``prob > threshold`` inside the brain mask, as bool."""
    check_range(threshold, "threshold", 0.0, 1.0)
    mask = prob > threshold
    if brain_mask is not None:
        mask &= brain_mask
    return mask
