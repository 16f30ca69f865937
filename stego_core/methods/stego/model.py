"""STEGO's trainable pieces: segmentation head, correspondence-distillation loss, probes.

Which clusters are vessel is decided in :mod:`stego_core.methods.stego.mapping`.

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

import torch
import torch.nn.functional as F
from torch import nn


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
    knn_k : int
        Neighbours kept per crop in the kNN table of pooled backbone features (30).
    knn_rank_max : int
        Neighbours are drawn uniformly from kNN ranks ``1..knn_rank_max`` (7) by the data side
        (:func:`stego_core.features.cache.draw_knn_partners`).
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
    knn_k: int = 30
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
        for name, low in (("neg_samples", 0), ("n_points", 1), ("knn_k", 1), ("knn_rank_max", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"LossConfig.{name}={v!r} must be an integer >= {low}")



__all__ = [
    "ClusterProbe",
    "LinearProbe",
    "StegoHead",
    "centre_correlation",
    "correspondence_loss",
    "correspondence_term",
    "random_derangement",
    "sample_grid",
    "sample_points",
    "tensor_correlation",
]

logger = logging.getLogger(__name__)



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
    coords_self = coords1 if cfg.intra_same_points else sample_grid(b, n, generator=generator, device=dev)
    perms = [random_derangement(b, generator=generator, device=dev)
             for _ in range(cfg.neg_samples if cfg.neg_samples > 0 and b >= 2 else 0)]
    # Every grid on the batch's own maps is sampled in ONE grid_sample call per tensor (the CPU kernel costs
    # about the same for 1 grid as for 7): the query grid, the self grid, and per negative the target grid
    # carried back through the derangement, since sample(x[perm], g) == sample(x, g[perm^-1])[perm] exactly.
    grids = [coords1] + ([] if cfg.intra_same_points else [coords_self]) + [coords2[p.argsort()] for p in perms]
    grid = torch.cat(grids, dim=2)  # (B, n, n * len(grids), 2)
    f_all, c_all = sample_points(feats.float(), grid).split(n, dim=3), sample_points(codes, grid).split(n, dim=3)
    f1, c1 = f_all[0], c_all[0]
    f_self, c_self = (f1, c1) if cfg.intra_same_points else (f_all[1], c_all[1])
    terms: dict[str, torch.Tensor] = {}

    intra, _ = correspondence_term(f1, f_self, c1, c_self, cfg.pos_intra_shift)
    total = cfg.pos_intra_weight * intra
    terms["pos_intra"] = intra.detach()

    if knn_feats is not None:
        inter, _ = correspondence_term(f1, sample_points(knn_feats.float(), coords2), c1,
                                       sample_points(knn_codes, coords2), cfg.pos_inter_shift)
        total = total + cfg.pos_inter_weight * inter
        terms["pos_inter"] = inter.detach()

    if perms:
        first = len(grids) - len(perms)
        negs = [correspondence_term(f1, f_all[first + s][p], c1, c_all[first + s][p], cfg.neg_inter_shift)[0]
                for s, p in enumerate(perms)]
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
            (inverse temperature: STEGO evaluates with 2; the platform's default is ``model.alpha``), the loss
            then weighting by it.

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

    def probabilities(self, codes: torch.Tensor, *, alpha: float) -> torch.Tensor:
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
