"""Reconstruct and evaluate any segmenter on held-out volumes, tracked in MLflow with one metric vocabulary.

Each run logs, whatever the method: its params, a ``method`` tag, the data manifest as a dataset input,
per-volume metrics ``<key>/<case_id>``, their ``<key>_mean`` and ``<key>_std``, ``evaluation_results.txt`` and
``.csv``, the predicted NIfTI volumes (source affine and header kept), a MIP / error figure per volume, and
(``viewer: true``) ``viewer/<case>.html``: a self-contained page to scroll through the volume's slices with the
prediction and label overlaid (:mod:`stego_core.report.viewer`).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stego_core.runtime import distributed

from stego_core.platform import tracking
from stego_core.config import BaselineConfig, EvaluateConfig, ReconstructConfig
from stego_core.data.cases import PreparedCase, ensure_cases, preprocess_case, split_cases
from stego_core.data.io import Case, save_volume
from stego_core.methods.registry import METHODS, Method, build_method, is_run_id, resolve_model_uri
from stego_core.evaluation.metrics import summarize, write_results
from stego_core.engine.postprocess import steps_tag
from stego_core.evaluation.scoring import ANALYSIS_KEYS, evaluate_case

log = logging.getLogger(__name__)


@dataclass
class EvaluationResult:
    run_id: str
    rows: list[dict[str, Any]]
    summary: dict[str, float]
    output_dir: Path


def select_cases(cfg: EvaluateConfig) -> list[Case]:
    """The cases an evaluation covers (see :class:`EvaluateConfig`)."""
    cases = ensure_cases(cfg.data)
    if cfg.split == "all":
        return cases
    return split_cases(cases, cfg.test_fraction, seed=cfg.split_seed, test_ids=cfg.test_cases)[1]


def evaluate_cases(method: Method, cases: list[Case], cfg: EvaluateConfig, out_dir: Path, *,
                   log_to_mlflow: bool = True, after_case: Callable[[PreparedCase, Any, dict], None] | None = None,
                   name: str | None = None) -> list[dict[str, Any]]:
    """Reconstruct every case with ``method``, write predictions under ``out_dir``, and return one metrics row
    per case (:func:`~stego_core.evaluation.scoring.evaluate_case`). ``after_case(prepared, post, row)`` may add keys to
    the row (e.g. a teacher's scores) and log more pictures before the row is logged. Predictions are named
    ``<case>_<name>_pred.nii.gz``, ``name`` the run's method tag (default ``method.name``).

    Launched as several processes (:mod:`stego_core.runtime.distributed`), each rank takes every ``world size``-th case
    and writes its predictions; rank 0 logs every case's scores, tags, predictions and figure into the one run,
    and every rank returns all rows in case order."""
    name = name or method.name
    from stego_core.report.visualize import mip_figure

    steps = cfg.postprocess_steps()
    rows = []
    mine = distributed.shard(list(enumerate(cases)))
    for index, case in tqdm(mine, desc=f"evaluate {method.name}", unit="vol",
                            disable=None if cfg.progress else True):
        prepared = preprocess_case(case, cfg.data)
        out = _CaseOutputs()  # what this case logs (rank 0 logs it now; another rank's goes to rank 0 at the end)
        if log_to_mlflow and prepared.mask_warning:
            out.tag({"skull_strip_implausible": "true",
                     f"skull_strip_warning/{case.case_id}": prepared.mask_warning[:4000]})
        if prepared.label is not None and not np.any(prepared.label):
            log.warning("case %s: the label %s is all zero; its scores (Dice 0 or 1 by convention) are "
                        "meaningless", case.case_id, case.label)
            if log_to_mlflow:
                out.tag({"label_empty": "true", f"label_empty/{case.case_id}": "true"})
        prob = method.predict(prepared, progress=cfg.progress)
        post, row = evaluate_case(prob, prepared, steps, threshold=method.threshold, slice_axis=cfg.engine.axis,
                                  crf_settings=cfg.crf_settings, analysis=cfg.analysis)
        if after_case is not None:
            after_case(prepared, post, row)
        pred_path = save_volume(out_dir / "predictions" / f"{case.case_id}_{name}_pred.nii.gz",
                                post.mask.astype(np.uint8), prepared.affine, prepared.header)
        out.artifacts.append((str(pred_path), "predictions"))
        if cfg.save_probabilities:
            prob_path = save_volume(out_dir / "predictions" / f"{case.case_id}_{name}_prob.nii.gz", post.prob,
                                    prepared.affine, prepared.header)
            out.artifacts.append((str(prob_path), "predictions"))
        if log_to_mlflow:
            out.metrics = {f"{k}/{case.case_id}": v for k, v in row.items() if k != "case_id"}
            fig = mip_figure(prepared.image, prepared.label, post.mask, axis=cfg.engine.axis,
                             title=f"{method.name} on {case.case_id}")
            if distributed.is_main():
                tracking.log_figure(fig, f"figures/{case.case_id}_mip.png")
            else:  # drawn here, logged by rank 0 from the file
                out.artifacts.append((_save_figure(fig, out_dir / "figures" / f"{case.case_id}_mip.png"), "figures"))
            if cfg.viewer:
                out.artifacts.append((str(write_viewer(prepared, post.mask, name, out_dir)), "viewer"))
            if distributed.is_main():
                out.log()
        rows.append((index, row, out))
    gathered = sorted((item for part in distributed.gather_objects(rows) for item in part), key=lambda t: t[0])
    if log_to_mlflow and distributed.is_main() and distributed.world_size() > 1:
        for index, _, out in gathered:
            if index % distributed.world_size() != 0:  # the other ranks' cases
                out.log()
    return [row for _, row, _ in gathered]


@dataclass
class _CaseOutputs:
    """What one evaluated case logs into the run: tags, metrics and ``(file, artifact folder)`` pairs."""

    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def tag(self, tags: dict[str, str]) -> None:
        """Set ``tags`` now (rank 0; before the case's prediction, which may fail) and keep them for :meth:`log`."""
        tracking.set_tags(tags)
        self.tags.update(tags)

    def log(self) -> None:
        if self.tags:
            tracking.set_tags(self.tags)
        for path, folder in self.artifacts:
            tracking.log_artifact(path, folder)
        if self.metrics:
            tracking.log_metrics(self.metrics)


def _save_figure(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def write_viewer(prepared: PreparedCase, mask: np.ndarray, name: str, out_dir: Path) -> Path:
    """Write ``viewer/<case>.html`` under ``out_dir``: the case's slices with ``mask`` against its label
    (:func:`~stego_core.report.viewer.viewer_html`, one self-contained page that MLflow's artifact pane shows)."""
    from stego_core.report.viewer import viewer_html

    page = viewer_html(prepared.image, {name: mask}, prepared.label, spacing_mm=prepared.spacing,
                       title=f"{name} on {prepared.case_id}")
    path = out_dir / "viewer" / f"{prepared.case_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def run_evaluation(method_impl: Method, cfg: EvaluateConfig, *, method: str, run_name: str | None = None,
                   params: dict[str, Any] | None = None, tags: dict[str, str] | None = None,
                   config: Any = None, nested: bool = False) -> EvaluationResult:
    """One MLflow run that reconstructs and scores ``method_impl`` on the cases of ``cfg``.

    ``config`` (default ``cfg``) is the entry point's resolved config, saved as ``plan.yaml`` and flattened into
    params; ``params`` adds method settings; ``tags`` adds e.g. the training run a model came from.
    """
    config = config if config is not None else cfg
    run_name = run_name or method
    suffix = steps_tag(cfg.postprocess_steps())  # e.g. "+crf", "+smooth+largest"
    method, run_name = f"{method}{suffix}", f"{run_name}{suffix}"
    description = (f"Evaluation of {method} on the {cfg.split} volumes of {Path(cfg.data.root).name}: "
                   f"dice_mean / cldice_mean, per volume <key>/<case>, MIP and error overlays in figures/"
                   + (", a slice viewer per volume in viewer/ (open <case>.html)." if cfg.viewer else "."))
    with tracking.start_run(cfg.experiment, run_name=run_name, output_root=cfg.output, nested=nested,
                            description=description,
                            tags={"method": method, "step": "evaluate", **(tags or {})}) as run:
        tracking.log_plan(config, run.output_dir, params=params)
        with distributed.main_first():  # rank 0 writes generated phantoms; the others read them
            cases = select_cases(cfg)
        tracking.log_dataset(cases, name=Path(cfg.data.root).name, context="evaluation", source=cfg.data.root)
        rows = evaluate_cases(method_impl, cases, cfg, run.output_dir, name=method)
        summary: dict[str, float] = {}
        scored = [r for r in rows if "dice" in r]
        if scored:
            summary = summarize([{k: v for k, v in r.items() if k != "case_id"} for r in scored])
            tracking.log_metrics(summary)
            if distributed.is_main():
                extra = [k for k in ANALYSIS_KEYS if all(k in r for r in scored)]  # a bin may be absent
                txt, csv = write_results(scored, run.output_dir, method=method, extra_keys=extra)
                tracking.log_artifact(txt)
                tracking.log_artifact(csv)
        return EvaluationResult(run_id=run.run_id, rows=rows, summary=summary, output_dir=run.output_dir)


def run_baseline(cfg: BaselineConfig, *, nested: bool = False, tags: dict[str, str] | None = None
                 ) -> EvaluationResult:
    """Evaluate the registered method ``cfg.method`` (no labels used) as an MLflow run tagged with its name."""
    method = build_method(cfg.method, cfg.settings, cfg.engine)
    params = {f"resolved.{k}": v for k, v in method.settings().items()}
    kind = METHODS[cfg.method].kind
    return run_evaluation(method, cfg, method=cfg.method, run_name=f"baseline-{cfg.method}", nested=nested,
                          params=params, tags={"kind": "baseline" if kind == "classical" else kind, **(tags or {})})


def _selftrain_run(model_uri: str) -> str | None:
    """The run id when ``model_uri`` is a bare id of a ``selftrain`` run (tag ``method``), else None."""
    if not is_run_id(model_uri):
        return None
    try:
        tags = tracking.client().get_run(model_uri).data.tags
    except Exception:
        return None
    return model_uri if tags.get("method") == "selftrain" else None


def run_reconstruct(cfg: ReconstructConfig, *, nested: bool = False) -> EvaluationResult:
    """Evaluate a trained model with the same engine and metric keys as the baselines, linked to its training run.

    ``model_uri`` may also name a ``selftrain`` run: its logged students and its plan (teacher, combination)
    are applied to this config's volumes (:func:`~stego_core.steps.selftrain.run_selftrain` with
    ``model_uri``), so a self-trained segmenter is reused like STEGO."""
    student_run = _selftrain_run(cfg.model_uri)
    if student_run is not None:
        from stego_core.config import SelfTrainConfig, derive, load_config
        from stego_core.steps.selftrain import run_selftrain

        plan = tracking.download_artifacts(f"runs:/{student_run}/{tracking.PLAN_ARTIFACT}",
                                           Path(cfg.output) / "plans" / student_run)
        trained = load_config(SelfTrainConfig, plan)
        own = {f.name: getattr(trained, f.name) for f in dataclasses.fields(trained)
               if f.name in ("teacher", "student", "mode")}
        return run_selftrain(derive(SelfTrainConfig, cfg, **own, model_uri=student_run), nested=nested,
                             tags={"training_run_id": student_run})
    method = build_method("stego", {"model_uri": cfg.model_uri, "device": cfg.device, "amp": cfg.amp,
                                    "compile": cfg.compile}, cfg.engine)
    model = method.segmenter.model
    cfg = dataclasses.replace(cfg, engine=method.engine)  # the model's crop size when engine.patch_size is null
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
    return run_evaluation(method, cfg, method="stego", run_name="reconstruct-stego", tags=tags, nested=nested)
