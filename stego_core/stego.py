"""STEGO's trainable pieces: segmentation head, correspondence-distillation loss, probes, cluster -> vessel.

Hamilton et al., "Unsupervised Semantic Segmentation by Distilling Feature Correspondences", ICLR 2022,
and its reference implementation (``mhamilton723/STEGO``: ``modules.py``, ``train_segmentation.py``). Pure
torch modules and functions, no Lightning: a training module injects them.

Shapes: backbone features ``feats : (B, C, h, w)``; codes ``codes : (B, D, h, w)`` on the same grid; sampled
points ``(B, C, n, n)``; crops ``(B, 1, P, P)``.

Training step, in outline (the caller owns optimisers; cached features come as float16)::

    codes = head(feats.float()); knn_codes = head(knn_feats.float())
    loss, terms = correspondence_loss(feats, codes, knn_feats, knn_codes, LossConfig(), generator=g)
    probe_loss, _ = cluster_probe(codes.detach())          # Adam lr 5e-3; never trains the head
    lin_loss = linear_probe.loss(codes.detach(), labels)   # evaluation only, when labels exist
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

__all__ = [
    "DEFAULT_ALPHA",
    "VESSEL_RULES",
    "ClusterProbe",
    "LinearProbe",
    "LossConfig",
    "StegoHead",
    "centre_correlation",
    "cluster_vessel_probability",
    "correspondence_loss",
    "correspondence_term",
    "map_clusters_hungarian",
    "map_clusters_majority",
    "map_clusters_unsupervised",
    "random_derangement",
    "sample_grid",
    "sample_points",
    "tensor_correlation",
    "vessel_clusters",
]

logger = logging.getLogger(__name__)

#: Inverse temperature of the soft cluster probabilities ``softmax(alpha * cosine)`` (STEGO evaluates with 2).
DEFAULT_ALPHA = 2.0
VESSEL_RULES = ("auto", "hungarian", "majority", "brightness")


# ----------------------------------------------------------------------------------------------------------
# Head


class StegoHead(nn.Module):
    """STEGO's segmentation head: ``code = Linear1x1(drop(f)) + [Conv1x1 -> ReLU -> Conv1x1](drop(f))``.

    ``drop`` is ``Dropout2d(p=dropout)`` on the features, drawn independently for the two branches (as in the
    reference). The hidden width of the nonlinear branch is ``feature_dim``.

    Parameters
    ----------
    feature_dim : int
        Backbone feature channels ``C``.
    code_dim : int
        Code channels ``D`` (STEGO: 70).
    dropout : float
        Channel dropout probability on the features, in [0, 1).

    Examples
    --------
    >>> StegoHead(384, code_dim=70)(torch.zeros(2, 384, 4, 4)).shape
    torch.Size([2, 70, 4, 4])
    """

    def __init__(self, feature_dim: int, code_dim: int = 70, dropout: float = 0.1) -> None:
        super().__init__()
        if feature_dim < 1 or code_dim < 1:
            raise ValueError(f"feature_dim={feature_dim!r} and code_dim={code_dim!r} must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
        self.feature_dim, self.code_dim = int(feature_dim), int(code_dim)
        self.dropout = nn.Dropout2d(p=dropout)
        self.linear = nn.Conv2d(feature_dim, code_dim, kernel_size=1)
        self.nonlinear = nn.Sequential(
            nn.Conv2d(feature_dim, feature_dim, kernel_size=1),
            nn.ReLU(),
            nn.Conv2d(feature_dim, code_dim, kernel_size=1),
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Codes ``(B, code_dim, h, w)`` of features ``(B, feature_dim, h, w)`` (cast to the head's dtype)."""
        if feats.ndim != 4 or feats.shape[1] != self.feature_dim:
            raise ValueError(f"feats must have shape (B, {self.feature_dim}, h, w); got {tuple(feats.shape)}")
        feats = feats.to(self.linear.weight.dtype)
        return self.linear(self.dropout(feats)) + self.nonlinear(self.dropout(feats))


# ----------------------------------------------------------------------------------------------------------
# Correspondence loss


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None,
          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, device=device, dtype=dtype)
    return torch.rand(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def sample_grid(batch: int, n_points: int = 11, *, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Random sampling coordinates, uniform in [-1, 1] (``grid_sample`` convention, ``(x, y)`` last).

    Returns
    -------
    coords : (batch, n_points, n_points, 2) float32 tensor
    """
    if batch < 1 or n_points < 1:
        raise ValueError(f"batch={batch!r} and n_points={n_points!r} must be >= 1")
    return _rand((batch, n_points, n_points, 2), generator, device) * 2 - 1


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``t (B, C, h, w)`` at ``coords (B, n, m, 2)`` -> ``(B, C, n, m)``.

    ``F.grid_sample`` with border padding and ``align_corners=True`` (-1 and 1 are the centres of the edge
    cells), as in STEGO.
    """
    return F.grid_sample(t, coords.to(t.dtype), mode="bilinear", padding_mode="border", align_corners=True)


def tensor_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correlation between every point of ``a (B, C, h, w)`` and of ``b (B, C, i, j)``.

    Returns
    -------
    corr : (B, h, w, i, j) tensor
        ``corr[n, h, w, i, j] = <a[n, :, h, w], b[n, :, i, j]>`` of L2-normalised channel vectors.
    """
    a = F.normalize(a, dim=1, eps=1e-10)
    b = F.normalize(b, dim=1, eps=1e-10)
    return torch.einsum("nchw,ncij->nhwij", a, b)


def centre_correlation(corr: torch.Tensor) -> torch.Tensor:
    """STEGO's pointwise centring of a correlation ``(B, h, w, i, j)``.

    Subtracts from each query point's row ``corr[n, h, w]`` its mean over the target points ``(i, j)``, then
    adds back the global mean (over everything, batch included), so only the mean's spread across query
    points is removed.
    """
    global_mean = corr.mean()
    centred = corr - corr.mean(dim=(3, 4), keepdim=True)
    return centred - centred.mean() + global_mean


def correspondence_term(feats1: torch.Tensor, feats2: torch.Tensor, codes1: torch.Tensor, codes2: torch.Tensor,
                        shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One correspondence-distillation term ``L = mean(-max(S, 0) * (F_centred - shift))``.

    Parameters
    ----------
    feats1, feats2 : (B, C, n, m) tensors
        Backbone features at the sampled points of the query and target images (no gradient flows).
    codes1, codes2 : (B, D, n, m) tensors
        Codes at the same points.
    shift : float
        The term's shift ``b``: feature correlations above it pull codes together, below it push apart.

    Returns
    -------
    loss : scalar tensor
        Mean over batch, query and target points.
    code_corr : (B, n, m, n, m) tensor
        ``S``, the codes' cosine correlation (for diagnostics).
    """
    with torch.no_grad():
        fd = centre_correlation(tensor_correlation(feats1.float(), feats2.float()))
    cd = tensor_correlation(codes1, codes2)
    loss = -(cd.clamp(min=0.0) * (fd.to(cd.dtype) - shift)).mean()
    return loss, cd


def random_derangement(n: int, *, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor:
    """A permutation of ``0..n-1`` with no fixed point, uniform over all derangements (rejection sampling).

    Raises ``ValueError`` for ``n < 2`` (no derangement exists).
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2 items; got n={n}")
    gen_device = generator.device if generator is not None else "cpu"
    ar = torch.arange(n, device=gen_device)
    for _ in range(10_000):  # acceptance probability ~ 1/e (>= 1/3 for n >= 2)
        perm = torch.randperm(n, generator=generator, device=gen_device)
        if not bool((perm == ar).any()):
            return perm.to(device) if device is not None else perm
    raise RuntimeError("could not draw a derangement")  # pragma: no cover - probability ~ (1 - 1/e) ** 10000


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and shifts of STEGO's three correspondence terms (defaults: the seed's vessel settings).

    Attributes
    ----------
    pos_intra_weight, pos_intra_shift : float
        The image with itself (0.67, 0.18).
    pos_inter_weight, pos_inter_shift : float
        The image with a kNN neighbour (0.25, 0.12).
    neg_inter_weight, neg_inter_shift : float
        The image with random other images of the batch (0.63, 0.46).
    neg_samples : int
        Derangements of the batch used for the negative term (5).
    n_points : int
        Side of the grid of random sampling points (11 -> 121 points per image).
    knn_rank_max : int
        Neighbours are drawn uniformly from kNN ranks ``1..knn_rank_max`` (7) by the data side
        (:func:`stego_core.features.draw_knn_partners`).
    intra_same_points : bool
        True (default, as STEGO's reference code does): the self term compares the image's sampled points with
        themselves. False: with a second, independent grid of the same image.
    """

    pos_intra_weight: float = 0.67
    pos_intra_shift: float = 0.18
    pos_inter_weight: float = 0.25
    pos_inter_shift: float = 0.12
    neg_inter_weight: float = 0.63
    neg_inter_shift: float = 0.46
    neg_samples: int = 5
    n_points: int = 11
    knn_rank_max: int = 7
    intra_same_points: bool = True

    def __post_init__(self) -> None:
        for name in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LossConfig.{name}={v!r} must be a finite number >= 0")
        for name in ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"LossConfig.{name}={v!r} must be a finite number")
        for name, low in (("neg_samples", 0), ("n_points", 1), ("knn_rank_max", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"LossConfig.{name}={v!r} must be an integer >= {low}")


def correspondence_loss(feats: torch.Tensor, codes: torch.Tensor, knn_feats: torch.Tensor | None,
                        knn_codes: torch.Tensor | None, cfg: LossConfig = LossConfig(), *,
                        generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """STEGO's correspondence-distillation loss of a batch.

    ``total = w_intra * L(x, x, b_intra) + w_inter * L(x, knn(x), b_inter) + w_neg * mean_s L(x, x[perm_s], b_neg)``
    with :func:`correspondence_term` as ``L``, fresh random ``n_points x n_points`` grids each call (one grid on
    the query side shared by the terms, one on the target side), and ``neg_samples`` random derangements
    ``perm_s`` of the batch (no image is its own negative).

    Parameters
    ----------
    feats : (B, C, h, w) tensor
        Backbone features of the batch (any float dtype; no gradient is taken through them).
    codes : (B, D, h, w) tensor
        Head output on ``feats``.
    knn_feats, knn_codes : (B, C, h', w') and (B, D, h', w') tensors, or None
        Features of each image's kNN partner and the head output on them (the caller draws the partners). None
        skips the kNN term.
    cfg : LossConfig
    generator : torch.Generator, optional
        Source of the sampling grids and derangements (reproducibility); the global RNG when None.

    Returns
    -------
    total : scalar tensor
        The weighted sum, with gradient through the codes.
    terms : dict of str -> scalar tensor (detached)
        ``"pos_intra"``, ``"pos_inter"`` (when the kNN term runs), ``"neg_inter"`` (when ``neg_samples > 0``),
        unweighted.

    Raises
    ------
    ValueError
        Mismatched shapes, or a batch of one image when the negative term is on (use ``drop_last=True``).
    """
    if feats.ndim != 4 or codes.ndim != 4 or feats.shape[0] != codes.shape[0]:
        raise ValueError(f"feats (B, C, h, w) and codes (B, D, h, w) must share B; got {tuple(feats.shape)} "
                         f"and {tuple(codes.shape)}")
    if (knn_feats is None) != (knn_codes is None):
        raise ValueError("knn_feats and knn_codes must be given together (or both None)")
    if knn_feats is not None and (knn_feats.shape[0] != feats.shape[0] or knn_codes.shape[0] != feats.shape[0]
                                  or knn_feats.shape[1] != feats.shape[1] or knn_codes.shape[1] != codes.shape[1]):
        raise ValueError(f"knn_feats {tuple(knn_feats.shape)} / knn_codes {tuple(knn_codes.shape)} must match feats "
                         f"{tuple(feats.shape)} / codes {tuple(codes.shape)} in B and channels")
    b = feats.shape[0]
    use_neg = cfg.neg_samples > 0 and cfg.neg_inter_weight > 0
    if use_neg and b < 2:
        raise ValueError("the negative term needs a batch of >= 2 images (got 1); use drop_last=True or set "
                         "neg_inter_weight=0")
    n, dev = cfg.n_points, codes.device
    coords1 = sample_grid(b, n, generator=generator, device=dev)
    coords2 = sample_grid(b, n, generator=generator, device=dev)
    f1, c1 = sample_points(feats.float(), coords1), sample_points(codes, coords1)
    terms: dict[str, torch.Tensor] = {}

    if cfg.intra_same_points:
        f_self, c_self = f1, c1
    else:
        coords3 = sample_grid(b, n, generator=generator, device=dev)
        f_self, c_self = sample_points(feats.float(), coords3), sample_points(codes, coords3)
    intra, _ = correspondence_term(f1, f_self, c1, c_self, cfg.pos_intra_shift)
    total = cfg.pos_intra_weight * intra
    terms["pos_intra"] = intra.detach()

    if knn_feats is not None:
        inter, _ = correspondence_term(f1, sample_points(knn_feats.float(), coords2), c1,
                                       sample_points(knn_codes, coords2), cfg.pos_inter_shift)
        total = total + cfg.pos_inter_weight * inter
        terms["pos_inter"] = inter.detach()

    if cfg.neg_samples > 0 and b >= 2:
        negs = []
        for _ in range(cfg.neg_samples):
            perm = random_derangement(b, generator=generator, device=dev)
            neg, _ = correspondence_term(f1, sample_points(feats[perm].float(), coords2), c1,
                                         sample_points(codes[perm], coords2), cfg.neg_inter_shift)
            negs.append(neg)
        neg = torch.stack(negs).mean()
        total = total + cfg.neg_inter_weight * neg
        terms["neg_inter"] = neg.detach()
    return total, terms


# ----------------------------------------------------------------------------------------------------------
# Probes


class ClusterProbe(nn.Module):
    """``K`` learnable centroids clustering codes by cosine similarity (mini-batch spherical k-means).

    Train it on DETACHED codes (``probe(codes.detach())``; the caller detaches) with Adam, lr 5e-3: the loss
    is minus the mean cosine similarity of each code to its hard-assigned (argmax) centroid.

    Parameters
    ----------
    code_dim : int
        Code channels ``D``.
    n_clusters : int
        ``K >= 2``.
    generator : torch.Generator, optional
        Source of the initial centroids (standard normal).
    """

    def __init__(self, code_dim: int, n_clusters: int, *, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int) or n_clusters < 2:
            raise ValueError(f"n_clusters={n_clusters!r} must be an integer >= 2")
        if code_dim < 1:
            raise ValueError(f"code_dim={code_dim!r} must be >= 1")
        self.n_clusters, self.code_dim = n_clusters, int(code_dim)
        self.clusters = nn.Parameter(torch.randn(n_clusters, code_dim, generator=generator))

    def similarities(self, codes: torch.Tensor) -> torch.Tensor:
        """Cosine similarity ``(B, K, h, w)`` of codes ``(B, D, h, w)`` to each centroid."""
        if codes.ndim != 4 or codes.shape[1] != self.code_dim:
            raise ValueError(f"codes must have shape (B, {self.code_dim}, h, w); got {tuple(codes.shape)}")
        return torch.einsum("bchw,kc->bkhw", F.normalize(codes, dim=1),
                            F.normalize(self.clusters, dim=1).to(codes.dtype))

    def forward(self, codes: torch.Tensor, *, alpha: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and cluster probabilities of (detached) codes.

        Parameters
        ----------
        codes : (B, D, h, w) tensor
        alpha : float, optional
            None (training): hard one-hot assignment. A float: soft ``softmax(alpha * cosine)`` over clusters
            (inverse temperature; :data:`DEFAULT_ALPHA` = 2 as STEGO evaluates), the loss then weighting by it.

        Returns
        -------
        loss : scalar tensor
            ``-mean_over_points(sum_k probs_k * cosine_k)``.
        cluster_probs : (B, K, h, w) tensor
        """
        sims = self.similarities(codes)
        if alpha is None:
            probs = F.one_hot(sims.argmax(dim=1), self.n_clusters).permute(0, 3, 1, 2).to(sims.dtype)
        else:
            probs = torch.softmax(sims * alpha, dim=1)
        loss = -(probs * sims).sum(dim=1).mean()
        return loss, probs

    def probabilities(self, codes: torch.Tensor, *, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
        """Soft cluster probabilities ``softmax(alpha * cosine)``, ``(B, K, h, w)``; no gradient."""
        with torch.no_grad():
            return torch.softmax(self.similarities(codes) * alpha, dim=1)

    def predict(self, codes: torch.Tensor) -> torch.Tensor:
        """Hard cluster ids ``(B, h, w)`` int64 (argmax cosine similarity)."""
        with torch.no_grad():
            return self.similarities(codes).argmax(dim=1)


class LinearProbe(nn.Module):
    """A 1x1 convolution from codes to class logits; trained on detached codes, for evaluation only.

    Parameters
    ----------
    code_dim : int
        Code channels ``D``.
    n_classes : int
        Classes (2: background 0, vessel 1).
    """

    def __init__(self, code_dim: int, n_classes: int = 2) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"n_classes={n_classes!r} must be >= 2")
        self.n_classes = int(n_classes)
        self.conv = nn.Conv2d(code_dim, n_classes, kernel_size=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes, h, w)`` of codes ``(B, D, h, w)``."""
        return self.conv(codes)

    def loss(self, codes: torch.Tensor, labels: torch.Tensor, *, balanced: bool = True) -> torch.Tensor:
        """Cross-entropy of detached codes against labels on the code grid.

        With ``balanced`` (default) each class present in the batch is weighted by the inverse of its pixel
        count, so a probe on ~1 % vessel pixels does not settle on "all background".

        Parameters
        ----------
        codes : (B, D, h, w) tensor
            Detached by the caller (the probe never trains the head).
        labels : (B, P, P) or (B, 1, P, P) integer tensor
            Class per crop pixel, ``-1`` = unlabelled (ignored). Downsampled to ``(h, w)`` by nearest
            neighbour (pixel centres, ``"nearest-exact"``).

        Returns
        -------
        loss : scalar tensor
            Zero (with gradient graph) when no pixel is labelled.
        """
        if labels.ndim == 4:
            labels = labels[:, 0]
        if labels.ndim != 3 or labels.shape[0] != codes.shape[0]:
            raise ValueError(f"labels must have shape (B, P, P) with B={codes.shape[0]}; got {tuple(labels.shape)}")
        small = F.interpolate(labels[:, None].float(), size=codes.shape[-2:], mode="nearest-exact")[:, 0].long()
        logits = self(codes)
        if not bool((small >= 0).any()):
            return logits.sum() * 0.0
        weight = None
        if balanced:
            counts = torch.bincount(small[small >= 0].flatten(), minlength=self.n_classes).to(logits.dtype)
            weight = torch.where(counts > 0, counts.sum() / (self.n_classes * counts.clamp(min=1)), 0.0)
        return F.cross_entropy(logits, small, weight=weight, ignore_index=-1)


# ----------------------------------------------------------------------------------------------------------
# Which clusters are vessel


def _check_ids(cluster_ids: np.ndarray, n_clusters: int) -> np.ndarray:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) or n_clusters < 2:
        raise ValueError(f"n_clusters={n_clusters!r} must be an integer >= 2")
    ids = np.asarray(cluster_ids).ravel()
    if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= n_clusters):
        raise ValueError(f"cluster_ids must be integers in [0, {n_clusters}); got dtype {ids.dtype}, "
                         f"range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.int64)


def _confusion(cluster_ids: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """``(K, 2)`` counts of labelled pixels per (cluster, class); labels < 0 are ignored."""
    ids = _check_ids(cluster_ids, n_clusters)
    lab = np.asarray(labels).ravel()
    if lab.shape != ids.shape:
        raise ValueError(f"labels has {lab.size} values but cluster_ids has {ids.size}")
    lab = lab.astype(np.int64)
    if lab.size and lab.max() > 1:
        raise ValueError(f"labels must be 1 (vessel), 0 (background) or -1 (unlabelled); got max {lab.max()}")
    ok = lab >= 0
    if not ok.any():
        raise ValueError("labels has no labelled pixel; cannot map clusters to classes")
    return np.bincount(ids[ok] * 2 + lab[ok], minlength=2 * n_clusters).reshape(n_clusters, 2)


def map_clusters_hungarian(cluster_ids: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Vessel clusters by Hungarian matching of clusters to classes {background, vessel}.

    Maximises the pixels on which cluster and class agree (``scipy.optimize.linear_sum_assignment`` on the
    ``(K, 2)`` confusion matrix). Meant for ``K = 2``; with ``K > 2`` only the one cluster matched to vessel
    is vessel.

    Parameters
    ----------
    cluster_ids : (...) int ndarray
        Cluster of each pixel, in ``[0, n_clusters)``.
    labels : (...) int ndarray, same size
        1 = vessel, 0 = background, -1 = unlabelled (ignored).
    n_clusters : int

    Returns
    -------
    vessel : (K,) bool ndarray

    Examples
    --------
    >>> map_clusters_hungarian(np.array([0, 0, 1, 1]), np.array([1, 1, 0, 0]), 2)
    array([ True, False])
    """
    conf = _confusion(cluster_ids, labels, n_clusters)
    if conf[:, 1].sum() == 0:
        raise ValueError("labels has no vessel pixel; cannot match a cluster to vessel")
    rows, cols = linear_sum_assignment(conf, maximize=True)
    vessel = np.zeros(n_clusters, dtype=bool)
    vessel[rows[cols == 1]] = True
    return vessel


def map_clusters_majority(cluster_ids: np.ndarray, labels: np.ndarray, n_clusters: int, *,
                          balanced: bool = False) -> np.ndarray:
    """Vessel clusters by majority vote: each cluster takes its most frequent labelled class.

    Parameters
    ----------
    cluster_ids, labels, n_clusters
        As in :func:`map_clusters_hungarian`.
    balanced : bool
        Compare class counts divided by the class totals (a cluster is vessel when it holds a larger share of
        all vessel pixels than of all background pixels). Plain counts (False) rarely make any cluster vessel
        when vessels are ~0.2 % of the pixels.

    Returns
    -------
    vessel : (K,) bool ndarray
        Clusters without labelled pixels are background.
    """
    conf = _confusion(cluster_ids, labels, n_clusters).astype(np.float64)
    if balanced:
        conf = conf / np.maximum(conf.sum(axis=0, keepdims=True), 1)
    vessel = conf[:, 1] > conf[:, 0]
    if not vessel.any():
        logger.warning("majority mapping: no cluster has a vessel majority; every cluster is background")
    return vessel


def map_clusters_unsupervised(cluster_ids: np.ndarray, intensities: np.ndarray,
                              n_clusters: int, *, min_fraction: float = 1e-3) -> tuple[np.ndarray, str]:
    """Without labels: the cluster with the highest mean intensity is vessel (bright TOF-MRA vessels).

    Clusters holding less than ``min_fraction`` of the pixels are not candidates (a handful of the very
    brightest pixels would otherwise win and the model would predict nearly nothing); if none is large enough,
    every non-empty cluster is a candidate.

    Parameters
    ----------
    cluster_ids : (...) int ndarray
        Cluster of each pixel.
    intensities : (...) float ndarray, same size
        Preprocessed intensity of each pixel.
    n_clusters : int

    Returns
    -------
    vessel : (K,) bool ndarray
        Exactly one True.
    rule : str
        ``"brightness"``.
    """
    ids = _check_ids(cluster_ids, n_clusters)
    x = np.asarray(intensities, dtype=np.float64).ravel()
    if x.shape != ids.shape:
        raise ValueError(f"intensities has {x.size} values but cluster_ids has {ids.size}")
    if not ids.size or not np.isfinite(x).all():
        raise ValueError("intensities must be non-empty and finite")
    counts = np.bincount(ids, minlength=n_clusters)
    sums = np.bincount(ids, weights=x, minlength=n_clusters)
    candidates = counts >= max(1.0, min_fraction * ids.size)
    if not candidates.any():
        candidates = counts > 0
    means = np.where(candidates, sums / np.maximum(counts, 1), -np.inf)
    vessel = np.zeros(n_clusters, dtype=bool)
    vessel[int(np.argmax(means))] = True
    return vessel, "brightness"


def vessel_clusters(rule: str, *, cluster_ids: np.ndarray, n_clusters: int, labels: np.ndarray | None = None,
                    intensities: np.ndarray | None = None, balanced: bool = False) -> tuple[np.ndarray, str]:
    """Decide which clusters are vessel, and say which rule decided.

    Parameters
    ----------
    rule : {"auto", "hungarian", "majority", "brightness"}
        ``"auto"``: with labels, Hungarian for ``K = 2`` and majority for ``K > 2``; without labels,
        brightness.
    cluster_ids : (...) int ndarray
        Cluster of each pixel (e.g. of the labelled training crops, at label resolution).
    n_clusters : int
    labels : (...) int ndarray, optional
        1 vessel, 0 background, -1 unlabelled; required by "hungarian" and "majority".
    intensities : (...) float ndarray, optional
        Required by "brightness" (and by "auto" without labels).
    balanced : bool
        Passed to :func:`map_clusters_majority`.

    Returns
    -------
    vessel : (K,) bool ndarray
    rule_name : str
        The rule actually applied (``"hungarian"``, ``"majority"`` or ``"brightness"``): record it with the run.
    """
    if rule not in VESSEL_RULES:
        raise ValueError(f"rule={rule!r}; expected one of {VESSEL_RULES}")
    if rule == "auto":
        rule = ("hungarian" if n_clusters == 2 else "majority") if labels is not None else "brightness"
    if rule in ("hungarian", "majority") and labels is None:
        raise ValueError(f"rule {rule!r} needs labels")
    if rule == "hungarian":
        return map_clusters_hungarian(cluster_ids, labels, n_clusters), rule
    if rule == "majority":
        return map_clusters_majority(cluster_ids, labels, n_clusters, balanced=balanced), rule
    if intensities is None:
        raise ValueError("rule 'brightness' needs intensities")
    return map_clusters_unsupervised(cluster_ids, intensities, n_clusters)


def cluster_vessel_probability(cluster_probs: torch.Tensor, vessel_mask: np.ndarray | torch.Tensor,
                               out_size: int | tuple[int, int], *, combine: str = "max") -> torch.Tensor:
    """Per-pixel vessel probability from soft cluster probabilities, upsampled to the crop.

    Parameters
    ----------
    cluster_probs : (B, K, h, w) tensor
        Soft cluster probabilities, e.g. ``ClusterProbe.probabilities(codes, alpha=2.0)`` =
        ``softmax(alpha * cosine)`` over clusters (``alpha`` is an inverse temperature: larger = harder).
    vessel_mask : (K,) bool array
        From :func:`vessel_clusters`.
    out_size : int or (H, W)
        Crop size ``P`` (bilinear upsampling, ``align_corners=False``).
    combine : {"max", "sum"}
        ``"max"`` (default): ``p_v / (p_v + p_b)`` with ``p_v`` the largest vessel-cluster probability and
        ``p_b`` the largest background-cluster probability, i.e. ``sigmoid(alpha * (cos_v - cos_b))``; it is
        above 0.5 exactly where the hard (argmax) cluster is a vessel cluster, for any ``K`` (for ``K = 2`` it
        equals ``"sum"``). ``"sum"``: the summed probability of the vessel clusters; with ``K > 2`` and
        ``alpha = 2`` it rarely reaches 0.5 (one cluster at cosine 1 against eleven at 0 gets 0.40), so a 0.5
        threshold then predicts no vessel at all.

    Returns
    -------
    prob : (B, 1, H, W) tensor in [0, 1]
    """
    if cluster_probs.ndim != 4:
        raise ValueError(f"cluster_probs must have shape (B, K, h, w); got {tuple(cluster_probs.shape)}")
    if combine not in ("max", "sum"):
        raise ValueError(f"combine={combine!r}; expected 'max' or 'sum'")
    mask = torch.as_tensor(np.asarray(vessel_mask, dtype=bool) if not torch.is_tensor(vessel_mask)
                           else vessel_mask.bool(), device=cluster_probs.device)
    if mask.ndim != 1 or mask.numel() != cluster_probs.shape[1]:
        raise ValueError(f"vessel_mask must have one entry per cluster ({cluster_probs.shape[1]}); got "
                         f"shape {tuple(mask.shape)}")
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if combine == "sum" or bool(mask.all()) or not bool(mask.any()):
        prob = cluster_probs[:, mask].sum(dim=1, keepdim=True)
    else:
        p_v = cluster_probs[:, mask].amax(dim=1, keepdim=True)
        p_b = cluster_probs[:, ~mask].amax(dim=1, keepdim=True)
        prob = p_v / (p_v + p_b).clamp(min=1e-12)
    prob = F.interpolate(prob, size=size, mode="bilinear", align_corners=False)
    return prob.clamp(0.0, 1.0)
