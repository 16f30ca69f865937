"""Reconstruct and evaluate any segmenter on held-out volumes, tracked in MLflow with one metric vocabulary.

Each run logs, whatever the method: its params, a ``method`` tag, the data manifest as a dataset input,
per-volume metrics ``<key>/<case_id>``, their ``<key>_mean`` and ``<key>_std``, ``evaluation_results.txt`` and
``.csv``, the predicted NIfTI volumes (source affine and header kept), and a MIP / error figure per volume.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stego_core import tracking
from stego_core.config import BaselineConfig, EvaluateConfig, ReconstructConfig, flatten, save_config
from stego_core.data import ensure_cases, preprocess_case, split_cases
from stego_core.io import Case, save_volume
from stego_core.metrics import evaluate_segmentation, summarize, write_results
from stego_core.postprocess import apply_postprocessing, steps_tag
from stego_core.reconstruction import predict_volume
from stego_core.segmenter import Segmenter

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    run_id: str
    rows: list[dict[str, Any]]
    summary: dict[str, float]
    output_dir: Path


def _spacing(prepared: Any) -> tuple[float, float, float] | None:
    """The voxel size in mm from the case's header, or None when the header has none."""
    if prepared.header is None:
        return None
    zooms = tuple(float(z) for z in prepared.header.get_zooms()[:3])
    return zooms if len(zooms) == 3 and all(z > 0 for z in zooms) else None


def select_cases(cfg: EvaluateConfig) -> list[Case]:
    """The cases an evaluation covers (see :class:`EvaluateConfig`)."""
    cases = ensure_cases(cfg.data)
    if cfg.split == "all":
        return cases
    return split_cases(cases, cfg.test_fraction, seed=cfg.split_seed, test_ids=cfg.test_cases)[1]


def evaluate_cases(segmenter: Segmenter, cases: list[Case], cfg: EvaluateConfig, out_dir: Path, *,
                   log_to_mlflow: bool = True) -> list[dict[str, Any]]:
    """Reconstruct every case, write predictions under ``out_dir``, and return one metrics row per case."""
    from stego_core.visualize import mip_figure

    steps = cfg.postprocess_steps()
    rows = []
    for case in tqdm(cases, desc=f"evaluate {segmenter.name}", unit="vol", disable=None if cfg.progress else True):
        prepared = preprocess_case(case, cfg.data)
        if log_to_mlflow and prepared.mask_warning:
            tracking.set_tags({"skull_strip_implausible": "true",
                               f"skull_strip_warning/{case.case_id}": prepared.mask_warning[:4000]})
        if prepared.label is not None and not np.any(prepared.label):
            log.warning("case %s: the label %s is all zero; its scores (Dice 0 or 1 by convention) are "
                        "meaningless", case.case_id, case.label)
            if log_to_mlflow:
                tracking.set_tags({"label_empty": "true", f"label_empty/{case.case_id}": "true"})
        spacing = _spacing(prepared)
        prob = predict_volume(segmenter, prepared.image, prepared.brain_mask, cfg.engine, progress=cfg.progress,
                              spacing=spacing)
        post = apply_postprocessing(prob, prepared.image, steps, spacing, threshold=float(segmenter.threshold),
                                    brain_mask=prepared.brain_mask, slice_axis=cfg.engine.axis,
                                    crf_settings=cfg.crf_settings)
        prob, pred = post.prob, post.mask
        pred_path = save_volume(out_dir / "predictions" / f"{case.case_id}_pred.nii.gz", pred.astype(np.uint8),
                                prepared.affine, prepared.header)
        if log_to_mlflow:
            tracking.log_artifact(pred_path, "predictions")
        if cfg.save_probabilities:
            prob_path = save_volume(out_dir / "predictions" / f"{case.case_id}_prob.nii.gz", prob,
                                    prepared.affine, prepared.header)
            if log_to_mlflow:
                tracking.log_artifact(prob_path, "predictions")
        row: dict[str, Any] = {"case_id": case.case_id, "predicted_fraction": float(pred.mean())}
        if steps:  # what the post-processing did to the topology (26-connected components)
            row["n_components_before_postprocess"] = float(post.n_components_before)
            row["n_components_after_postprocess"] = float(post.n_components_after)
        if prepared.label is not None:
            row.update(evaluate_segmentation(pred, prepared.label))
            row["label_retention"] = prepared.label_retention
        if log_to_mlflow:
            tracking.log_metrics({f"{k}/{case.case_id}": v for k, v in row.items() if k != "case_id"})
            fig = mip_figure(prepared.image, prepared.label, pred, axis=cfg.engine.axis,
                             title=f"{segmenter.name} on {case.case_id}")
            tracking.log_figure(fig, f"figures/{case.case_id}_mip.png")
        rows.append(row)
    return rows


def run_evaluation(segmenter: Segmenter, cfg: EvaluateConfig, *, method: str, run_name: str | None = None,
                   params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                   config: Any = None, nested: bool = False) -> EvaluationResult:
    """One MLflow run that reconstructs and scores ``segmenter`` on the cases of ``cfg``.

    ``config`` (default ``cfg``) is the entry point's resolved config, saved as ``config.yaml`` and flattened into
    params; ``params`` adds method settings; ``tags`` adds e.g. the training run a model came from.
    """
    config = config if config is not None else cfg
    run_name = run_name or method
    suffix = steps_tag(cfg.postprocess_steps())  # e.g. "+crf", "+smooth+largest"
    method, run_name = f"{method}{suffix}", f"{run_name}{suffix}"
    description = (f"Evaluation of {method} on the {cfg.split} volumes of {Path(cfg.data.root).name}: "
                   f"dice_mean / cldice_mean, per volume <key>/<case>, MIP and error overlays in figures/.")
    with tracking.start_run(cfg.experiment, run_name=run_name, output_root=cfg.output, nested=nested,
                            description=description,
                            tags={"method": method, "step": "evaluate", **(tags or {})}) as run:
        tracking.log_params({**flatten(config), **(params or {})})
        cases = select_cases(cfg)
        tracking.log_dataset(cases, name=Path(cfg.data.root).name, context="evaluation", source=cfg.data.root)
        save_config(config, run.output_dir / "config.yaml")
        tracking.log_artifact(run.output_dir / "config.yaml")
        rows = evaluate_cases(segmenter, cases, cfg, run.output_dir)
        summary: dict[str, float] = {}
        scored = [r for r in rows if "dice" in r]
        if scored:
            summary = summarize([{k: v for k, v in r.items() if k != "case_id"} for r in scored])
            tracking.log_metrics(summary)
            txt, csv = write_results(scored, run.output_dir, method=method)
            tracking.log_artifact(txt)
            tracking.log_artifact(csv)
        return EvaluationResult(run_id=run.run_id, rows=rows, summary=summary, output_dir=run.output_dir)


def run_baseline(cfg: BaselineConfig, *, nested: bool = False, tags: dict[str, str] | None = None
                 ) -> EvaluationResult:
    """Evaluate the classical method ``cfg.method`` (no labels used) as an MLflow run tagged with its name."""
    from stego_core.baselines import SEGMENTERS, build_segmenter

    settings = dict(cfg.settings)
    if cfg.method in SEGMENTERS and "slice_axis" in {f.name for f in dataclasses.fields(SEGMENTERS[cfg.method])}:
        if cfg.engine.axes is not None:  # tri-planar: thresholds fitted on slices along the first axis
            settings.setdefault("slice_axis", cfg.engine.axes[0])
        elif settings.setdefault("slice_axis", cfg.engine.axis) != cfg.engine.axis:
            raise ValueError(f"settings.slice_axis={settings['slice_axis']} differs from engine.axis="
                             f"{cfg.engine.axis}; the filter must run on the slices the engine feeds it")
    segmenter = build_segmenter(cfg.method, **settings)
    params = {f"resolved.{k}": v for k, v in segmenter.settings().items()}
    return run_evaluation(segmenter, cfg, method=cfg.method, run_name=f"baseline-{cfg.method}", nested=nested,
                          params=params, tags={"kind": "baseline", **(tags or {})})


def resolve_model_uri(model_uri: str) -> str:
    """Accept a bare training run id as ``runs:/<id>/model``; other URIs (``runs:/``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``) and local model folders pass through.

    >>> resolve_model_uri("0123456789abcdef0123456789abcdef")
    'runs:/0123456789abcdef0123456789abcdef/model'
    """
    import re

    return f"runs:/{model_uri}/model" if re.fullmatch(r"[0-9a-f]{32}", model_uri) else model_uri


def load_segmenter(model_uri: str, *, device: str = "auto", amp: bool = False, compile: bool = False) -> Any:
    """Load a logged STEGO model as an engine segmenter (:class:`~stego_core.inference.TorchSegmenter`)."""
    import torch

    from stego_core.inference import TorchSegmenter

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_uri = resolve_model_uri(model_uri)
    try:
        model = tracking.load_pytorch_model(model_uri, map_location=device)
    except Exception as exc:
        raise ValueError(f"cannot load model_uri={model_uri!r}: {exc}") from exc
    return TorchSegmenter(model, device=device, amp=amp, compile=compile)


def run_reconstruct(cfg: ReconstructConfig, *, nested: bool = False) -> EvaluationResult:
    """Evaluate a trained model with the same engine and metric keys as the baselines, linked to its training run."""
    segmenter = load_segmenter(cfg.model_uri, device=cfg.device, amp=cfg.amp, compile=cfg.compile)
    model = segmenter.model
    if cfg.engine.patch_size is None:
        cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, patch_size=model.patch_size))
    expected = {"skull_strip": cfg.data.skull_strip, "standardize": cfg.data.standardize, "axis": cfg.engine.axis}
    trained = getattr(model, "preprocessing", {}) or {}
    mismatch = {k: (trained[k], v) for k, v in expected.items() if k in trained and trained[k] != v}
    if mismatch:
        raise ValueError("the model was trained with other preprocessing than this evaluation asks for "
                         + ", ".join(f"{k}: trained {a!r}, asked {b!r}" for k, (a, b) in mismatch.items())
                         + "; set data.skull_strip / data.standardize / engine.axis to the training run's values")
    model_uri = resolve_model_uri(cfg.model_uri)
    tags = {"model_uri": model_uri, "kind": "stego", "cluster_mapping_rule": model.mapping_rule}
    train_run = tracking.run_of_model(model_uri)
    if train_run:
        tags["training_run_id"] = train_run
    return run_evaluation(segmenter, cfg, method="stego", run_name="reconstruct-stego", tags=tags, nested=nested)
