"""The ``selftrain`` step: a student network trained on a label-free teacher's pseudo-labels, as one MLflow run.

:func:`run_selftrain` reads top to bottom: the method from the registry (``selftrain``: teacher + student,
:mod:`stego_core.methods.selftrain`) -> inductive only: one student fitted on the training volumes -> every evaluated
volume through the shared evaluation (:func:`~stego_core.steps.evaluation.evaluate_cases`: predictions named
``<case>_selftrain_pred.nii.gz``, metrics, MIP figures) with the teacher scored beside it (``teacher_dice``...) ->
curves (``selftrain/loss``, ``selftrain/agreement``: the label-free stopping criterion), a stepped image per
volume (teacher | student probability | final mask), the students' weights as checkpoints and the last student
logged as an MLflow model. The label only scores.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np

from stego_core.platform import tracking
from stego_core.config import SelfTrainConfig
from stego_core.data.cases import PreparedCase, ensure_cases, preprocess_case, split_cases
from stego_core.data.io import save_volume
from stego_core.methods.registry import build_method
from stego_core.evaluation.metrics import METRIC_KEYS, evaluate_segmentation, summarize, write_results
from stego_core.steps.evaluation import EvaluationResult, evaluate_cases, select_cases

log = logging.getLogger(__name__)


class _Curves:
    """Logs the students' curves into the active run: every ``every`` steps and at each evaluation step."""

    def __init__(self, every: int = 25) -> None:
        self.every = every
        self.offset: dict[tuple[str, int, int], int] = {}
        self.total = 0

    def __call__(self, case_id: str, rnd: int, axis: int, step: int, info: dict) -> None:
        key = (case_id, rnd, axis)
        if key not in self.offset:
            self.offset[key] = self.total
        global_step = self.offset[key] + step
        self.total = max(self.total, global_step)
        metrics = {}
        if step % self.every == 0 or "agreement" in info:
            metrics["selftrain/loss"] = info["loss"]
        if "agreement" in info:
            metrics["selftrain/agreement"] = info["agreement"]
        if metrics:
            tracking.log_metrics(metrics, step=global_step)


def _save_students(method: Any, folder: Path, stem: str) -> None:
    """Each view's student weights as ``<stem>_axis<k>.pt``."""
    import torch

    for model, view in zip(method.models, method.views):
        torch.save(model.state_dict(), folder / f"{stem}_axis{view}.pt")


def run_selftrain(cfg: SelfTrainConfig, *, nested: bool = False, tags: dict[str, str] | None = None
                  ) -> EvaluationResult:
    """Self-train and evaluate on the ``split`` volumes of ``cfg`` as one MLflow run (see the module)."""
    from stego_core.report.visualize import teacher_student_figure

    teacher = cfg.teacher.resolved(cfg.data.skull_strip)  # a preset's recipe read in; fails before any work
    method = build_method("selftrain", {"teacher": teacher, "student": cfg.student, "mode": cfg.mode,
                                        "skull_strip": cfg.data.skull_strip, "on_step": _Curves(),
                                        "model_uri": cfg.model_uri}, cfg.engine)
    description = (f"Self-training ({cfg.mode}): a {cfg.student.dims} U-Net learns the confident voxels of "
                   f"teacher {teacher.label}; dice_mean vs teacher_dice_mean, curves selftrain/*, stepped "
                   "image selftrain/slices, predictions/<case>_selftrain_pred.nii.gz.")
    with tracking.start_run(cfg.experiment, run_name=f"selftrain-{teacher.label}", output_root=cfg.output,
                            nested=nested, description=description,
                            tags={"method": "selftrain", "step": "selftrain", "kind": "selftrain",
                                  "teacher": teacher.label, "selftrain_mode": cfg.mode, **(tags or {})}) as run:
        tracking.log_plan(cfg, run.output_dir, params={f"teacher.resolved.{k}": v for k, v in
                                                          teacher.settings.items()})
        cases = select_cases(cfg)
        tracking.log_dataset(cases, name=Path(cfg.data.root).name, context="evaluation", source=cfg.data.root)
        if cfg.model_uri:
            tracking.set_tags({"students_from_run": cfg.model_uri})
        elif cfg.mode == "inductive":
            train = split_cases(ensure_cases(cfg.data), cfg.test_fraction, seed=cfg.split_seed,
                                test_ids=cfg.test_cases)[0]
            if cfg.split == "all" or not train:
                raise ValueError("selftrain mode=inductive needs training volumes apart from the evaluated ones: "
                                 "use split=test (test_cases=... or test_fraction)")
            tracking.log_dataset(train, name=Path(cfg.data.root).name + "-train", context="training",
                                 source=cfg.data.root)
            method.fit([preprocess_case(c, cfg.data) for c in train])
        checkpoints = run.output_dir / "checkpoints"
        checkpoints.mkdir(parents=True, exist_ok=True)
        shown = 0

        def after_case(prepared: PreparedCase, post: Any, row: dict) -> None:
            nonlocal shown
            t_mask = method.teacher_masks.pop(prepared.case_id)
            s_prob = method.student_probs.pop(prepared.case_id)
            row["teacher_predicted_fraction"] = float(t_mask.mean())
            name = f"{prepared.case_id}_teacher-{teacher.label}_pred.nii.gz"
            path = save_volume(run.output_dir / "predictions" / name, t_mask.astype(np.uint8), prepared.affine,
                               prepared.header)
            tracking.log_artifact(path, "predictions")
            if prepared.label is not None:
                row.update({f"teacher_{k}": float(v) for k, v in
                            evaluate_segmentation(t_mask, prepared.label).items()})
            tracking.log_image(teacher_student_figure(prepared.image, t_mask, s_prob, post.mask, axis=cfg.engine.axis,
                                                      title=f"{prepared.case_id}: teacher {teacher.label} -> "
                                                            "student"), "selftrain/slices", step=shown)
            shown += 1
            if cfg.mode == "transductive" and not cfg.model_uri:
                _save_students(method, checkpoints, f"student_{prepared.case_id}")

        rows = evaluate_cases(method, cases, cfg, run.output_dir, after_case=after_case)
        if cfg.mode == "inductive":
            _save_students(method, checkpoints, "student")
        tracking.log_artifact(checkpoints, "checkpoints")
        summary: dict[str, float] = {}
        scored = [r for r in rows if "dice" in r]
        if scored:
            summary = summarize([{k: v for k, v in r.items() if k != "case_id"} for r in scored])
            teacher_rows = [{k: r[f"teacher_{k}"] for k in METRIC_KEYS} for r in scored]
            summary.update({f"teacher_{k}": v for k, v in summarize(teacher_rows).items()})
            tracking.log_metrics(summary)
            txt, csv = write_results(scored, run.output_dir, method="selftrain")
            tracking.log_artifact(txt)
            tracking.log_artifact(csv)
        if cfg.log_model and method.models and not cfg.model_uri:  # the (last) students, one model per view
            channels = cfg.student.in_channels
            example = np.zeros((1, channels, cfg.student.crop, cfg.student.crop), dtype=np.float32)
            uris = [tracking.log_pytorch_model(model.cpu(), name="model" if i == 0 else f"model_axis{view}",
                                               input_example=example, metadata={
                                                   "method": "selftrain", "teacher": teacher.label, "axis": view,
                                                   "mode": cfg.mode, "student": dataclasses.asdict(cfg.student)})
                    for i, (model, view) in enumerate(zip(method.models, method.views))]
            tracking.set_tags({"model_uri": uris[0], "model_uris": ",".join(uris)})
        return EvaluationResult(run_id=run.run_id, rows=rows, summary=summary, output_dir=run.output_dir)
