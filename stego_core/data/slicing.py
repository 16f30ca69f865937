"""2D crops from 3D volumes, and the inverse: blending per-crop predictions back into a volume.

A crop is addressed by an index row ``(slice, row, col)``: the slice position along ``axis`` and the top-left
corner of the crop inside that slice (after padding slices that are smaller than the patch). The same index
cuts image crops, label crops, and places predictions back, so every step stays aligned.

>>> import numpy as np
>>> vol = np.arange(4 * 4 * 2, dtype=np.float32).reshape(4, 4, 2)
>>> index = crop_index(vol.shape, axis=2, patch_size=2, stride=2)
>>> crops = take_crops(vol, index, axis=2, patch_size=2)
>>> crops.shape, index.shape
((8, 2, 2), (8, 3))
>>> blender = CropBlender(vol.shape, axis=2, patch_size=2)
>>> blender.add(crops, index)
>>> np.array_equal(blender.result(), vol)
True
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stego_core._checks import check_choice, check_ndim, check_range


@dataclass(frozen=True)
class SlicingConfig:
    """2D crops cut from slices along ``axis`` (0, 1 or 2; 2 = axial for RAS-like volumes)."""

    axis: int = 2
    patch_size: int = 32
    stride: int = 16
    min_brain_fraction: float = 0.05

    def __post_init__(self) -> None:
        check_choice(self.axis, "slicing.axis", (0, 1, 2))
        check_range(self.patch_size, "slicing.patch_size", 4)
        check_range(self.stride, "slicing.stride", 1, self.patch_size)
        check_range(self.min_brain_fraction, "slicing.min_brain_fraction", 0.0, 1.0)




def crop_origins(length: int, patch_size: int, stride: int) -> np.ndarray:
    """Start offsets of windows of ``patch_size`` every ``stride`` covering ``[0, length)`` fully.

    The last window is aligned to the end, so nothing is left uncovered. ``length < patch_size`` gives ``[0]``
    (the caller pads).

    >>> crop_origins(10, 4, 4).tolist()
    [0, 4, 6]
    """
    check_range(patch_size, "patch_size", 1)
    check_range(stride, "stride", 1)
    if length <= patch_size:
        return np.zeros(1, dtype=np.int64)
    starts = list(range(0, length - patch_size + 1, stride))
    if starts[-1] != length - patch_size:
        starts.append(length - patch_size)
    return np.asarray(starts, dtype=np.int64)


def to_slices(volume: np.ndarray, axis: int) -> np.ndarray:
    """View ``volume`` (I, J, K) as a stack of 2D slices (S, H, W) along ``axis``."""
    check_ndim(volume, 3, "volume")
    _check_axis(axis)
    return np.moveaxis(volume, axis, 0)


def _check_axis(axis: int) -> None:
    if isinstance(axis, bool) or axis not in (0, 1, 2):
        raise ValueError(f"axis={axis!r} must be 0, 1 or 2")


def _padded_hw(shape_hw: tuple[int, int], patch_size: int) -> tuple[int, int]:
    return max(shape_hw[0], patch_size), max(shape_hw[1], patch_size)


def crop_index(volume_shape: tuple[int, int, int], *, axis: int, patch_size: int, stride: int,
               brain_mask: np.ndarray | None = None, min_brain_fraction: float = 0.0) -> np.ndarray:
    """All crop positions of a volume as an index ``(N, 3)`` of ``(slice, row, col)``.

    Parameters
    ----------
    volume_shape : (I, J, K) tuple
    axis : {0, 1, 2}
        Slicing axis.
    patch_size, stride : int
        Crop side and step in voxels (``stride < patch_size`` overlaps crops).
    brain_mask : (I, J, K) bool ndarray, optional
        Crops whose brain fraction is not above ``min_brain_fraction`` are skipped (so ``0.0`` skips crops
        with no brain at all). Without a mask every crop is kept.
    """
    _check_axis(axis)
    check_range(stride, "stride", 1, patch_size)
    check_range(min_brain_fraction, "min_brain_fraction", 0.0, 1.0)
    shape = tuple(int(s) for s in volume_shape)
    if len(shape) != 3:
        raise ValueError(f"volume_shape must have 3 sizes, got {volume_shape}")
    n_slices = shape[axis]
    h, w = [s for i, s in enumerate(shape) if i != axis]
    ph, pw = _padded_hw((h, w), patch_size)
    rows, cols = crop_origins(ph, patch_size, stride), crop_origins(pw, patch_size, stride)
    grid = np.stack(np.meshgrid(np.arange(n_slices), rows, cols, indexing="ij"), axis=-1).reshape(-1, 3)
    if brain_mask is None:
        return grid.astype(np.int64)
    if tuple(brain_mask.shape) != shape:
        raise ValueError(f"brain_mask has shape {brain_mask.shape} but the volume has shape {shape}")
    fractions = take_crops(brain_mask.astype(np.float32), grid, axis=axis, patch_size=patch_size).mean(axis=(1, 2))
    return grid[fractions > min_brain_fraction].astype(np.int64)


def take_crops(volume: np.ndarray, index: np.ndarray, *, axis: int, patch_size: int,
               pad_value: float | None = None) -> np.ndarray:
    """Cut the crops named by ``index`` out of ``volume``.

    Returns
    -------
    crops : (N, P, P) ndarray of ``volume``'s dtype
        Slices smaller than the patch are padded with ``pad_value`` (default: the volume minimum).
    """
    slices = to_slices(volume, axis)
    h, w = slices.shape[1:]
    ph, pw = _padded_hw((h, w), patch_size)
    if (ph, pw) != (h, w):
        fill = slices.min() if pad_value is None else pad_value
        slices = np.pad(slices, ((0, 0), (0, ph - h), (0, pw - w)), constant_values=fill)
    index = np.asarray(index, dtype=np.int64).reshape(-1, 3)
    offsets = np.arange(patch_size)
    s = index[:, 0, None, None]
    r = index[:, 1, None, None] + offsets[None, :, None]
    c = index[:, 2, None, None] + offsets[None, None, :]
    return np.ascontiguousarray(slices[s, r, c])


def blend_weights(patch_size: int, mode: str = "constant", *, sigma_scale: float = 0.125) -> np.ndarray:
    """Per-pixel weights (P, P) for blending overlapping crops: ``constant`` (ones) or ``gaussian``.

    The Gaussian has sigma ``sigma_scale * patch_size`` (MONAI's default) and is floored at 1e-3 so crop
    borders still count where nothing else covers them.
    """
    if mode == "constant":
        return np.ones((patch_size, patch_size), dtype=np.float32)
    if mode == "gaussian":
        x = np.arange(patch_size, dtype=np.float32) - (patch_size - 1) / 2
        g = np.exp(-0.5 * (x / (sigma_scale * patch_size)) ** 2)
        w = np.outer(g, g)
        return np.maximum(w / w.max(), 1e-3).astype(np.float32)
    raise ValueError(f"blend mode {mode!r} is not valid; choose 'constant' or 'gaussian'")


class CropBlender:
    """Accumulates per-crop predictions into a volume, batch by batch (weighted mean over overlaps).

    Voxels that no crop covers get 0.
    """

    def __init__(self, volume_shape: tuple[int, int, int], *, axis: int, patch_size: int, blend: str = "constant"):
        _check_axis(axis)
        self.shape = tuple(int(s) for s in volume_shape)
        self.axis = axis
        self.patch_size = patch_size
        n = self.shape[axis]
        h, w = [s for i, s in enumerate(self.shape) if i != axis]
        self._hw = (h, w)
        ph, pw = _padded_hw((h, w), patch_size)
        self._sum = np.zeros((n, ph, pw), dtype=np.float32)
        self._weight = np.zeros((n, ph, pw), dtype=np.float32)
        self._w = blend_weights(patch_size, blend)

    def add(self, predictions: np.ndarray, index: np.ndarray) -> None:
        """Add predictions (N, P, P) for crops at ``index`` (N, 3)."""
        p = self.patch_size
        if predictions.shape[1:] != (p, p) or len(predictions) != len(index):
            raise ValueError(f"predictions of shape {predictions.shape} do not match {len(index)} crops of size {p}")
        for pred, (s, r, c) in zip(predictions, np.asarray(index, dtype=np.int64)):
            self._sum[s, r:r + p, c:c + p] += pred * self._w
            self._weight[s, r:r + p, c:c + p] += self._w

    def result(self) -> np.ndarray:
        """The blended volume (I, J, K) float32."""
        h, w = self._hw
        out = np.divide(self._sum, self._weight, out=np.zeros_like(self._sum), where=self._weight > 0)[:, :h, :w]
        return np.ascontiguousarray(np.moveaxis(out, 0, self.axis))
