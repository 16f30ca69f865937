"""Figures for people to look at: projections, crop panels and method comparisons.

Every function returns a :class:`matplotlib.figure.Figure` built without ``pyplot``: no global figure
registry, nothing to close, no backend switch (``savefig`` renders PNG with Agg). The caller saves it
(``fig.savefig(path)``) or hands it to the tracking module. Images are drawn with the first array axis
horizontal and the second vertical, origin at the bottom (``imshow(a.T, origin="lower")``): for an axial
maximum-intensity projection of an (I, J, K) volume, x runs left to right and y bottom to top; for the other
axes the slice index k points up.

Error overlay colours: true positives gold, false positives red, false negatives cyan (on a dimmed image
projection); where a projection ray holds several kinds, errors win over true positives and false positives over
false negatives. Gold, not grey: found vessels are the brightest voxels of a MIP, and a light grey overlay on them
vanished; the three colours differ in lightness as well as hue (readable with red-green colour blindness).

The figures people look at in MLflow (image cards, the comparison plots of a parent run, its report) are drawn
:data:`CARD_WIDTH_IN` inches wide at 100 dpi: 600 px, the width of MLflow's image card, so that nothing is scaled
down to a thumbnail.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure

from stego_core._checks import as_binary, check_ndim, check_range, check_same_shape
from stego_core.evaluation.metrics import RADIUS_BINS

__all__ = [
    "ERROR_COLOURS",
    "comparison_bar_figure",
    "error_overlay",
    "mask_outline_figure",
    "mip_figure",
    "per_case_figure",
    "radius_recall_figure",
    "slice_panel_figure",
]

#: RGB colours of the error overlay: found (gold), false (red), missed (cyan).
ERROR_COLOURS: Mapping[str, tuple[float, float, float]] = {
    "tp": (1.0, 0.8, 0.0),
    "fp": (1.0, 0.0, 0.0),
    "fn": (0.0, 1.0, 1.0),
}
#: Width of the figures shown in MLflow's image cards and the report: 6 in at 100 dpi = 600 px.
CARD_WIDTH_IN = 6.0
_DPI = 100


def _show(ax, array2d: np.ndarray, **kwargs) -> None:
    """Draw a 2D (or 2D RGB) array with its first axis horizontal, origin at the bottom."""
    ax.imshow(np.swapaxes(array2d, 0, 1), origin="lower", interpolation="nearest", **kwargs)
    ax.set_xticks([])
    ax.set_yticks([])


def _display_range(array: np.ndarray) -> tuple[float, float]:
    lo, hi = np.percentile(array, [0.5, 99.9]) if array.size else (0.0, 1.0)
    return (float(lo), float(hi)) if hi > lo else (float(lo), float(lo) + 1.0)


def _binary(array: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(array)
    return array if array.dtype == bool else as_binary(array, name)


def error_overlay(
    image_mip: np.ndarray, target: np.ndarray, pred: np.ndarray, *, axis: int = 2
) -> np.ndarray:
    """RGB projection of true positives, false positives and false negatives along ``axis``.

    Parameters
    ----------
    image_mip : (A, B) float ndarray
        Maximum-intensity projection of the image along ``axis`` (the dimmed backdrop).
    target, pred : (I, J, K) bool ndarray
        Reference and predicted masks.
    axis : {0, 1, 2}, keyword-only
        Projection axis.

    Returns
    -------
    (A, B, 3) float32 ndarray in [0, 1]
        Colours of :data:`ERROR_COLOURS` where any voxel of the ray is of that kind (errors drawn last).
    """
    lo, hi = _display_range(image_mip)
    backdrop = 0.35 * np.clip((image_mip - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(backdrop[..., None], 3, axis=-1).astype(np.float32)
    layers = {
        "tp": (pred & target).any(axis=axis),
        "fn": (~pred & target).any(axis=axis),
        "fp": (pred & ~target).any(axis=axis),
    }
    for kind in ("tp", "fn", "fp"):  # later layers win
        rgb[layers[kind]] = ERROR_COLOURS[kind]
    return rgb


def mip_figure(
    image: np.ndarray,
    target: np.ndarray | None,
    pred: np.ndarray,
    *,
    axis: int = 2,
    title: str = "",
) -> Figure:
    """Maximum-intensity projections of image, ground truth, prediction, and an error overlay.

    Parameters
    ----------
    image : (I, J, K) float ndarray
        Intensities (any range; displayed between the 0.5 and 99.9 percentiles of the projection).
    target : (I, J, K) bool or {0, 1} ndarray or None
        Reference vessel mask; None draws only the image and prediction panels.
    pred : (I, J, K) bool or {0, 1} ndarray
        Predicted vessel mask.
    axis : {0, 1, 2}, keyword-only
        Projection axis (2: axial view of a volume in nibabel voxel order).
    title : str, keyword-only
        Figure title (e.g. case id and method).

    Returns
    -------
    Figure
        600 px wide: 2 x 2 panels (image, ground truth, prediction, errors), or a row of 2 when ``target`` is
        None.
    """
    image = np.asarray(image)
    check_ndim(image, 3, "image")
    check_range(axis, "axis", 0, 2)
    pred = _binary(pred, "pred")
    check_same_shape(image, pred, "image", "pred")
    if target is not None:
        target = _binary(target, "target")
        check_same_shape(image, target, "image", "target")

    image_mip = image.max(axis=axis).astype(np.float32)
    panels: list[tuple[str, np.ndarray, dict]] = []
    lo, hi = _display_range(image_mip)
    panels.append(("image MIP", image_mip, {"cmap": "gray", "vmin": lo, "vmax": hi}))
    binary_style = {"cmap": "gray", "vmin": 0, "vmax": 1}
    if target is not None:
        panels.append((f"ground truth ({int(target.sum())} vox)", target.any(axis=axis), binary_style))
    panels.append((f"prediction ({int(pred.sum())} vox)", pred.any(axis=axis), binary_style))
    if target is not None:
        panels.append(("errors: FP red, FN cyan, TP grey", error_overlay(image_mip, target, pred, axis=axis), {}))

    a, b = image_mip.shape
    aspect = b / a  # displayed height / width
    cols = 2 if len(panels) == 4 else len(panels)  # 2 x 2 at the card's width: each panel 300 px wide
    rows = -(-len(panels) // cols)
    panel = CARD_WIDTH_IN / cols
    fig = Figure(figsize=(CARD_WIDTH_IN, rows * (panel * aspect + 0.3) + (0.35 if title else 0.0)), dpi=_DPI,
                 layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (label, array, style) in zip(axes, panels):
        _show(ax, array, **style)
        ax.set_title(label, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def mask_outline_figure(
    image: np.ndarray,
    brain_mask: np.ndarray,
    label: np.ndarray | None = None,
    *,
    axis: int = 2,
    title: str = "",
) -> Figure:
    """Check a skull strip: the brain mask's outline over a MIP and over three slices, with the vessel label.

    Parameters
    ----------
    image : (I, J, K) float ndarray
        Preprocessed (or raw) intensities.
    brain_mask : (I, J, K) bool or {0, 1} ndarray
        Mask to outline (yellow).
    label : (I, J, K) bool or {0, 1} ndarray or None, optional
        Vessel label, drawn in translucent red: label voxels outside the mask show up outside the outline.
    axis : {0, 1, 2}, keyword-only
        Projection and slicing axis.
    title : str, keyword-only
        Figure title.

    Returns
    -------
    Figure
        4 panels: the MIP with the outline of the mask's projection, then slices at 25, 50 and 75 % of the
        mask's extent along ``axis`` with the slice's mask outline.
    """
    image = np.asarray(image)
    check_ndim(image, 3, "image")
    check_range(axis, "axis", 0, 2)
    brain_mask = _binary(brain_mask, "brain_mask")
    check_same_shape(image, brain_mask, "image", "brain_mask")
    if label is not None:
        label = _binary(label, "label")
        check_same_shape(image, label, "image", "label")
    other = tuple(a for a in range(3) if a != axis)
    extent = np.flatnonzero(brain_mask.any(axis=other))
    if extent.size == 0:
        extent = np.arange(image.shape[axis])
    picks = [int(extent[int(round(f * (extent.size - 1)))]) for f in (0.25, 0.5, 0.75)]

    def plane(volume: np.ndarray, index: int) -> np.ndarray:
        return np.take(volume, index, axis=axis)

    panels = [("MIP", image.max(axis=axis), brain_mask.any(axis=axis),
               None if label is None else label.any(axis=axis))]
    for index in picks:
        panels.append((f"slice {index}", plane(image, index), plane(brain_mask, index),
                       None if label is None else plane(label, index)))
    a, b = panels[0][1].shape
    fig = Figure(figsize=(CARD_WIDTH_IN, 2 * (CARD_WIDTH_IN / 2 * b / a + 0.3) + (0.35 if title else 0.0)),
                 dpi=_DPI, layout="constrained")
    axes = fig.subplots(2, 2, squeeze=False).ravel()
    for ax, (name, background, mask2d, label2d) in zip(axes, panels):
        lo, hi = _display_range(background)
        _show(ax, background, cmap="gray", vmin=lo, vmax=hi)
        if mask2d.any() and not mask2d.all():
            ax.contour(mask2d.T.astype(np.float32), levels=[0.5], colors="yellow", linewidths=0.8)
        if label2d is not None and label2d.any():
            ax.imshow(np.ma.masked_where(~label2d.T, label2d.T), origin="lower", cmap=ListedColormap(["red"]),
                      alpha=0.6, interpolation="nearest")
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def _categorical_cmap(n: int) -> ListedColormap:
    base = matplotlib.colormaps["tab10" if n <= 10 else "tab20"].colors
    return ListedColormap([base[i % len(base)] for i in range(max(n, 1))])


def _stack(array: np.ndarray | None, name: str, n_images: int | None) -> np.ndarray | None:
    """(N, H, W) view of an optional stack; (N, 1, H, W) accepted; N must match ``images``."""
    if array is None:
        return None
    array = np.asarray(array)
    if array.ndim == 4 and array.shape[1] == 1:  # (N, 1, H, W) crops
        array = array[:, 0]
    check_ndim(array, 3, name)
    if n_images is not None and array.shape[0] != n_images:
        raise ValueError(f"{name} holds {array.shape[0]} crops (shape {array.shape}) but images holds {n_images}")
    return array


def slice_panel_figure(
    images: np.ndarray,
    labels: np.ndarray | None,
    cluster_maps: np.ndarray | None,
    predictions: np.ndarray | None,
    *,
    n: int = 6,
) -> Figure:
    """Grid of crops: one column per crop, rows image / label / cluster map / vessel prediction.

    Parameters
    ----------
    images : (N, H, W) or (N, 1, H, W) float ndarray
        Crops or slices.
    labels : (N, H, W) bool or {0, 1} ndarray or None
        Reference vessel masks; None drops the label row.
    cluster_maps : (N, h, w) int ndarray or None
        Cluster index per pixel, at any resolution (categorical colours, same colour = same cluster in every
        column); None drops the row (classical baselines have no clusters).
    predictions : (N, h, w) bool or float ndarray or None
        Vessel mask, or score in [0, 1]; None drops the row (data previews).
    n : int >= 1, keyword-only
        Crops shown at most (the first ``n``); 6 leaves each crop 95 px wide at the card's 600 px.

    Returns
    -------
    Figure
        ``rows x min(n, N)`` axes, one row for the images and one per stack given, 600 px wide.
    """
    check_range(n, "n", 1)
    images = _stack(images, "images", None)
    shape = images.shape
    labels = _stack(labels, "labels", shape[0])
    cluster_maps = _stack(cluster_maps, "cluster_maps", shape[0])
    predictions = _stack(predictions, "predictions", shape[0])
    if shape[0] == 0:
        raise ValueError("images is empty; expected at least one crop")
    cols = min(n, shape[0])

    rows: list[tuple[str, np.ndarray, dict]] = []
    lo, hi = _display_range(images[:cols])
    rows.append(("image", images[:cols], {"cmap": "gray", "vmin": lo, "vmax": hi}))
    if labels is not None:
        rows.append(("label", labels[:cols].astype(np.float32), {"cmap": "gray", "vmin": 0, "vmax": 1}))
    if cluster_maps is not None:
        maps = cluster_maps[:cols].astype(np.int64)
        k = int(maps.max()) + 1 if maps.size else 1
        rows.append(("clusters", maps, {"cmap": _categorical_cmap(k), "vmin": -0.5, "vmax": k - 0.5}))
    if predictions is not None:
        rows.append(("prediction", predictions[:cols].astype(np.float32), {"cmap": "magma", "vmin": 0, "vmax": 1}))

    side = (CARD_WIDTH_IN - 0.3) / cols  # one crop per column at the card's width
    fig = Figure(figsize=(CARD_WIDTH_IN, side * len(rows) + 0.1), dpi=_DPI, layout="constrained")
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for r, (label, stack, style) in enumerate(rows):
        for c in range(cols):
            _show(axes[r, c], stack[c], **style)
        axes[r, 0].set_ylabel(label, fontsize=9)
    return fig


def _metric(values: Mapping[str, float], key: str) -> tuple[float, float | None]:
    """Value of ``key`` (or ``key_mean``) and its ``key_std`` if present."""
    if key in values:
        mean = values[key]
    elif f"{key}_mean" in values:
        mean = values[f"{key}_mean"]
    else:
        raise KeyError(key)
    std = values.get(f"{key}_std")
    return float(mean), (None if std is None else float(std))


def comparison_bar_figure(
    table: Mapping[str, Mapping[str, float]], keys: Sequence[str] = ("dice", "cldice")
) -> Figure:
    """Horizontal bars comparing methods on a few metrics, 600 px wide (one method per row, a bar per metric).

    Parameters
    ----------
    table : mapping method -> mapping metric key -> float
        Per-method metrics: plain keys (``dice``), or the ``{key}_mean`` / ``{key}_std`` pairs of
        :func:`stego_core.evaluation.metrics.summarize`, drawn with error bars (a ``n_cases`` of 1 draws none: one
        volume has no spread). NaN (not measured) draws no bar and the label ``n/a``.
    keys : sequence of str
        Metrics to draw, one bar per method and key.

    Returns
    -------
    Figure
        One axes; methods on the y axis (in ``table`` order, top down), the score from 0 to 1 on x, bars
        labelled with their values.
    """
    if not table:
        raise ValueError("table is empty; expected at least one method")
    keys = tuple(keys)
    if not keys:
        raise ValueError("keys is empty; expected at least one metric key")
    methods = list(table)
    means = np.zeros((len(methods), len(keys)))
    stds = np.full((len(methods), len(keys)), np.nan)
    for i, method in enumerate(methods):
        for j, key in enumerate(keys):
            try:
                means[i, j], std = _metric(table[method], key)
            except KeyError:
                raise ValueError(f"table[{method!r}] has no metric {key!r} (nor {key}_mean); "
                                 f"it has {sorted(table[method])}") from None
            if std is not None and table[method].get("n_cases", 2) >= 2:
                stds[i, j] = std

    height = 0.8 / len(keys)
    fig = Figure(figsize=(CARD_WIDTH_IN, 0.32 * len(methods) * len(keys) + 1.0), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(methods))
    for j, key in enumerate(keys):
        err = None if np.isnan(stds[:, j]).all() else np.nan_to_num(stds[:, j])
        bars = ax.barh(y + (j - (len(keys) - 1) / 2) * height, np.nan_to_num(means[:, j]), height, xerr=err,
                       capsize=2, label=key)
        ax.bar_label(bars, labels=["n/a" if np.isnan(v) else f"{v:.3f}" for v in means[:, j]], fontsize=7,
                     padding=3)
    ax.set_yticks(y, methods, fontsize=9)
    ax.set_ylim(len(methods) - 0.5, -0.5)
    ax.set_xlim(0.0, 1.12)  # room for the value labels
    ax.set_xlabel("score (higher is better)", fontsize=9)
    ax.legend(fontsize=8, ncols=len(keys), loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    return fig


def extras_figure(image: np.ndarray, extras: Mapping[str, np.ndarray], mask: np.ndarray, *, axis: int = 2,
                  title: str = "") -> Figure:
    """One slice of a volume with a method's named extras beside its final mask (a self-training run: the image,
    the teacher's mask, the student's probability, the final mask), on the slice along ``axis`` where the first
    mask extra (else the final mask) holds most vessel.

    Parameters
    ----------
    image : (I, J, K) float ndarray
    extras : mapping of name to (I, J, K) ndarray
        Bool arrays are drawn as masks (grey), float arrays as probabilities (magma).
    mask : (I, J, K) bool ndarray
        The method's final mask.
    """
    check_ndim(image, 3, "image")
    for name, arr in (*extras.items(), ("mask", mask)):
        check_same_shape(image, arr, "image", name)
    other = tuple(a for a in range(3) if a != axis)
    guide = next((v for v in extras.values() if v.dtype == bool), mask)
    k = int(np.argmax(np.asarray(guide, bool).sum(axis=other)))
    take = [slice(None)] * 3
    take[axis] = k
    panels = [("image", image, "gray")]
    panels += [(name if arr.dtype == bool else f"{name} probability", arr, "gray" if arr.dtype == bool else "magma")
               for name, arr in extras.items()]
    panels.append(("final mask", mask, "gray"))
    fig = Figure(figsize=(CARD_WIDTH_IN, CARD_WIDTH_IN / len(panels) + 0.6), dpi=_DPI)
    for i, (name, arr, cmap) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        _show(ax, np.asarray(arr, np.float32)[tuple(take)], cmap=cmap, vmin=0.0, vmax=1.0)
        ax.set_title(f"{name} (slice {k})", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def _bounded(key: str) -> bool:
    """Whether a metric lies in [0, 1] (its axis then runs from 0 to 1)."""
    return key in ("dice", "cldice", "tprec", "tsens", "precision", "recall") or key.startswith("recall_")


def per_case_figure(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                    keys: Sequence[str] = ("dice", "cldice")) -> Figure:
    """Each method's value on every case: one dot per case (a colour per case, the same in every panel), the
    method's mean as a tick, and a box from 5 cases on; one panel per key, stacked, 600 px wide.

    Methods are categories: no line joins a case across them.

    Parameters
    ----------
    per_case : mapping method -> mapping case id -> mapping metric key -> float
        A case a method lacks (or a key its row lacks) is NaN: no dot, and out of the mean.
    keys : sequence of str
        Metrics to draw, one panel each (titled with it); scores in [0, 1] on a 0-1 axis, others (Betti-number
        errors) from 0.

    Returns
    -------
    Figure
        One panel per key; methods on the y axis (top down in ``per_case`` order), a legend of the cases.
    """
    if not per_case:
        raise ValueError("per_case is empty; expected at least one method")
    keys = tuple(keys)
    methods = list(per_case)
    cases = list(dict.fromkeys(c for rows in per_case.values() for c in rows))
    panel = 0.3 * len(methods) + 0.8
    fig = Figure(figsize=(CARD_WIDTH_IN, panel * len(keys) + 0.3), dpi=_DPI, layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(keys), 1)).ravel()
    colours = matplotlib.colormaps["tab10"]
    spread = np.linspace(-0.22, 0.22, len(cases)) if len(cases) > 1 else np.zeros(1)
    for ax, key in zip(axes, keys):
        values = np.array([[float(per_case[m].get(c, {}).get(key, np.nan)) for c in cases] for m in methods])
        for i in range(len(methods)):
            finite = values[i][np.isfinite(values[i])]
            if finite.size >= 5:
                ax.boxplot([finite], positions=[i], widths=0.6, vert=False, showfliers=False,
                           medianprops={"color": "grey"})
            if finite.size:
                ax.plot([finite.mean()], [i], marker="|", color="black", markersize=14, markeredgewidth=2)
        for j, case in enumerate(cases):
            ax.scatter(values[:, j], np.arange(len(methods)) + spread[j], s=16, color=colours(j % 10), zorder=3,
                       label=case if ax is axes[0] else None)
        ax.set_yticks(range(len(methods)), methods, fontsize=9)
        ax.set_ylim(len(methods) - 0.5, -0.5)
        top = np.nanmax(values) if np.isfinite(values).any() else 1.0
        ax.set_xlim(0.0, 1.0 if _bounded(key) else max(1.0, float(top) * 1.1))
        ax.set_xlabel(key, fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="x", alpha=0.3)
    if len(cases) <= 12:
        fig.legend(fontsize=7, loc="outside lower center", ncols=min(len(cases), 6), frameon=False,
                   title=f"{len(cases)} case{'s' if len(cases) != 1 else ''}; tick: mean", title_fontsize=7)
    return fig


def radius_recall_figure(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                         bins: Sequence[str] = RADIUS_BINS) -> Figure:
    """Recall per vessel-radius bin, thin to thick: one line per method (the mean over cases), with each
    case's value as a faint dot; 600 px wide. A bin that no case's label has (no vessel of that radius) is left
    out, not drawn empty.

    Parameters
    ----------
    per_case : mapping method -> mapping case id -> mapping metric key -> float
        Rows of the evaluations, holding ``recall_<bin>`` (:func:`stego_core.evaluation.metrics.radius_recall` via
        :func:`stego_core.evaluation.scoring.analysis_metrics`); a bin without label voxels in a case is absent from its
        row and left out of that bin's mean; a method without any ``recall_<bin>`` key draws no line.
    bins : sequence of str
        Bin names, in x order (default :data:`stego_core.evaluation.metrics.RADIUS_BINS`).

    Returns
    -------
    Figure
        One axes: x the bins some case has, y the recall in [0, 1]; ``ax.get_lines()`` holds one line per method
        drawn, labelled with the method, in the order of ``per_case``.
    """
    if not per_case:
        raise ValueError("per_case is empty; expected at least one method")
    bins = tuple(bins)
    if not bins:
        raise ValueError("bins is empty; expected at least one radius bin")
    present = tuple(b for b in bins if any(np.isfinite(float(r.get(f"recall_{b}", np.nan)))
                                           for rows in per_case.values() for r in rows.values()))
    bins = present or bins
    keys = [f"recall_{b}" for b in bins]
    fig = Figure(figsize=(CARD_WIDTH_IN, 3.6), dpi=_DPI, layout="constrained")
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10" if len(per_case) <= 10 else "tab20"]
    x = np.arange(len(bins), dtype=float)
    drawn = 0
    for i, (method, rows) in enumerate(per_case.items()):
        values = np.array([[float(r.get(k, np.nan)) for k in keys] for r in rows.values()]).reshape(-1, len(bins))
        if not np.isfinite(values).any():
            continue
        colour = colours(i % colours.N)
        jitter = (drawn - (len(per_case) - 1) / 2) * 0.02  # dots of different methods side by side
        for row in values:
            ax.scatter(x + jitter, row, s=10, color=colour, alpha=0.35, linewidths=0)
        with np.errstate(invalid="ignore"):
            counts = np.isfinite(values).sum(axis=0)
            means = np.where(counts > 0, np.nansum(values, axis=0) / np.maximum(counts, 1), np.nan)
        ax.plot(x, means, "o-", color=colour, linewidth=1.5, markersize=5, label=method)
        drawn += 1
    ax.set_xticks(x, list(bins))
    ax.set_xlim(-0.3, len(bins) - 0.7)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("vessel radius bin (label skeleton)", fontsize=9)
    ax.set_ylabel("recall", fontsize=9)
    ax.set_title("recall by vessel radius: mean over cases (line), cases (dots)", fontsize=9)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best", ncols=2 if drawn > 5 else 1)
    return fig
