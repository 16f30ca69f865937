"""Backbone features of crops, cached on disk, and the kNN table STEGO draws positive pairs from.

The backbone is frozen, so a crop's features are a pure function of the crop, the backbone name, its input
``res`` and its weights. They are computed once (:func:`compute_features`, batched, optionally straight into
a ``.npy`` memmap) and read by kNN, training and inference alike. :func:`load_or_compute_features` keeps a JSON
sidecar with that key and recomputes when anything in it changed (a stale cache is never read).

:func:`knn_table` ranks, for every crop, the crops with the most similar global-average-pooled features
(cosine similarity, faiss exact search). Column 0 is the crop itself; STEGO draws a crop's positive partner
uniformly from ranks ``1..7`` (:func:`draw_knn_partners`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from stego_core._checks import check_finite, check_ndim
from stego_core.features.backbones import Backbone
from stego_core.features.base import forward_batch_size
from stego_core.runtime.progress import PlainProgress

__all__ = [
    "FeatureCacheMeta",
    "OnlineFeatures",
    "compute_features",
    "compute_pooled_features",
    "crops_digest",
    "draw_knn_partners",
    "feature_bytes_per_crop",
    "knn_table",
    "load_features",
    "load_or_compute_features",
    "pool_features",
]

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 1
_RANGE_TOL = 1e-3


def _check_crops(crops: np.ndarray) -> None:
    check_ndim(crops, 3, "crops")
    if crops.shape[0] == 0:
        raise ValueError("crops is empty (N = 0)")
    if crops.shape[1] != crops.shape[2]:
        raise ValueError(f"crops must be square (N, P, P); got shape {crops.shape}")
    check_finite(crops, "crops")
    lo, hi = float(np.min(crops)), float(np.max(crops))
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"crops must be preprocessed intensities in [0, 1]; got values in [{lo:g}, {hi:g}]")


def compute_features(backbone: Backbone, crops: np.ndarray, *, batch_size: int | None = None, device: str = "cpu",
                     dtype: np.dtype | str = np.float16, amp: bool = False, out_path: str | Path | None = None,
                     progress: bool = True) -> np.ndarray:
    """Backbone features of every crop, batched.

    Parameters
    ----------
    backbone : Backbone
        A frozen backbone from :func:`stego_core.features.backbones.build_backbone`; moved to ``device``.
    crops : (N, P, P) float32 ndarray
        Preprocessed crops, intensities in [0, 1] (an ``np.memmap`` is fine; read batch by batch).
    batch_size : int, optional
        Crops per forward pass; by default chosen from the backbone and the device's memory
        (:func:`~stego_core.features.base.forward_batch_size`).
    device : str
        Torch device to run on (``"cpu"``, ``"cuda"``, ``"cuda:1"``).
    dtype : numpy dtype
        Storage dtype of the result (float16 halves the size; float32 for exactness).
    amp : bool
        Run the backbone under bfloat16 autocast (CUDA only; ignored on CPU).
    out_path : path, optional
        Write into a ``.npy`` file (``numpy.lib.format.open_memmap``) and return the memmap, so the features
        never need to fit in memory. In memory when None.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    features : (N, C, h, w) ndarray of ``dtype``
        ``(C, h, w) = backbone.output_shape(P)``.
    """
    if not isinstance(crops, np.ndarray):
        crops = np.asarray(crops, dtype=np.float32)
    _check_crops(crops)
    dev = torch.device(device)
    use_amp = bool(amp) and dev.type == "cuda"
    if batch_size is None:
        batch_size = forward_batch_size(backbone.spec, dev, dtype_bytes=2 if use_amp else 4)
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    n, p = crops.shape[0], crops.shape[1]
    shape = (n, *backbone.output_shape(p))
    dtype = np.dtype(dtype)
    if out_path is not None:
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out = open_memmap(out_path, mode="w+", dtype=dtype, shape=shape)
    else:
        out = np.empty(shape, dtype=dtype)
    backbone.to(dev)
    plain = PlainProgress("features", n, logger, unit="crop", enabled=progress)
    with torch.inference_mode(), tqdm(total=n, disable=None if progress else True, unit="crop", desc="features") as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            x = torch.from_numpy(np.ascontiguousarray(crops[start:stop], dtype=np.float32))[:, None].to(dev)
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=use_amp):
                f = backbone(x)
            if tuple(f.shape[1:]) != shape[1:]:
                raise RuntimeError(f"backbone {backbone.name} returned {tuple(f.shape[1:])}, "
                                   f"expected {shape[1:]} per crop")
            f = f.to(torch.float16) if dtype == np.float16 else f.float()  # narrow on the device, copy less
            out[start:stop] = f.cpu().numpy().astype(dtype, copy=False)
            bar.update(stop - start)
            plain.update(stop)
    if isinstance(out, np.memmap):
        out.flush()
    return out


# ----------------------------------------------------------------------------------------------------------
# Cache


@dataclasses.dataclass(frozen=True)
class FeatureCacheMeta:
    """What a cached feature file depends on; stored as JSON beside the ``.npy``.

    Attributes
    ----------
    backbone : str
        Backbone name.
    res : int
        Backbone input side in pixels (output grid side for ``classical``).
    weights : str
        ``Backbone.weights_id`` (source and content digest of the weights).
    crop_digest : str
        :func:`crops_digest` of the crops.
    shape : tuple of int
        ``(N, C, h, w)`` of the features.
    dtype : str
        Storage dtype.
    version : int
        Cache format version.
    """

    backbone: str
    res: int
    weights: str
    crop_digest: str
    shape: tuple[int, ...]
    dtype: str
    version: int = CACHE_FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FeatureCacheMeta:
        d = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"feature cache metadata has unknown keys {sorted(unknown)}; valid: {sorted(names)}")
        d["shape"] = tuple(d["shape"])
        return cls(**d)


def crops_digest(crops: np.ndarray) -> str:
    """SHA-256 (hex, 32 chars) of the crops' shape, dtype and bytes, read in chunks (memmaps welcome)."""
    h = hashlib.sha256(f"{crops.shape}|{np.dtype(crops.dtype).str}".encode())
    step = max(1, (1 << 24) // max(1, int(np.prod(crops.shape[1:])) * crops.dtype.itemsize))
    for start in range(0, crops.shape[0], step):
        h.update(np.ascontiguousarray(crops[start:start + step]).tobytes())
    return h.hexdigest()[:32]


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def _partial_path(path: Path) -> Path:
    """Where this process writes a cache file before publishing it (unique per process, so concurrent runs
    computing the same features never write into each other's file)."""
    return path.with_name(f"{path.name}.{os.getpid()}.partial.npy")


def _publish(tmp: Path, path: Path, meta: FeatureCacheMeta) -> None:
    """Move a finished cache file into place, then its metadata (each an atomic rename; metadata last)."""
    os.replace(tmp, path)
    meta_tmp = _meta_path(tmp)
    meta_tmp.write_text(meta.to_json())
    os.replace(meta_tmp, _meta_path(path))


def load_features(path: str | Path, *, mmap: bool = True) -> tuple[np.ndarray, FeatureCacheMeta]:
    """Read a feature cache written by :func:`load_or_compute_features`.

    Returns
    -------
    features : (N, C, h, w) ndarray
        Read-only memmap when ``mmap`` (the default), else in memory.
    meta : FeatureCacheMeta
    """
    path = Path(path)
    meta_file = _meta_path(path)
    if not path.is_file() or not meta_file.is_file():
        raise FileNotFoundError(f"feature cache {path} (with {meta_file.name}) not found or incomplete")
    meta = FeatureCacheMeta.from_json(meta_file.read_text())
    features = np.load(path, mmap_mode="r" if mmap else None)
    if tuple(features.shape) != tuple(meta.shape) or str(features.dtype) != meta.dtype:
        raise ValueError(f"feature cache {path} holds {features.shape} {features.dtype} but its metadata says "
                         f"{meta.shape} {meta.dtype}")
    return features, meta


def feature_bytes_per_crop(backbone: Backbone, patch_size: int, dtype: np.dtype | str = np.float16) -> int:
    """Bytes one crop's features take in the cache: ``C * h * w`` values of ``dtype``.

    Examples: ViT-S/8 at 224 (384 x 28 x 28, float16) 0.60 MB; the in-domain ViT-T/2 on 32-pixel crops
    (192 x 16 x 16) 98 kB.
    """
    return int(np.prod(backbone.output_shape(patch_size))) * np.dtype(dtype).itemsize


def load_or_compute_features(backbone: Backbone, crops: np.ndarray, path: str | Path, *,
                             batch_size: int | None = None,
                             device: str = "cpu", dtype: np.dtype | str = np.float16, amp: bool = False,
                             progress: bool = True, digest: str | None = None) -> tuple[np.ndarray, FeatureCacheMeta]:
    """Return cached features of ``crops`` when ``path`` holds them for this backbone, else compute and cache.

    The cache is valid when its metadata (backbone name, ``res``, weights id, crop digest, shape, dtype,
    format version) equals the current one; otherwise it is stale, logged, and overwritten.

    Parameters
    ----------
    backbone : Backbone
        Frozen backbone (its ``cache_key()`` enters the metadata).
    crops : (N, P, P) float32 ndarray
        Preprocessed crops in [0, 1].
    path : path
        The ``.npy`` file; metadata goes to the same name with ``.json``.
    batch_size, device, dtype, amp, progress
        As in :func:`compute_features`.
    digest : str, optional
        :func:`crops_digest` of ``crops`` when the caller has it already (it is not computed twice).

    Returns
    -------
    features : (N, C, h, w) ndarray
        Read-only memmap of the cache file.
    meta : FeatureCacheMeta
    """
    path = Path(path)
    if path.suffix != ".npy":
        raise ValueError(f"feature cache path {path} must end in .npy")
    _check_crops(crops)
    key = backbone.cache_key()
    want = FeatureCacheMeta(backbone=str(key["backbone"]), res=int(key["res"]), weights=str(key["weights"]),
                            crop_digest=digest or crops_digest(crops),
                            shape=(crops.shape[0], *backbone.output_shape(crops.shape[1])),
                            dtype=np.dtype(dtype).name)
    if path.is_file() and _meta_path(path).is_file():
        try:
            have = FeatureCacheMeta.from_json(_meta_path(path).read_text())
        except (ValueError, TypeError, KeyError) as exc:
            have = None
            logger.warning("feature cache %s: unreadable metadata (%s); recomputing", path, exc)
        if have == want:
            logger.info("feature cache %s: valid, loading", path)
            return load_features(path)
        if have is not None:
            diff = {f.name: (getattr(have, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)
                    if getattr(have, f.name) != getattr(want, f.name)}
            logger.info("feature cache %s: stale (%s); recomputing", path, diff)
    _meta_path(path).unlink(missing_ok=True)  # no metadata = incomplete, whatever happens next
    tmp = _partial_path(path)
    compute_features(backbone, crops, batch_size=batch_size, device=device, dtype=dtype, amp=amp, out_path=tmp,
                     progress=progress)
    _publish(tmp, path, want)
    return load_features(path)


# ----------------------------------------------------------------------------------------------------------
# kNN


def pool_features(features: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
    """Global average pool ``(N, C, h, w) -> (N, C)`` float32, chunked (memmaps stay on disk).

    A 2D ``(N, C)`` input is returned as float32 unchanged.
    """
    check_ndim(features, (2, 4), "features")
    if features.ndim == 2:
        return np.asarray(features, dtype=np.float32)
    out = np.empty(features.shape[:2], dtype=np.float32)
    for start in range(0, features.shape[0], chunk):
        out[start:start + chunk] = np.asarray(features[start:start + chunk], dtype=np.float32).mean(axis=(2, 3))
    return out


def compute_pooled_features(backbone: Backbone, crops: np.ndarray, *, batch_size: int | None = None,
                            device: str = "cpu", amp: bool = False, chunk: int = 1024,
                            progress: bool = True) -> np.ndarray:
    """Global-average-pooled backbone features ``(N, C)`` of every crop, never holding more than ``chunk`` crops'
    feature maps: the feature bank that :func:`knn_table` ranks when training without a cache.

    Each chunk's maps are stored as float16 before pooling, exactly as :func:`load_or_compute_features` caches
    them, so the kNN table (and hence every partner drawn) is the cached path's.

    Parameters
    ----------
    backbone, crops, batch_size, device, amp, progress
        As in :func:`compute_features`.
    chunk : int
        Crops whose full feature maps are held at once.

    Returns
    -------
    pooled : (N, C) float32 ndarray
    """
    _check_crops(crops)
    out = np.empty((crops.shape[0], backbone.output_shape(crops.shape[1])[0]), dtype=np.float32)
    for start in range(0, crops.shape[0], chunk):
        maps = compute_features(backbone, crops[start:start + chunk], batch_size=batch_size, device=device,
                                dtype=np.float16, amp=amp, progress=progress)
        out[start:start + len(maps)] = pool_features(maps)
    return out


class OnlineFeatures:
    """Backbone features of ``crops`` computed when indexed, never stored: an array-like stand-in for a cached
    ``(N, C, h, w)`` feature array (``len``, ``shape``, ``features[i]``, ``features[a:b]``, ``features[index]``),
    float32.

    Parameters
    ----------
    backbone : Backbone
        The frozen backbone.
    crops : (N, P, P) float32 ndarray
        Preprocessed crops in [0, 1].
    batch_size, device, amp
        As in :func:`compute_features`.
    """

    def __init__(self, backbone: Backbone, crops: np.ndarray, *, batch_size: int | None = None,
                 device: str = "cpu", amp: bool = False) -> None:
        self.backbone, self.crops = backbone, crops
        self.batch_size, self.device, self.amp = batch_size, device, amp
        self.dtype = np.dtype(np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.crops), *self.backbone.output_shape(self.crops.shape[1]))

    @property
    def ndim(self) -> int:
        return 4

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, key: int | slice | np.ndarray) -> np.ndarray:
        crops = self.crops[key]
        if crops.ndim == 2:  # one crop
            return self[np.array([key])][0]
        if len(crops) == 0:
            return np.empty((0, *self.shape[1:]), dtype=np.float32)
        return compute_features(self.backbone, crops, batch_size=self.batch_size, device=self.device,
                                dtype=np.float32, amp=self.amp, progress=False)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


def knn_table(features: np.ndarray, *, k: int = 30) -> np.ndarray:
    """Indices of each crop's ``k`` most similar crops (cosine similarity of pooled features), self first.

    Exact search (faiss ``IndexFlatIP`` on L2-normalised float32 vectors, i.e. cosine similarity), as in
    STEGO's precomputed kNN table. Column 0 is always the crop itself (enforced even when duplicates tie with
    it); columns ``1..k-1`` are its neighbours, most similar first. STEGO draws positives from ranks ``1..7``.

    Parameters
    ----------
    features : (N, C, h, w) or (N, C) ndarray
        Backbone features (global-average-pooled here) or already pooled vectors.
    k : int
        Columns kept (self included); ``min(k, N)`` when fewer crops exist.

    Returns
    -------
    knn : (N, min(k, N)) int64 ndarray

    Examples
    --------
    >>> v = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    >>> knn_table(v, k=2)
    array([[0, 1],
           [1, 0],
           [2, 3],
           [3, 2]])
    """
    import faiss

    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k={k!r} must be a positive integer")
    x = np.ascontiguousarray(pool_features(features), dtype=np.float32)
    check_finite(x, "features")
    n = x.shape[0]
    if n == 0:
        raise ValueError("features is empty (N = 0)")
    k = min(int(k), n)
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, idx = index.search(x, k)
    idx = idx.astype(np.int64)
    # Put self at column 0: drop it where it appears later (ties), or the last column where it is absent.
    self_idx = np.arange(n, dtype=np.int64)[:, None]
    not_self = idx != self_idx
    has_self = ~not_self.all(axis=1)
    keep = not_self.copy()
    keep[~has_self, -1] = False
    rest = idx[keep].reshape(n, k - 1)
    return np.concatenate([self_idx, rest], axis=1)


def draw_knn_partners(knn: np.ndarray, indices: np.ndarray, *, rank_max: int = 7,
                      rng: np.random.Generator) -> np.ndarray:
    """Draw, for each crop in ``indices``, a neighbour uniformly from ranks ``1..rank_max`` of its kNN row.

    Parameters
    ----------
    knn : (N, k) int64 ndarray
        From :func:`knn_table` (self in column 0).
    indices : (B,) int ndarray
        Crops of the batch.
    rank_max : int
        Highest rank drawn (STEGO: 7); capped at ``k - 1``. With ``k == 1`` (a single crop) the crop is its
        own partner.
    rng : numpy.random.Generator

    Returns
    -------
    partners : (B,) int64 ndarray
    """
    check_ndim(knn, 2, "knn")
    if rank_max < 1:
        raise ValueError(f"rank_max={rank_max!r} must be >= 1")
    indices = np.asarray(indices, dtype=np.int64)
    hi = min(int(rank_max), knn.shape[1] - 1)
    if hi < 1:
        return knn[indices, 0].astype(np.int64)
    ranks = rng.integers(1, hi + 1, size=indices.shape)
    return knn[indices, ranks].astype(np.int64)
