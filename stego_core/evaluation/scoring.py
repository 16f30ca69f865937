"""Score one volume: a method's probabilities -> label-free post-processing -> binary mask -> metrics row.

:func:`evaluate_case` is the one place that turns probabilities into a scored prediction; the evaluation runs,
the ablation, the pipeline and the benchmarks all call it, so every table holds the same keys computed the same
way. The label (when the case has one) scores the mask and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from stego_core.data.cases import PreparedCase
from stego_core.engine.postprocess import PostprocessResult, apply_postprocessing
from stego_core.evaluation.metrics import (
    RADIUS_BINS,
    betti_errors,
    evaluate_segmentation,
    radius_recall,
    surface_distances,
)


def analysis_metrics(pred: np.ndarray, label: np.ndarray, spacing_mm: Sequence[float] | None) -> dict[str, float]:
    """The analysis keys beside the scores: Betti-number errors (TopCoW), recall per vessel radius bin, and
    HD95 / ASSD in mm when the voxel size in mm is known (omitted otherwise: no made-up millimetres)."""
    row: dict[str, float] = dict(betti_errors(pred, label))
    radius = radius_recall(pred, label, spacing=spacing_mm)
    # a bin without label voxels has no recall (NaN): left out of the row rather than logged as a gap
    row.update({f"recall_{b}": float(radius[f"recall_{b}"]) for b in RADIUS_BINS
                if np.isfinite(radius[f"recall_{b}"])})
    if spacing_mm is not None:
        row.update(surface_distances(pred, label, spacing_mm))
    return row


#: Keys :func:`analysis_metrics` adds (HD95 / ASSD only with a known voxel size).
ANALYSIS_KEYS = ("betti0_error", "betti1_error", *(f"recall_{b}" for b in RADIUS_BINS), "hd95_mm", "assd_mm")


def evaluate_case(prob: np.ndarray, case: PreparedCase, steps: Sequence = (), *, threshold: float = 0.5,
                  slice_axis: int = 2, crf_settings: Any = None, analysis: bool = False
                  ) -> tuple[PostprocessResult, dict[str, Any]]:
    """Post-process ``prob`` with ``steps``, binarise it at ``threshold`` inside the brain mask, and score it.

    Parameters
    ----------
    prob : (I, J, K) float32 ndarray in [0, 1]
        A method's vessel probabilities of ``case``.
    case : PreparedCase
        The preprocessed volume (its ``label``, when present, only scores).
    steps : sequence of PostprocessStep
        Label-free steps, probability steps first (:mod:`stego_core.engine.postprocess`).
    threshold : float
        The method's a-priori cut.
    slice_axis : int
        Axis of the slices the dense CRF refines.
    crf_settings : CRFSettings, optional
    analysis : bool
        Also the analysis keys (:func:`analysis_metrics`: topology, recall per radius, surface distances).

    Returns
    -------
    post : PostprocessResult
        ``post.prob`` and ``post.mask`` (bool, (I, J, K)).
    row : dict
        ``case_id``, ``predicted_fraction``, the components before / after post-processing (when there are
        steps) and, with a label, every key of :func:`~stego_core.evaluation.metrics.evaluate_segmentation` plus
        ``label_retention``.
    """
    post = apply_postprocessing(prob, case.image, steps, case.spacing, threshold=float(threshold),
                                brain_mask=case.brain_mask, slice_axis=slice_axis, crf_settings=crf_settings)
    row: dict[str, Any] = {"case_id": case.case_id, "predicted_fraction": float(post.mask.mean())}
    if steps:  # what the post-processing did to the topology (26-connected components)
        row["n_components_before_postprocess"] = float(post.n_components_before)
        row["n_components_after_postprocess"] = float(post.n_components_after)
    if case.label is not None:
        row.update(evaluate_segmentation(post.mask, case.label))
        row["label_retention"] = case.label_retention
        if analysis:
            row.update(analysis_metrics(post.mask, case.label, case.spacing_mm))
    return post, row


def score_result(result: Any, case: PreparedCase, steps: Sequence = (), *, threshold: float = 0.5,
                 slice_axis: int = 2, crf_settings: Any = None, analysis: bool = False
                 ) -> tuple[PostprocessResult, dict[str, Any]]:
    """:func:`evaluate_case` of a method's :class:`~stego_core.methods.registry.Result`, plus its mask extras
    (a self-training teacher's mask...) scored beside it under their name: ``<extra>_dice``, ``<extra>_cldice``...
    and ``<extra>_predicted_fraction``. The label only scores."""
    post, row = evaluate_case(result.prob, case, steps, threshold=threshold, slice_axis=slice_axis,
                              crf_settings=crf_settings, analysis=analysis)
    for name, mask in result.masks().items():
        row[f"{name}_predicted_fraction"] = float(mask.mean())
        if case.label is not None:
            row.update({f"{name}_{k}": float(v) for k, v in evaluate_segmentation(mask, case.label).items()})
    return post, row


def summarize_rows(rows: Sequence[dict[str, Any]], extras: Sequence[str] = ()) -> dict[str, float]:
    """``<key>_mean`` / ``<key>_std`` of the metric keys over the scored rows, and the same of each extra's keys
    as ``<extra>_<key>_mean``... (empty when no row has a label)."""
    from stego_core.evaluation.metrics import METRIC_KEYS, summarize

    scored = [r for r in rows if "dice" in r]
    if not scored:
        return {}
    summary = summarize([{k: v for k, v in r.items() if k != "case_id"} for r in scored])
    for name in extras:
        part = [{k: r[f"{name}_{k}"] for k in METRIC_KEYS} for r in scored if f"{name}_dice" in r]
        if part:
            summary.update({f"{name}_{k}": v for k, v in summarize(part).items()})
    return summary
