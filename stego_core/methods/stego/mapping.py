"""Which STEGO clusters are vessel, decided on training crops, and the scores of a cluster map.

Rules: with labelled *training* volumes, Hungarian matching (K = 2) or a class-balanced
majority vote (K > 2), or (``dice``, asked for by name) the union of clusters that maximises Dice; without
labels, or when the training volumes are also evaluated, a label-free rule: ``brightness`` (the cluster with
the highest mean intensity) or ``bright_cut`` (every cluster whose mean intensity reaches the crops' own
bright-voxel cut, for many clusters where a vessel spans several). :func:`choose_mapping_rule` refuses label
rules on evaluated volumes; the rule a run used is recorded by the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from stego_core.methods.stego.model import ClusterProbe

CLUSTER_RULES = ("auto", "hungarian", "majority", "dice", "brightness", "bright_cut")


#: The cluster rules that read no label (allowed on the volumes being evaluated).
LABEL_FREE_RULES = ("brightness", "bright_cut")



if TYPE_CHECKING:
    from stego_core.methods.stego.module import StegoModule

__all__ = [
    "binary_iou_accuracy",
    "pixel_codes",
    "choose_mapping_rule",
    "cluster_maps",
    "cluster_vessel_probability",
    "bright_cut",
    "fit_vessel_mapping",
    "refit_centroids",
    "token_clusters",
    "map_clusters_bright_cut",
    "map_clusters_dice",
    "map_clusters_hungarian",
    "map_clusters_majority",
    "map_clusters_unsupervised",
    "vessel_clusters",
]

logger = logging.getLogger(__name__)


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


def map_clusters_dice(cluster_ids: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Vessel clusters: the union, purest first, that maximises Dice with the labels.

    Clusters are sorted by their fraction of vessel pixels and added while the Dice of the union on the
    labelled pixels grows. Unlike a balanced majority vote, which takes every cluster holding a larger share of
    the vessel pixels than of the background and so favours recall (on the demo phantom, precision 0.23), this
    weighs both error kinds as the score does.

    Parameters
    ----------
    cluster_ids, labels, n_clusters
        As in :func:`map_clusters_hungarian`.

    Returns
    -------
    vessel : (K,) bool ndarray
        At least one True.

    Examples
    --------
    Cluster 1 is half vessel: adding it raises Dice from 0.80 to 0.86; cluster 2 holds no vessel.

    >>> map_clusters_dice(np.array([0, 0, 1, 1, 2, 2]), np.array([1, 1, 1, 0, 0, 0]), 3)
    array([ True,  True, False])
    """
    conf = _confusion(cluster_ids, labels, n_clusters).astype(np.float64)
    n_vessel = conf[:, 1].sum()
    if n_vessel == 0:
        raise ValueError("labels has no vessel pixel; cannot choose vessel clusters")
    size = conf.sum(axis=1)
    order = np.argsort(-(conf[:, 1] / np.maximum(size, 1)), kind="stable")
    dice = 2 * np.cumsum(conf[order, 1]) / (np.cumsum(size[order]) + n_vessel)
    vessel = np.zeros(n_clusters, dtype=bool)
    vessel[order[: int(np.argmax(dice)) + 1]] = True
    return vessel


def _candidate_means(cluster_ids: np.ndarray, intensities: np.ndarray, n_clusters: int,
                     min_fraction: float) -> np.ndarray:
    """(K,) mean intensity of each cluster holding at least ``min_fraction`` of the pixels (every non-empty one
    when none does); ``-inf`` for the others."""
    ids = _check_ids(cluster_ids, n_clusters)
    x = np.asarray(intensities, dtype=np.float64).ravel()
    if x.shape != ids.shape:
        raise ValueError(f"intensities has {x.size} values but cluster_ids has {ids.size}")
    if not ids.size or not np.isfinite(x).all():
        raise ValueError("intensities must be non-empty and finite")
    counts = np.bincount(ids, minlength=n_clusters)
    candidates = counts >= max(1.0, min_fraction * ids.size)
    if not candidates.any():
        candidates = counts > 0
    return np.where(candidates, np.bincount(ids, weights=x, minlength=n_clusters) / np.maximum(counts, 1), -np.inf)


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
    means = _candidate_means(cluster_ids, intensities, n_clusters, min_fraction)
    vessel = np.zeros(n_clusters, dtype=bool)
    vessel[int(np.argmax(means))] = True
    return vessel, "brightness"


def bright_cut(crops: np.ndarray, quantile: float = 99.0) -> float:
    """The bright-voxel cut of crops: the ``quantile``-th percentile of their brain (non-zero) intensities.

    Parameters
    ----------
    crops : (N, P, P) float ndarray in [0, 1]
        Preprocessed crops; 0 outside the brain mask.
    quantile : float in (0, 100)
    """
    x = np.asarray(crops, dtype=np.float32)
    brain = x[x > 0]
    if brain.size == 0:
        raise ValueError("the crops hold no brain voxel (every intensity is 0): no bright-voxel cut")
    return float(np.percentile(brain, quantile))


def map_clusters_bright_cut(cluster_ids: np.ndarray, intensities: np.ndarray, n_clusters: int, *, cut: float,
                            min_fraction: float = 1e-3) -> tuple[np.ndarray, str]:
    """Without labels, several clusters: every cluster whose mean intensity is at least ``cut``.

    With many clusters (K >= 128) a vessel spans several of them, while the single brightest cluster is
    either the vessel cores only or, with few clusters, vessel and bright tissue together. ``cut`` is the
    volume's own bright-voxel cut (:func:`bright_cut`, the 99th brain percentile: TOF vessels are about 1 % of
    the brain). Clusters under ``min_fraction`` of the pixels are not candidates; if no candidate reaches the
    cut, the brightest candidate alone is vessel (the ``brightness`` rule).

    Parameters
    ----------
    cluster_ids : (...) int ndarray
        Cluster of each pixel or token.
    intensities : (...) float ndarray, same size
        Preprocessed intensity of each pixel (mean over the token's pixels for tokens).
    n_clusters : int
    cut : float
        Intensity a cluster's mean must reach.

    Returns
    -------
    vessel : (K,) bool ndarray
        At least one True.
    rule : str
        ``"bright_cut"``.

    Examples
    --------
    >>> ids = np.array([0, 0, 1, 1, 2, 2, 3])
    >>> x = np.array([0.1, 0.2, 0.8, 0.9, 0.7, 0.75, 0.95])
    >>> map_clusters_bright_cut(ids, x, 4, cut=0.7, min_fraction=0.2)[0].tolist()
    [False, True, True, False]
    """
    means = _candidate_means(cluster_ids, intensities, n_clusters, min_fraction)
    vessel = means >= cut
    if not vessel.any():
        vessel[int(np.argmax(means))] = True
    return vessel, "bright_cut"


def vessel_clusters(rule: str, *, cluster_ids: np.ndarray, n_clusters: int, labels: np.ndarray | None = None,
                    intensities: np.ndarray | None = None, balanced: bool = False,
                    cut: float | None = None) -> tuple[np.ndarray, str]:
    """Decide which clusters are vessel, and say which rule decided.

    Parameters
    ----------
    rule : {"auto", "hungarian", "majority", "dice", "brightness", "bright_cut"}
        ``"auto"``: with labels, Hungarian for ``K = 2`` and majority for ``K > 2``; without labels,
        brightness. ``"dice"``: :func:`map_clusters_dice`. ``"bright_cut"``: :func:`map_clusters_bright_cut`.
    cluster_ids : (...) int ndarray
        Cluster of each pixel (e.g. of the labelled training crops, at label resolution).
    n_clusters : int
    labels : (...) int ndarray, optional
        1 vessel, 0 background, -1 unlabelled; required by "hungarian" and "majority".
    intensities : (...) float ndarray, optional
        Required by the label-free rules (and by "auto" without labels).
    balanced : bool
        Passed to :func:`map_clusters_majority`.
    cut : float, optional
        Required by "bright_cut".

    Returns
    -------
    vessel : (K,) bool ndarray
    rule_name : str
        The rule actually applied (``"hungarian"``, ``"majority"``, ``"dice"``, ``"brightness"`` or
        ``"bright_cut"``): record it with the run.
    """
    if rule not in CLUSTER_RULES:
        raise ValueError(f"rule={rule!r}; expected one of {CLUSTER_RULES}")
    if rule == "auto":
        rule = ("hungarian" if n_clusters == 2 else "majority") if labels is not None else "brightness"
    if rule in ("hungarian", "majority", "dice") and labels is None:
        raise ValueError(f"rule {rule!r} needs labels")
    if rule == "hungarian":
        return map_clusters_hungarian(cluster_ids, labels, n_clusters), rule
    if rule == "dice":
        return map_clusters_dice(cluster_ids, labels, n_clusters), rule
    if rule == "majority":
        return map_clusters_majority(cluster_ids, labels, n_clusters, balanced=balanced), rule
    if intensities is None:
        raise ValueError(f"rule {rule!r} needs intensities")
    if rule == "bright_cut":
        if cut is None:
            raise ValueError("rule 'bright_cut' needs the bright-voxel cut")
        return map_clusters_bright_cut(cluster_ids, intensities, n_clusters, cut=cut)
    return map_clusters_unsupervised(cluster_ids, intensities, n_clusters)


def pixel_codes(codes: torch.Tensor, out_size: int | tuple[int, int]) -> torch.Tensor:
    """Codes ``(B, D, h, w)`` upsampled bilinearly to the crop ``(B, D, H, W)`` (``align_corners=False``).

    STEGO's evaluation upsamples the codes, not the cluster map, before the cluster probe: each pixel is then
    assigned by its own interpolated code, so cluster borders fall between tokens instead of on the token grid
    (mra_mni_0656 single volume, random ViT/2, K = 128: Dice 0.312 against 0.276 when probabilities are
    upsampled instead).
    """
    size = (out_size, out_size) if isinstance(out_size, int) else tuple(out_size)
    if tuple(codes.shape[-2:]) == size:
        return codes
    return F.interpolate(codes, size=size, mode="bilinear", align_corners=False)


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


def _head_codes(module: StegoModule, features: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    """The head's codes ``(B, D, h, w)`` of cached features, batch by batch, in eval mode (restored after)."""
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(features), batch_size):
            f = np.asarray(features[start:start + batch_size], dtype=np.float32)
            yield module.head(torch.from_numpy(f).to(module.device))
    finally:
        module.train(was_training)


@torch.no_grad()
def cluster_maps(module: StegoModule, features: np.ndarray, out_size: int, *, batch_size: int = 256,
                 probe: ClusterProbe | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cluster ids (N, P, P) and linear-probe vessel predictions (N, P, P) of cached features (eval mode).

    ``probe`` replaces ``module.cluster_probe`` (e.g. centroids refitted by :func:`refit_centroids`)."""
    probe = module.cluster_probe if probe is None else probe
    ids, linear = [], []
    for codes in _head_codes(module, features, batch_size):
        sims = probe.similarities(pixel_codes(codes, out_size).to(probe.clusters.device))  # argmax: no alpha
        logits = F.interpolate(module.linear_probe(codes), size=(out_size, out_size), mode="bilinear",
                               align_corners=False)
        ids.append(sims.argmax(1).cpu().numpy())
        linear.append(logits.argmax(1).cpu().numpy() == 1)
    return np.concatenate(ids), np.concatenate(linear)


def binary_iou_accuracy(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Mean IoU over the two classes (background, vessel) and pixel accuracy of boolean maps."""
    pred, target = np.asarray(pred, bool), np.asarray(target, bool)
    ious = []
    for p, t in ((pred, target), (~pred, ~target)):
        union = np.logical_or(p, t).sum()
        ious.append(np.logical_and(p, t).sum() / union if union else 1.0)
    return {"miou": float(np.mean(ious)), "accuracy": float((pred == target).mean())}


def choose_mapping_rule(requested: str, *, labels_available: bool, overlaps_evaluation: bool) -> str:
    """The cluster-to-vessel rule a run uses, refusing label-based rules on volumes that are also evaluated."""
    if requested == "auto":
        return "label" if labels_available and not overlaps_evaluation else "brightness"
    if requested in ("hungarian", "majority", "dice"):
        if not labels_available:
            raise ValueError(f"model.cluster_rule={requested!r} needs labelled training volumes; none have labels")
        if overlaps_evaluation:
            raise ValueError(f"model.cluster_rule={requested!r} would use labels of volumes that are also "
                             "evaluated (train and test overlap); use 'brightness' or 'auto'")
    return requested


@torch.no_grad()
def refit_centroids(module: StegoModule, features: np.ndarray, n_clusters: int, *, seed: int = 0,
                    batch_size: int = 256) -> ClusterProbe:
    """A cluster probe whose centroids are spherical k-means (faiss, 25 iterations) of the head's codes of
    ``features`` (every token of every crop), instead of the probe trained by gradient steps.

    The trained probe tends to leave few centroids on the rare bright tokens; k-means over the codes of the
    mapping crops spreads them (on the demo phantom, K = 32: Dice 0.39 against 0.13 with the trained probe).
    """
    import faiss

    tokens = []
    for codes in _head_codes(module, features, batch_size):
        codes = F.normalize(codes, dim=1)
        tokens.append(codes.permute(0, 2, 3, 1).reshape(-1, codes.shape[1]).float().cpu().numpy())
    x = np.ascontiguousarray(np.concatenate(tokens), dtype=np.float32)
    kmeans = faiss.Kmeans(x.shape[1], n_clusters, niter=25, seed=seed, spherical=True)
    kmeans.train(x)
    probe = ClusterProbe(x.shape[1], n_clusters)
    probe.clusters.data = torch.from_numpy(np.ascontiguousarray(kmeans.centroids))
    return probe.to(module.device)


def fit_vessel_mapping(module: StegoModule, features: np.ndarray, crops: np.ndarray, labels: np.ndarray | None,
                       rule: str, n_clusters: int, *, probe: ClusterProbe | None = None,
                       bright_quantile: float = 99.0) -> tuple[torch.Tensor, str]:
    """Which clusters are vessel, decided on training crops by ``rule`` (``label`` = Hungarian for K = 2, else
    majority; ``hungarian``; ``majority``; ``dice``; ``brightness``; or ``bright_cut`` at the crops'
    ``bright_quantile``-th brain percentile); ``probe`` replaces the module's cluster probe.

    Label rules compare pixel cluster maps with the labels. The label-free rules compare clusters at the
    codes' own resolution: each token's cluster against the mean intensity of its pixels (average pooling), so
    a cluster's brightness is that of the tokens the head put in it, not of interpolated borders.
    """
    if rule not in LABEL_FREE_RULES:
        ids, _ = cluster_maps(module, features, crops.shape[-1], probe=probe)
        # balanced majority: vessels are a tiny minority, so a plain majority vote would mark no cluster
        mask, name = vessel_clusters("auto" if rule == "label" else rule, cluster_ids=ids, n_clusters=n_clusters,
                                     labels=labels, balanced=True)
    else:
        ids = token_clusters(module, features, probe=probe)
        grid = ids.shape[-1]
        intensities = F.adaptive_avg_pool2d(torch.from_numpy(np.asarray(crops, dtype=np.float32))[:, None], grid)
        cut = bright_cut(crops, bright_quantile) if rule == "bright_cut" else None
        mask, name = vessel_clusters(rule, cluster_ids=ids, n_clusters=n_clusters,
                                     intensities=intensities[:, 0].numpy(), cut=cut)
    return torch.as_tensor(mask, dtype=torch.bool), name


@torch.no_grad()
def token_clusters(module: StegoModule, features: np.ndarray, *, probe: ClusterProbe | None = None,
                   batch_size: int = 256) -> np.ndarray:
    """Cluster id ``(N, h, w)`` of every token of cached features (eval mode), at the codes' resolution."""
    probe = module.cluster_probe if probe is None else probe
    ids = [probe.predict(codes.to(probe.clusters.device)).cpu().numpy()
           for codes in _head_codes(module, features, batch_size)]
    return np.concatenate(ids)
