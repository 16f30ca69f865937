"""The segmenter interface shared by STEGO and the classical baselines.

The reconstruction engine needs nothing else from a method: it calls :meth:`Segmenter.fit_volume` once on
the preprocessed volume, then :meth:`Segmenter.predict_slices` on batches of 2D slices or crops, blends the
per-crop scores, binarises them at :attr:`Segmenter.threshold`, stacks them into 3D and masks the result with
the brain mask. Labels never enter a segmenter.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Segmenter"]


@runtime_checkable
class Segmenter(Protocol):
    """What a vessel segmenter provides to the reconstruction engine.

    Attributes
    ----------
    name : str
        Registered method name, used as the ``method`` tag and in results tables (``otsu``, ``stego``...).
    threshold : float
        Scores above this value are vessel (0.5 for every baseline).
    """

    name: str
    threshold: float

    def fit_volume(self, image: np.ndarray, brain_mask: np.ndarray | None) -> None:
        """Compute volume-level statistics, unsupervised (image only); may be a no-op.

        Parameters
        ----------
        image : (I, J, K) float32 ndarray
            Preprocessed volume, intensities in [0, 1].
        brain_mask : (I, J, K) bool ndarray or None
            Voxels whose statistics count (None: all voxels).
        """
        ...

    def predict_slices(self, slices: np.ndarray) -> np.ndarray:
        """Score 2D slices or crops.

        Parameters
        ----------
        slices : (N, H, W) float32 ndarray
            Preprocessed slices or crops, intensities in [0, 1].

        Returns
        -------
        (N, H, W) float32 ndarray
            Vessel probability or score in [0, 1]; above :attr:`threshold` means vessel.
        """
        ...
