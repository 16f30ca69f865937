"""Small array helpers shared by the engine's post-processing and the metrics (no project imports but checks)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["connectivity_structure", "foreground_bbox"]

#: Connectivity (neighbours counted as touching) -> ``generate_binary_structure`` rank, per ndim.
_CONNECTIVITY_RANK = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}


def connectivity_structure(ndim: int, connectivity: int | None) -> np.ndarray:
    """The ``scipy.ndimage`` structuring element of ``connectivity`` (None = full: 26 in 3D, 8 in 2D)."""
    ranks = _CONNECTIVITY_RANK[ndim]
    if connectivity is None:
        connectivity = max(ranks)
    if connectivity not in ranks:
        raise ValueError(
            f"connectivity={connectivity!r} is not valid for {ndim}D masks; expected one of {sorted(ranks)}"
        )
    return ndimage.generate_binary_structure(ndim, ranks[connectivity])


def foreground_bbox(mask: np.ndarray, *, pad: int = 0) -> tuple[slice, ...] | None:
    """Bounding box of the foreground grown by ``pad`` voxels (``None`` if empty), one projection per axis (no
    full-volume argwhere)."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        if hits.size == 0:
            return None
        box.append(slice(max(0, int(hits[0]) - pad), int(hits[-1]) + 1 + pad))
    return tuple(box)
