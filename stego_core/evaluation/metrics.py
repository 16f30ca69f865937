"""Segmentation metrics: the one metric vocabulary of the project.

Every score that reaches ``evaluation_results.txt``, the CSV table, MLflow or an Optuna objective is named by
:data:`METRIC_KEYS` and computed here, on full binary masks (2D or 3D, usually a reconstructed 3D volume):

- ``dice``: 2|P ∩ G| / (|P| + |G|).
- ``cldice``: centreline Dice (Shit et al., "clDice - a Novel Topology-Preserving Loss Function for Tubular
  Structure Segmentation", CVPR 2021, :DOI:`10.1109/CVPR46437.2021.01629`), the harmonic mean of
  ``tprec`` = |S(P) ∩ G| / |S(P)| (topology precision) and ``tsens`` = |S(G) ∩ P| / |S(G)| (topology
  sensitivity), where S is the morphological skeleton (``skimage.morphology.skeletonize``; Lee et al.'s
  method in 3D, Zhang's in 2D).
- ``precision`` = |P ∩ G| / |P| and ``recall`` = |P ∩ G| / |G| (voxel-wise).
- ``n_components_pred`` / ``n_components_gt``: connected components (26-connectivity in 3D, 8 in 2D), a
  topology error count (fragmented or spurious vessels) that overlap scores do not see.

Empty masks
-----------
One convention for every ratio: when both masks are empty the score is ``empty_score`` (default 1.0: nothing
to find and nothing found); when exactly one is empty the score is 0.0, whichever ratio is 0/0 (for example
``precision`` of an empty prediction against a non-empty target). A non-empty mask whose skeleton comes out
empty falls back to the mask itself as its centreline; with skimage this does not happen in practice, since
isolated voxels are kept.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.morphology import skeletonize

from stego_core._arrays import connectivity_structure, foreground_bbox
from stego_core._checks import as_binary, check_ndim, check_range, check_same_shape

__all__ = [
    "METRIC_KEYS",
    "OBJECTIVE_KEYS",
    "RADIUS_BINS",
    "SCORE_KEYS",
    "betti_errors",
    "betti_numbers",
    "cldice",
    "connectivity_structure",
    "dice",
    "evaluate_segmentation",
    "foreground_bbox",
    "n_components",
    "precision",
    "radius_recall",
    "recall",
    "skeleton",
    "summarize",
    "surface_distances",
    "topology_precision_sensitivity",
    "write_results",
]

#: Metric names shared by results tables, MLflow metric keys and sweep objectives.
METRIC_KEYS: tuple[str, ...] = (
    "dice",
    "cldice",
    "tprec",
    "tsens",
    "precision",
    "recall",
    "n_components_pred",
    "n_components_gt",
)
#: The headline scores of :data:`METRIC_KEYS`: comparison tables, parent-run summaries, entry-point output.
SCORE_KEYS: tuple[str, ...] = tuple(k for k in METRIC_KEYS if k in ("dice", "cldice", "precision", "recall"))
#: The scores a sweep may optimise (higher is better), clDice first.
OBJECTIVE_KEYS: tuple[str, ...] = ("cldice", "dice")
assert set(OBJECTIVE_KEYS) <= set(SCORE_KEYS)


RESULTS_TXT = "evaluation_results.txt"
RESULTS_CSV = "evaluation_results.csv"


# --------------------------------------------------------------------------------------------- validation


def _mask(array: np.ndarray, name: str) -> np.ndarray:
    """Return ``array`` as a 2D/3D bool mask; bool input skips the (slow on volumes) value scan."""
    array = np.asarray(array)
    check_ndim(array, (2, 3), name)
    if array.dtype == bool:
        return array
    return as_binary(array, name)


def _pair(pred: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a prediction/target pair: binary, 2D or 3D, equal shapes."""
    pred = _mask(pred, "pred")
    target = _mask(target, "target")
    check_same_shape(pred, target, "pred", "target")
    return pred, target


def _ratio(numerator: int, denominator: int, *, both_empty: bool, empty_score: float) -> float:
    """``numerator / denominator`` with the module's empty-mask convention."""
    if both_empty:
        return float(empty_score)
    if denominator == 0:
        return 0.0
    return numerator / denominator


def _check_empty_score(empty_score: float) -> None:
    check_range(empty_score, "empty_score", 0.0, 1.0)


# ------------------------------------------------------------------------------------------ overlap scores


def dice(pred: np.ndarray, target: np.ndarray, *, empty_score: float = 1.0) -> float:
    """Dice overlap 2|P ∩ G| / (|P| + |G|).

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
        Predicted and reference masks of equal shape.
    empty_score : float in [0, 1], keyword-only
        Score when both masks are empty. One empty mask gives 0.0.

    Returns
    -------
    float in [0, 1]

    Examples
    --------
    >>> a = np.zeros((4, 4), bool); a[1, :] = True
    >>> b = np.zeros((4, 4), bool); b[1, :2] = True
    >>> dice(a, b)  # 2 * 2 / (4 + 2)
    0.6666666666666666
    >>> dice(np.zeros((4, 4)), np.zeros((4, 4)))
    1.0
    """
    _check_empty_score(empty_score)
    pred, target = _pair(pred, target)
    return _dice(pred, target, empty_score)


def _dice(pred: np.ndarray, target: np.ndarray, empty_score: float) -> float:
    n_pred, n_target = int(np.count_nonzero(pred)), int(np.count_nonzero(target))
    both_empty = n_pred == 0 and n_target == 0
    intersection = int(np.count_nonzero(pred & target)) if n_pred and n_target else 0
    return _ratio(2 * intersection, n_pred + n_target, both_empty=both_empty, empty_score=empty_score)


def precision(pred: np.ndarray, target: np.ndarray, *, empty_score: float = 1.0) -> float:
    """Voxel precision |P ∩ G| / |P| (fraction of predicted voxels that are vessel).

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
    empty_score : float in [0, 1], keyword-only
        Score when both masks are empty; an empty ``pred`` with a non-empty ``target`` gives 0.0.

    Returns
    -------
    float in [0, 1]
    """
    _check_empty_score(empty_score)
    pred, target = _pair(pred, target)
    return _precision_recall(pred, target, empty_score)[0]


def recall(pred: np.ndarray, target: np.ndarray, *, empty_score: float = 1.0) -> float:
    """Voxel recall (sensitivity) |P ∩ G| / |G| (fraction of vessel voxels found).

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
    empty_score : float in [0, 1], keyword-only
        Score when both masks are empty; an empty ``target`` with a non-empty ``pred`` gives 0.0.

    Returns
    -------
    float in [0, 1]
    """
    _check_empty_score(empty_score)
    pred, target = _pair(pred, target)
    return _precision_recall(pred, target, empty_score)[1]


def _precision_recall(pred: np.ndarray, target: np.ndarray, empty_score: float) -> tuple[float, float]:
    n_pred, n_target = int(np.count_nonzero(pred)), int(np.count_nonzero(target))
    both_empty = n_pred == 0 and n_target == 0
    intersection = int(np.count_nonzero(pred & target)) if n_pred and n_target else 0
    return (
        _ratio(intersection, n_pred, both_empty=both_empty, empty_score=empty_score),
        _ratio(intersection, n_target, both_empty=both_empty, empty_score=empty_score),
    )


# ------------------------------------------------------------------------------------------------ skeletons


def skeleton(mask: np.ndarray) -> np.ndarray:
    """Morphological skeleton (centreline) of a binary mask.

    Only the foreground's bounding box plus a one-voxel margin is thinned, which keeps large, sparse vessel
    volumes fast. A non-empty mask whose skeleton comes out empty falls back to the mask itself.

    Parameters
    ----------
    mask : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}

    Returns
    -------
    (M, N[, P]) bool ndarray
        ``skimage.morphology.skeletonize`` of ``mask`` (Lee's 3D thinning, Zhang's in 2D).

    Examples
    --------
    >>> tube = np.zeros((9, 9, 20), bool); tube[3:6, 3:6, 2:18] = True  # a 3x3-voxel bar along k
    >>> np.argwhere(skeleton(tube))[[0, -1]]  # its centreline, one voxel shorter at each end
    array([[ 4,  4,  3],
           [ 4,  4, 16]])
    """
    return _skeleton(_mask(mask, "mask"))


def _skeleton(mask: np.ndarray) -> np.ndarray:
    out = np.zeros(mask.shape, dtype=bool)
    box = foreground_bbox(mask)
    if box is None:
        return out
    crop = mask[box]
    padded = np.pad(crop, 1)  # 1-voxel background margin: thinning never touches the array border
    skel = skeletonize(padded) > 0
    skel = skel[(slice(1, -1),) * mask.ndim]
    if not skel.any():  # cannot thin to nothing in practice; never let a non-empty mask lose its centreline
        skel = crop
    out[box] = skel
    return out


def topology_precision_sensitivity(
    pred: np.ndarray, target: np.ndarray, *, empty_score: float = 1.0
) -> tuple[float, float]:
    """Topology precision and sensitivity of clDice (Shit et al., CVPR 2021, eq. 1-2).

    ``tprec`` = |S(P) ∩ G| / |S(P)|: how much of the predicted centreline lies inside the reference.
    ``tsens`` = |S(G) ∩ P| / |S(G)|: how much of the reference centreline the prediction covers.

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
    empty_score : float in [0, 1], keyword-only
        Both scores when both masks are empty; one empty mask gives (0.0, 0.0).

    Returns
    -------
    tprec, tsens : float in [0, 1]
    """
    _check_empty_score(empty_score)
    pred, target = _pair(pred, target)
    return _tprec_tsens(pred, target, empty_score)


def _tprec_tsens(pred: np.ndarray, target: np.ndarray, empty_score: float) -> tuple[float, float]:
    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not has_pred and not has_target:
        return float(empty_score), float(empty_score)
    if not has_pred or not has_target:
        return 0.0, 0.0
    skel_pred, skel_target = _skeleton(pred), _skeleton(target)
    tprec = np.count_nonzero(skel_pred & target) / np.count_nonzero(skel_pred)
    tsens = np.count_nonzero(skel_target & pred) / np.count_nonzero(skel_target)
    return float(tprec), float(tsens)


def _harmonic(tprec: float, tsens: float) -> float:
    return 0.0 if tprec + tsens == 0 else 2.0 * tprec * tsens / (tprec + tsens)


def cldice(pred: np.ndarray, target: np.ndarray, *, empty_score: float = 1.0) -> float:
    """Centreline Dice: 2 Tprec Tsens / (Tprec + Tsens) (Shit et al., CVPR 2021, eq. 3).

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
        Predicted and reference masks of equal shape; 3D masks get 3D skeletons.
    empty_score : float in [0, 1], keyword-only
        Score when both masks are empty. One empty mask gives 0.0, as does Tprec + Tsens = 0.

    Returns
    -------
    float in [0, 1]

    Examples
    --------
    >>> tube = np.zeros((9, 9, 20), bool); tube[3:6, 3:6, 2:18] = True
    >>> cldice(tube, tube)
    1.0
    """
    _check_empty_score(empty_score)
    pred, target = _pair(pred, target)
    return _harmonic(*_tprec_tsens(pred, target, empty_score))


# --------------------------------------------------------------------------------------------- components


def n_components(mask: np.ndarray, *, connectivity: int | None = None) -> int:
    """Number of connected foreground components.

    Parameters
    ----------
    mask : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
    connectivity : {6, 18, 26} in 3D, {4, 8} in 2D, or None, keyword-only
        Neighbours that touch: faces (6 / 4), faces and edges (18), or all (26 / 8). ``None`` means full
        connectivity (26 in 3D, 8 in 2D), the convention of the vessel-label statistics.

    Returns
    -------
    int

    Examples
    --------
    >>> diagonal = np.eye(3, dtype=bool)
    >>> n_components(diagonal), n_components(diagonal, connectivity=4)
    (1, 3)
    """
    mask = _mask(mask, "mask")
    return _n_components(mask, connectivity)


def _n_components(mask: np.ndarray, connectivity: int | None) -> int:
    structure = connectivity_structure(mask.ndim, connectivity)
    box = foreground_bbox(mask)
    if box is None:
        return 0
    return int(ndimage.label(mask[box], structure=structure)[1])


# -------------------------------------------------------------------------------------------- all at once


def evaluate_segmentation(
    pred: np.ndarray, target: np.ndarray, *, empty_score: float = 1.0, connectivity: int | None = None
) -> dict[str, float]:
    """All metrics of :data:`METRIC_KEYS` for one prediction (skeletons computed once).

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
        Predicted and reference masks of equal shape (full 3D volumes for the product's results).
    empty_score : float in [0, 1], keyword-only
        Ratio scores when both masks are empty (see the module notes).
    connectivity : int or None, keyword-only
        Component connectivity, as in :func:`n_components` (default: 26 in 3D, 8 in 2D).

    Returns
    -------
    dict[str, float]
        Exactly the keys of :data:`METRIC_KEYS`, in that order; counts are floats too (MLflow metrics).
    """
    _check_empty_score(empty_score)
    pred, target = _pair(pred, target)
    connectivity_structure(pred.ndim, connectivity)  # validate before the expensive part
    tprec, tsens = _tprec_tsens(pred, target, empty_score)
    prec, rec = _precision_recall(pred, target, empty_score)
    values = {
        "dice": _dice(pred, target, empty_score),
        "cldice": _harmonic(tprec, tsens),
        "tprec": tprec,
        "tsens": tsens,
        "precision": prec,
        "recall": rec,
        "n_components_pred": float(_n_components(pred, connectivity)),
        "n_components_gt": float(_n_components(target, connectivity)),
    }
    return {key: float(values[key]) for key in METRIC_KEYS}


# ---------------------------------------------------------------------------------------- results tables


def _metric_matrix(rows: Sequence[Mapping[str, float]], keys: Sequence[str] = METRIC_KEYS) -> np.ndarray:
    """(n_rows, len(keys)) float64 matrix, naming the row and key of anything missing."""
    if len(rows) == 0:
        raise ValueError("rows is empty; expected at least one dict of metrics")
    matrix = np.empty((len(rows), len(keys)))
    for i, row in enumerate(rows):
        missing = [key for key in keys if key not in row]
        if missing:
            who = f" (case_id {row['case_id']!r})" if "case_id" in row else ""
            raise ValueError(f"rows[{i}]{who} lacks metric keys {missing}; expected all of {list(keys)}")
        matrix[i] = [float(row[key]) for key in keys]
    return matrix


def summarize(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean and standard deviation of every metric over volumes.

    Parameters
    ----------
    rows : sequence of dict
        One dict per volume holding at least the keys of :data:`METRIC_KEYS` (as from
        :func:`evaluate_segmentation`); other keys (``case_id``) are ignored.

    Returns
    -------
    dict[str, float]
        ``{key}_mean`` and ``{key}_std`` for each metric key, in :data:`METRIC_KEYS` order. The standard
        deviation is the population one (``ddof=0``), so one volume gives 0.0 rather than NaN.

    Examples
    --------
    >>> rows = [dict.fromkeys(METRIC_KEYS, 0.5), dict.fromkeys(METRIC_KEYS, 1.0)]
    >>> s = summarize(rows); s["dice_mean"], s["dice_std"]
    (0.75, 0.25)
    """
    matrix = _metric_matrix(rows)
    mean, std = matrix.mean(axis=0), matrix.std(axis=0)
    out: dict[str, float] = {}
    for j, key in enumerate(METRIC_KEYS):
        out[f"{key}_mean"] = float(mean[j])
        out[f"{key}_std"] = float(std[j])
    return out


def _format(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4f}"


def _table_rows(rows: Sequence[Mapping[str, float]], keys: Sequence[str] = METRIC_KEYS) -> list[list[str]]:
    matrix = _metric_matrix(rows, keys)
    case_ids = [str(row.get("case_id", f"volume_{i:03d}")) for i, row in enumerate(rows)]
    table = [[case_id, *map(_format, values)] for case_id, values in zip(case_ids, matrix)]
    table.append(["mean", *map(_format, matrix.mean(axis=0))])
    table.append(["std", *map(_format, matrix.std(axis=0))])
    return table


def write_results(
    rows: Sequence[Mapping[str, float]], out_dir: str | Path, *, method: str, extra_keys: Sequence[str] = ()
) -> tuple[Path, Path]:
    """Write the per-volume results table as text and as CSV.

    Parameters
    ----------
    rows : sequence of dict
        One dict per volume: ``case_id`` (str; ``volume_000``... when absent) and the keys of
        :data:`METRIC_KEYS`.
    out_dir : str or Path
        Folder to write into (created if missing), normally scoped by run id.
    method : str, keyword-only
        Segmentation method name (``stego``, ``otsu``, ...), written in both files.
    extra_keys : sequence of str, keyword-only
        Further columns after :data:`METRIC_KEYS` that every row holds (e.g. the analysis keys:
        Betti-number errors, recall per radius bin).

    Returns
    -------
    txt_path, csv_path : Path
        ``out_dir / "evaluation_results.txt"``: an aligned table, one row per volume, then ``mean`` and
        ``std`` rows (population std). ``out_dir / "evaluation_results.csv"``: the same rows with a leading
        ``method`` column and full float precision.

    Raises
    ------
    FileExistsError
        If either file already exists; nothing is written then.
    """
    if not isinstance(method, str) or not method:
        raise ValueError(f"method must be a non-empty string; got {method!r}")
    out_dir = Path(out_dir)
    txt_path, csv_path = out_dir / RESULTS_TXT, out_dir / RESULTS_CSV
    for path in (txt_path, csv_path):
        if path.exists():
            raise FileExistsError(f"{path} already exists; refusing to overwrite earlier results")
    keys = (*METRIC_KEYS, *extra_keys)
    table = _table_rows(rows, keys)  # validates before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)

    header = ["case_id", *keys]
    widths = [max(len(r[j]) for r in [header, *table]) for j in range(len(header))]

    def line(cells: Iterable[str]) -> str:
        cells = list(cells)
        first = cells[0].ljust(widths[0])
        return "  ".join([first, *(c.rjust(w) for c, w in zip(cells[1:], widths[1:]))]).rstrip()

    n_volumes = len(table) - 2
    text = [f"method: {method}", f"volumes: {n_volumes}", "", line(header), line("-" * w for w in widths)]
    text += [line(r) for r in table[:n_volumes]]
    text.append(line("-" * w for w in widths))
    text += [line(r) for r in table[n_volumes:]]
    with open(txt_path, "x", encoding="utf-8") as f:
        f.write("\n".join(text) + "\n")

    matrix = _metric_matrix(rows, keys)
    stats = {"mean": matrix.mean(axis=0), "std": matrix.std(axis=0)}
    with open(csv_path, "x", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *header])
        for (case_id, *_), values in zip(table[:n_volumes], matrix):
            writer.writerow([method, case_id, *(repr(float(v)) for v in values)])
        for name, values in stats.items():
            writer.writerow([method, name, *(repr(float(v)) for v in values)])
    return txt_path, csv_path


# ------------------------------------------------------------------------- topology, vessel size, surfaces
#
# Analysis metrics beside METRIC_KEYS; not part of evaluate_segmentation. Topology
# follows the TopCoW 2023 binary task (Yang et al., "Benchmarking the CoW with the TopCoW Challenge:
# Topology-Aware Anatomical Segmentation of the Circle of Willis for CTA and MRA", arXiv:2312.17670, and its
# evaluation code github.com/CoWBenchmark/TopCoW_Eval_Metrics, ``betti_number``).

#: Radius bins of :func:`radius_recall`, thinnest first.
RADIUS_BINS: tuple[str, ...] = ("thin", "medium", "thick")


def _padded_crop(mask: np.ndarray) -> np.ndarray | None:
    """The foreground's bounding box with one voxel of background on every side (``None`` if empty).

    Every quantity of :func:`betti_numbers` is unchanged by it: the background outside the box is one
    6-connected piece joined to the border, and the Euler characteristic is a sum over 2x2x2 neighbourhoods.
    """
    box = foreground_bbox(mask)
    if box is None:
        return None
    return np.pad(mask[box], 1)


def betti_numbers(mask: np.ndarray) -> tuple[int, int, int]:
    """Betti numbers (b0, b1, b2) of a 3D binary mask, as scored by TopCoW 2023.

    The mask is first padded by one voxel of background on every side (so a vessel cut by the field of view
    does not enclose the array's border), then

    - b0 = number of 26-connected foreground components (vessel pieces);
    - b2 = number of 6-connected background components that do not touch the padded border (cavities); after
      padding exactly one background component touches it, so b2 = (background components) - 1;
    - b1 = b0 + b2 - chi (loops, tunnels), with chi the Euler characteristic of the foreground with
      26-connectivity (``skimage.measure.euler_number(mask, connectivity=3)``), since chi = b0 - b1 + b2.

    26-connectivity for the foreground and 6 for the background is the consistent pair of digital topology:
    a loop closes through diagonal contacts exactly when the background cannot pass between them.

    Parameters
    ----------
    mask : (M, N, P) ndarray of bool or {0, 1} / {0, 255}
        A 3D mask (the definitions are 3D-specific; 2D masks are refused).

    Returns
    -------
    b0, b1, b2 : int
        All 0 for an empty mask.

    References
    ----------
    .. [1] Yang K. et al., "Benchmarking the CoW with the TopCoW Challenge", arXiv:2312.17670 (2023).
    .. [2] Kong T. Y., Rosenfeld A., "Digital topology: introduction and survey", Computer Vision, Graphics,
           and Image Processing 48(3), 1989, :DOI:`10.1016/0734-189X(89)90147-3`.

    Examples
    --------
    >>> cube = np.zeros((7, 7, 7), bool); cube[1:6, 1:6, 1:6] = True
    >>> betti_numbers(cube)
    (1, 0, 0)
    >>> shell = cube.copy(); shell[2:5, 2:5, 2:5] = False  # one enclosed cavity
    >>> betti_numbers(shell)
    (1, 0, 1)
    >>> ring = cube.copy(); ring[2:5, 2:5, :] = False  # a square tube open at both ends: one loop
    >>> betti_numbers(ring)
    (1, 1, 0)
    """
    mask = np.asarray(mask)
    check_ndim(mask, 3, "mask")
    return _betti_numbers(_mask(mask, "mask"))


def _betti_numbers(mask: np.ndarray) -> tuple[int, int, int]:
    from skimage.measure import (
        euler_number,  # skimage.measure is slow to import; only these metrics need it
    )

    padded = _padded_crop(mask)
    if padded is None:
        return 0, 0, 0
    b0 = int(ndimage.label(padded, structure=ndimage.generate_binary_structure(3, 3))[1])
    n_background = int(ndimage.label(~padded, structure=ndimage.generate_binary_structure(3, 1))[1])
    b2 = n_background - 1  # the one component holding the padded border is not a cavity
    chi = int(euler_number(padded, connectivity=3))
    return b0, b0 + b2 - chi, b2


def betti_errors(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Betti-number errors |b0(P) - b0(G)| and |b1(P) - b1(G)| (TopCoW 2023's binary-task topology scores).

    See :func:`betti_numbers` for the definitions (3D, one voxel of background padding, 26-connected
    foreground, 6-connected background). Lower is better; 0 means the same number of pieces (b0) or of loops
    (b1). Two empty masks give 0 errors; an empty prediction against a label with b0 pieces gives b0.

    Parameters
    ----------
    pred, target : (M, N, P) ndarray of bool or {0, 1} / {0, 255}
        Predicted and reference masks of equal shape.

    Returns
    -------
    dict[str, float]
        ``betti0_error`` and ``betti1_error`` (floats, like the other logged counts).

    Examples
    --------
    >>> target = np.zeros((7, 7, 7), bool); target[1:6, 1:6, 1:6] = True; target[2:5, 2:5, :] = False
    >>> pred = target.copy(); pred[3] = False  # cut the ring along its axis: two pieces, no loop
    >>> betti_errors(pred, target)
    {'betti0_error': 1.0, 'betti1_error': 1.0}
    """
    pred, target = np.asarray(pred), np.asarray(target)
    check_ndim(pred, 3, "pred")
    check_ndim(target, 3, "target")
    pred, target = _pair(pred, target)
    b_pred, b_target = _betti_numbers(pred), _betti_numbers(target)
    return {
        "betti0_error": float(abs(b_pred[0] - b_target[0])),
        "betti1_error": float(abs(b_pred[1] - b_target[1])),
    }


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    """Validate a voxel spacing: ``ndim`` positive finite floats (or ``None``)."""
    if spacing is None:
        return None
    values = tuple(float(s) for s in np.ravel(np.asarray(spacing, dtype=float)))
    if len(values) != ndim or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be {ndim} positive finite voxel sizes (mm); got {spacing!r}")
    return values


def _grown_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Foreground bounding box grown by one voxel, clipped to the array (``None`` if empty)."""
    box = foreground_bbox(mask, pad=1)
    if box is None:
        return None
    return tuple(slice(s.start, min(s.stop, n)) for s, n in zip(box, mask.shape))


def radius_recall(
    pred: np.ndarray,
    target: np.ndarray,
    *,
    spacing: Sequence[float] | None = None,
    bounds_vox: tuple[float, float] = (1.5, 3.0),
    bounds_mm: tuple[float, float] | None = None,
) -> dict[str, float]:
    """Voxel recall stratified by vessel radius: thin, medium and thick vessels of the label.

    Radius: the label's skeleton S(G) (:func:`skeleton`) carries the Euclidean distance transform of the label,
    D(x) = distance from x to the nearest background voxel (``scipy.ndimage.distance_transform_edt``; in mm
    with ``sampling=spacing`` when spacing is given, else in voxels). Every label voxel takes the radius of its
    nearest skeleton voxel (``distance_transform_edt(~S, return_indices=True)``, same sampling; ties go to
    scipy's choice). With this convention a vessel one voxel wide has radius 1, one 3 voxels wide radius 2
    (sqrt 2 and sqrt 5 for the 5- and 13-voxel discretised discs), i.e. about half the width plus half a voxel.
    Voxels outside the array are unknown rather than background: a vessel cut by the field of view keeps its
    radius up to the border (only a label with no background voxel at all falls back to a background border).

    Bins, half-open on the right: thin r < low, medium low <= r < high, thick r >= high, with
    (low, high) = ``bounds_vox`` in voxels, or in mm when ``spacing`` is given: ``bounds_mm`` if given, else
    ``bounds_vox`` times the voxel's geometric-mean edge (prod(spacing) ** (1 / ndim), the isotropic voxel of
    the same volume; exactly the spacing for isotropic voxels). The returned keys name both.

    recall_b = |P ∩ G_b| / |G_b| for the label voxels G_b in bin b.

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
        Predicted and reference masks of equal shape.
    spacing : sequence of ndim floats or None, keyword-only
        Voxel size in mm along each array axis (from the NIfTI header); ``None`` measures in voxels.
    bounds_vox : (float, float), keyword-only
        Bin bounds (low < high) in voxels.
    bounds_mm : (float, float) or None, keyword-only
        Bin bounds in mm, used only with ``spacing`` (default: ``bounds_vox`` scaled as above).

    Returns
    -------
    dict[str, float]
        ``recall_thin``, ``recall_medium``, ``recall_thick``: recall per bin, NaN when the label has no voxel in
        that bin (nothing to find; average over cases with ``nanmean`` and report the counts);
        ``n_thin``, ``n_medium``, ``n_thick``: label voxels per bin; ``bound_low_vox``, ``bound_high_vox``;
        and with ``spacing`` also ``bound_low_mm``, ``bound_high_mm`` (the bounds actually applied). An empty
        label gives NaN recalls and zero counts; an empty prediction gives 0.0 in every non-empty bin.

    References
    ----------
    .. [1] Maurer C. R., Qi R., Raghavan V., "A linear time algorithm for computing exact Euclidean distance
           transforms of binary images in arbitrary dimensions", IEEE TPAMI 25(2), 2003,
           :DOI:`10.1109/TPAMI.2003.1177156` (the algorithm of ``distance_transform_edt``).
    .. [2] Lee T.-C., Kashyap R. L., Chu C.-N., "Building skeleton models via 3-D medial surface/axis thinning
           algorithms", CVGIP: Graphical Models and Image Processing 56(6), 1994,
           :DOI:`10.1006/cgip.1994.1042`.

    Examples
    --------
    >>> target = np.zeros((9, 9, 12), bool); target[3:6, 3:6, :] = True  # a 3x3 bar: radius 2
    >>> pred = target.copy(); pred[:, :, 6:] = False  # half of it found
    >>> r = radius_recall(pred, target)
    >>> r["recall_medium"], r["n_medium"], r["n_thin"], math.isnan(r["recall_thin"])
    (0.5, 108.0, 0.0, True)
    >>> r = radius_recall(pred, target, spacing=(0.5, 0.5, 0.5))  # radius 1 mm, bounds 0.75 / 1.5 mm
    >>> r["recall_medium"], r["bound_low_mm"], r["bound_high_mm"]
    (0.5, 0.75, 1.5)
    """
    pred, target = _pair(pred, target)
    spacing = _spacing(spacing, target.ndim)
    low, high = (float(b) for b in bounds_vox)
    if not 0 <= low < high:
        raise ValueError(f"bounds_vox must be two increasing non-negative radii; got {bounds_vox!r}")
    out_bounds: dict[str, float] = {"bound_low_vox": low, "bound_high_vox": high}
    if spacing is not None:
        if bounds_mm is None:
            edge = float(np.prod(spacing)) ** (1.0 / len(spacing))
            low, high = low * edge, high * edge
        else:
            low, high = (float(b) for b in bounds_mm)
            if not 0 <= low < high:
                raise ValueError(f"bounds_mm must be two increasing non-negative radii; got {bounds_mm!r}")
        out_bounds.update(bound_low_mm=low, bound_high_mm=high)
    elif bounds_mm is not None:
        raise ValueError("bounds_mm applies only with spacing; give spacing or use bounds_vox")

    counts = {name: 0 for name in RADIUS_BINS}
    hits = {name: 0 for name in RADIUS_BINS}
    radius = _label_radius(target, spacing)
    if radius is not None:
        box, radii = radius
        found = pred[box][target[box]]
        bins = np.digitize(radii, [low, high])  # 0: r < low, 1: low <= r < high, 2: r >= high
        for index, name in enumerate(RADIUS_BINS):
            in_bin = bins == index
            counts[name] = int(np.count_nonzero(in_bin))
            hits[name] = int(np.count_nonzero(found & in_bin))
    out: dict[str, float] = {}
    for name in RADIUS_BINS:
        out[f"recall_{name}"] = hits[name] / counts[name] if counts[name] else math.nan
    for name in RADIUS_BINS:
        out[f"n_{name}"] = float(counts[name])
    out.update(out_bounds)
    return out


def _label_radius(
    target: np.ndarray, spacing: tuple[float, ...] | None
) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """(box, radius of each label voxel in ``target[box]``, in C order), or ``None`` for an empty label.

    Cropping to the label's box grown by one voxel changes no distance: every background voxel beyond the box
    is farther from the label than a background voxel of the grown box's outer layer.
    """
    box = _grown_box(target)
    if box is None:
        return None
    crop = target[box]
    if crop.all():  # no background anywhere: let the array's border be the vessel wall
        crop_edt = ndimage.distance_transform_edt(np.pad(crop, 1), sampling=spacing)
        crop_edt = crop_edt[(slice(1, -1),) * crop.ndim]
    else:
        crop_edt = ndimage.distance_transform_edt(crop, sampling=spacing)
    skel = _skeleton(crop)
    nearest = ndimage.distance_transform_edt(
        ~skel, sampling=spacing, return_distances=False, return_indices=True
    )
    where = np.nonzero(crop)
    radii = crop_edt[tuple(axis[where] for axis in nearest)]
    return box, radii


def surface_distances(
    pred: np.ndarray, target: np.ndarray, spacing: Sequence[float] | None
) -> dict[str, float]:
    """Symmetric surface distances in mm: the 95th-percentile Hausdorff distance and the ASSD.

    Surfaces: ∂A = A minus its erosion by the face-connected cross (6-neighbourhood in 3D, 4 in 2D), voxels
    outside the array counting as background (a mask voxel on the array border is a surface voxel). d(x, B) is
    the Euclidean distance in mm (``distance_transform_edt`` with ``sampling=spacing``) from the centre of
    voxel x to the nearest voxel centre of surface B. With D_PG = {d(p, ∂G) : p in ∂P} and D_GP likewise:

    - ``hd95_mm`` = max(q95(D_PG), q95(D_GP)), q95 the 95th percentile (``np.percentile``, linear
      interpolation): the robust Hausdorff distance of MONAI and of DeepMind's surface-distance (medpy's
      ``hd95`` takes the percentile of the pooled distances instead, which can be smaller);
    - ``assd_mm`` = (sum D_PG + sum D_GP) / (|∂P| + |∂G|) (Heimann et al. 2009).

    Parameters
    ----------
    pred, target : (M, N[, P]) ndarray of bool or {0, 1} / {0, 255}
        Predicted and reference masks of equal shape.
    spacing : sequence of ndim floats
        Voxel size in mm along each array axis (from the NIfTI header). Required: distances in voxels are not
        reported, since voxels are anisotropic in general.

    Returns
    -------
    dict[str, float]
        ``hd95_mm`` and ``assd_mm`` (lower is better). Both masks empty: 0.0 for both (nothing to separate).
        Exactly one empty (no surface to measure to): both are the diagonal of the array's field of view,
        sqrt(sum_i (n_i s_i)^2) mm for shape n and spacing s, a bound on every distance inside it (the BraTS
        convention, 373.13 mm for 240x240x155 voxels of 1 mm): the worst score, finite, so means and paired
        statistics over cases rank an empty prediction last instead of dropping it (NaN) or breaking (inf).

    Raises
    ------
    ValueError
        If ``spacing`` is None (the caller skips these metrics and logs this reason), or is not ndim positive
        finite floats.

    References
    ----------
    .. [1] Heimann T. et al., "Comparison and evaluation of methods for liver segmentation from CT datasets",
           IEEE TMI 28(8), 2009, :DOI:`10.1109/TMI.2009.2013851` (ASSD).
    .. [2] Huttenlocher D. P., Klanderman G. A., Rucklidge W. J., "Comparing images using the Hausdorff
           distance", IEEE TPAMI 15(9), 1993, :DOI:`10.1109/34.232073`.

    Examples
    --------
    >>> a = np.zeros((12, 8, 8), bool); a[2:6, 2:6, 2:6] = True
    >>> b = np.roll(a, 3, axis=0)  # the same cube 3 voxels further along axis 0
    >>> surface_distances(a, b, spacing=(0.5, 1.0, 1.0))["hd95_mm"]  # 3 voxels of 0.5 mm
    1.5
    >>> surface_distances(a, a, spacing=(1, 1, 1))
    {'hd95_mm': 0.0, 'assd_mm': 0.0}
    """
    pred, target = _pair(pred, target)
    if spacing is None:
        raise ValueError(
            "surface_distances needs the voxel spacing in mm (spacing=None): HD95/ASSD are skipped for "
            "volumes without a known spacing"
        )
    spacing = _spacing(spacing, target.ndim)
    has_pred, has_target = bool(pred.any()), bool(target.any())
    if not has_pred and not has_target:
        return {"hd95_mm": 0.0, "assd_mm": 0.0}
    if not has_pred or not has_target:
        diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(target.shape, spacing)))
        return {"hd95_mm": diagonal, "assd_mm": diagonal}
    box = _grown_box(pred | target)  # every surface voxel lies inside; crop edges are background or border
    pred, target = pred[box], target[box]
    cross = ndimage.generate_binary_structure(target.ndim, 1)
    surf_pred = pred & ~ndimage.binary_erosion(pred, structure=cross, border_value=0)
    surf_target = target & ~ndimage.binary_erosion(target, structure=cross, border_value=0)
    d_pred_target = ndimage.distance_transform_edt(~surf_target, sampling=spacing)[surf_pred]
    d_target_pred = ndimage.distance_transform_edt(~surf_pred, sampling=spacing)[surf_target]
    hd95 = max(float(np.percentile(d_pred_target, 95)), float(np.percentile(d_target_pred, 95)))
    assd = (float(d_pred_target.sum()) + float(d_target_pred.sum())) / (d_pred_target.size + d_target_pred.size)
    return {"hd95_mm": hd95, "assd_mm": assd}
