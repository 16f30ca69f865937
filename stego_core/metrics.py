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

from stego_core._checks import as_binary, check_ndim, check_range, check_same_shape

__all__ = [
    "METRIC_KEYS",
    "OBJECTIVE_KEYS",
    "SCORE_KEYS",
    "cldice",
    "connectivity_structure",
    "dice",
    "evaluate_segmentation",
    "foreground_bbox",
    "n_components",
    "precision",
    "recall",
    "skeleton",
    "summarize",
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

#: Connectivity (neighbours counted as touching) -> ``generate_binary_structure`` rank, per ndim.
_CONNECTIVITY_RANK = {2: {4: 1, 8: 2}, 3: {6: 1, 18: 2, 26: 3}}

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


def _metric_matrix(rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    """(n_rows, len(METRIC_KEYS)) float64 matrix, naming the row and key of anything missing."""
    if len(rows) == 0:
        raise ValueError("rows is empty; expected at least one dict of metrics")
    matrix = np.empty((len(rows), len(METRIC_KEYS)))
    for i, row in enumerate(rows):
        missing = [key for key in METRIC_KEYS if key not in row]
        if missing:
            who = f" (case_id {row['case_id']!r})" if "case_id" in row else ""
            raise ValueError(f"rows[{i}]{who} lacks metric keys {missing}; expected all of {list(METRIC_KEYS)}")
        matrix[i] = [float(row[key]) for key in METRIC_KEYS]
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


def _table_rows(rows: Sequence[Mapping[str, float]]) -> list[list[str]]:
    matrix = _metric_matrix(rows)
    case_ids = [str(row.get("case_id", f"volume_{i:03d}")) for i, row in enumerate(rows)]
    table = [[case_id, *map(_format, values)] for case_id, values in zip(case_ids, matrix)]
    table.append(["mean", *map(_format, matrix.mean(axis=0))])
    table.append(["std", *map(_format, matrix.std(axis=0))])
    return table


def write_results(
    rows: Sequence[Mapping[str, float]], out_dir: str | Path, *, method: str
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
    table = _table_rows(rows)  # validates before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)

    header = ["case_id", *METRIC_KEYS]
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

    matrix = _metric_matrix(rows)
    stats = {"mean": matrix.mean(axis=0), "std": matrix.std(axis=0)}
    with open(csv_path, "x", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["method", *header])
        for (case_id, *_), values in zip(table[:n_volumes], matrix):
            writer.writerow([method, case_id, *(repr(float(v)) for v in values)])
        for name, values in stats.items():
            writer.writerow([method, name, *(repr(float(v)) for v in values)])
    return txt_path, csv_path
