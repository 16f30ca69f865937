"""The reconstruction engine: any segmenter, a sliding window over every slice, one 3D vessel volume.

``preprocessed volume -> crops (batched) -> segmenter -> blended probabilities -> threshold -> brain mask``.
Only the image enters the segmenter; labels are used by :mod:`stego_core.metrics`, never here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from stego_core._checks import check_ndim, check_range, check_same_shape
from stego_core.config import BLEND_MODES, check_choice
from stego_core.segmenter import Segmenter
from stego_core.slicing import CropBlender, crop_index, take_crops


@dataclass(frozen=True)
class EngineConfig:
    """Sliding-window settings.

    ``patch_size: null`` feeds whole slices (what the classical baselines want); ``stride`` defaults to half a
    patch. ``blend`` weights overlapping crops (``constant`` or ``gaussian``).
    """

    axis: int = 2
    patch_size: int | None = 32
    stride: int | None = None
    batch_size: int = 64
    blend: str = "gaussian"

    def __post_init__(self) -> None:
        check_choice(self.axis, "engine.axis", (0, 1, 2))
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


def predict_volume(segmenter: Segmenter, image: np.ndarray, brain_mask: np.ndarray, engine: EngineConfig, *,
                   progress: bool = True) -> np.ndarray:
    """Vessel probabilities of a preprocessed volume.

    Parameters
    ----------
    segmenter : Segmenter
        ``fit_volume(image, brain_mask)`` is called once (image statistics only), then ``predict_slices`` on
        batches of ``engine.batch_size`` crops.
    image : (I, J, K) float32 ndarray in [0, 1]
    brain_mask : (I, J, K) bool ndarray
        Crops without brain are not predicted; voxels outside the mask get probability 0.

    Returns
    -------
    prob : (I, J, K) float32 ndarray in [0, 1]
    """
    check_ndim(image, 3, "image")
    check_same_shape(image, brain_mask, "image", "brain_mask")
    patch, stride = window(image.shape, engine)
    segmenter.fit_volume(image, brain_mask)
    index = crop_index(image.shape, axis=engine.axis, patch_size=patch, stride=stride, brain_mask=brain_mask,
                       min_brain_fraction=0.0)
    blender = CropBlender(image.shape, axis=engine.axis, patch_size=patch, blend=engine.blend)
    batches = range(0, len(index), engine.batch_size)
    for start in tqdm(batches, desc=f"predict {segmenter.name}", unit="batch", disable=not progress, leave=False):
        idx = index[start:start + engine.batch_size]
        crops = take_crops(image, idx, axis=engine.axis, patch_size=patch, pad_value=0.0)
        pred = np.asarray(segmenter.predict_slices(crops), dtype=np.float32)
        if pred.shape != crops.shape:
            raise ValueError(f"segmenter {segmenter.name} returned shape {pred.shape} for crops {crops.shape}")
        blender.add(pred, idx)
    prob = blender.result()
    prob[~brain_mask] = 0.0
    return np.clip(prob, 0.0, 1.0)


def binarize(prob: np.ndarray, threshold: float, brain_mask: np.ndarray | None = None) -> np.ndarray:
    """``prob > threshold`` inside the brain mask, as bool."""
    check_range(threshold, "threshold", 0.0, 1.0)
    mask = prob > threshold
    if brain_mask is not None:
        mask &= brain_mask
    return mask


def segment_volume(segmenter: Segmenter, image: np.ndarray, brain_mask: np.ndarray, engine: EngineConfig, *,
                   progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and the binary 3D segmentation (thresholded at the segmenter's own a-priori threshold)."""
    prob = predict_volume(segmenter, image, brain_mask, engine, progress=progress)
    return prob, binarize(prob, float(segmenter.threshold), brain_mask)
