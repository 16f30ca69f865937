"""The whole pipeline on one config (``make demo`` / ``mlflow run . -e main``).

prepare -> every classical baseline -> STEGO training -> STEGO reconstruction, all on the same volumes and
split. Each step is its own MLflow run, nested under one ``pipeline`` run that holds the comparison table and
bar chart, the per-case Dice / clDice plot, the recall by vessel radius, and per held-out volume one slice viewer
(``viewer/<case>.html``) that switches between the methods' predictions.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from stego_core.platform import tracking
from stego_core.config import (BaselineConfig, DataSettings, EngineConfig, MainConfig, PrepareConfig,
                               ReconstructConfig, RunSettings, SelfTrainConfig, SelfTrainPlan, TrainConfig, derive)
from stego_core.evaluation.metrics import RADIUS_BINS, SCORE_KEYS
from stego_core.steps.comparison import log_comparison
from stego_core.steps.evaluation import run_baseline, run_reconstruct
from stego_core.steps.pretrain import run_pretrain
from stego_core.steps.selftrain import run_selftrain
from stego_core.steps.training import run_train

log = logging.getLogger(__name__)


def crf_available() -> bool:
    """Whether the optional dense-CRF package is installed (``pip install 'stego-vessels[crf]'``)."""
    import importlib.util

    if importlib.util.find_spec("pydensecrf") is None:
        log.warning("pydensecrf2 is not installed: skipping the stego+crf evaluation")
        return False
    return True


def format_table(table: dict[str, dict[str, float]], keys: tuple[str, ...] = SCORE_KEYS) -> str:
    """A plain-text comparison table: one row per method, mean ± std of each key."""
    w = max([12, *(len(m) + 1 for m in table)])
    head = f"{'method':<{w}}" + "".join(f"{k:>18}" for k in keys)
    rows = [head, "-" * len(head)]
    for method, s in table.items():
        rows.append(f"{method:<{w}}" + "".join(
            f"{s.get(f'{k}_mean', float('nan')):>10.3f} ± {s.get(f'{k}_std', float('nan')):<5.3f}" for k in keys))
    return "\n".join(rows)


def markdown_table(table: dict[str, dict[str, float]], runs: dict[str, str], experiment_id: str,
                   keys: tuple[str, ...] = SCORE_KEYS) -> str:
    """The comparison as a markdown note (the pipeline run's description): one row per method linking its run,
    best Dice / clDice in bold, and the best method by clDice named below the table."""
    cell = {k: max((s.get(f"{k}_mean", float("-inf")) for s in table.values()), default=float("nan")) for k in keys}
    lines = ["| method | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for method, s in table.items():
        values = []
        for k in keys:
            mean, std = s.get(f"{k}_mean", float("nan")), s.get(f"{k}_std", float("nan"))
            text = f"{mean:.3f} ± {std:.3f}"
            values.append(f"**{text}**" if mean == cell[k] else text)
        link = f"[{method}](#/experiments/{experiment_id}/runs/{runs[method]})" if method in runs else method
        lines.append(f"| {link} | " + " | ".join(values) + " |")
    scored = {m: s["cldice_mean"] for m, s in table.items() if s.get("cldice_mean") == s.get("cldice_mean")
              and "cldice_mean" in s}
    best = max(scored, key=scored.get) if scored else None
    head = ["**Pipeline comparison** on the held-out volumes (mean ± std over volumes).", ""]
    tail = ["", f"Best by clDice: **{best}** ({scored[best]:.3f}), run `{runs.get(best, '?')}`." if best else
            "No labels: no scores.", "", "Per-method metrics of this row: `<method>/dice`, `<method>/cldice`; "
            "figure: artifacts `comparison.png`."]
    return "\n".join(head + lines + tail)


def log_viewers(cfg: MainConfig, methods: list[str], runs: dict[str, str], out_dir: Path) -> list[str]:
    """Log ``viewer/<case>.html`` on the active run for every volume ``cfg`` evaluates: the image as stored and
    its label, with each method's prediction (``predictions/<case>_<method>_pred.nii.gz`` of the run
    ``runs[method]``) behind one method selector (:func:`~stego_core.report.viewer.viewer_html`). A prediction that
    cannot be fetched is skipped with a warning. Returns the case ids with a viewer."""
    from stego_core.config import EvaluateConfig
    from stego_core.data.io import load_case, load_volume
    from stego_core.steps.evaluation import select_cases
    from stego_core.report.viewer import viewer_html

    logged = []
    for case in select_cases(derive(EvaluateConfig, cfg)):
        predictions = {}
        for method in methods:
            uri = f"runs:/{runs[method]}/predictions/{case.case_id}_{method}_pred.nii.gz"
            try:
                path = tracking.download_artifacts(uri, out_dir / "predictions" / method)
            except Exception as exc:  # noqa: BLE001 - a missing file leaves this method out of the viewer
                log.warning("viewer of %s: no prediction of %s (%s): %s", case.case_id, method, uri, exc)
                continue
            predictions[method] = load_volume(path).data > 0
        if not predictions:
            continue
        loaded = load_case(case)
        page = viewer_html(loaded.image.data, predictions, loaded.label, spacing_mm=loaded.image.spacing_mm,
                           title=f"{case.case_id}: {len(predictions)} methods")
        tracking.log_text(page, f"viewer/{case.case_id}.html")
        logged.append(case.case_id)
    return logged


def _rows(result: Any, prefix: str = "") -> dict[str, dict[str, float]]:
    """An evaluation's per-case scores by case id (keys with ``prefix`` stripped, e.g. a teacher's)."""
    return {r["case_id"]: {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix) and k != "case_id"}
            for r in result.rows if "dice" in r}


def _stego(cfg: MainConfig, engine: EngineConfig, table: dict[str, dict[str, float]],
           per_case: dict[str, dict[str, dict[str, float]]]) -> dict[str, str]:
    """STEGO's steps (DINO pretraining when asked, training, reconstruction with and without CRF): their rows
    go into ``table``; returns the runs by name."""
    runs: dict[str, str] = {}
    model = cfg.model
    if cfg.pretrain is not None:
        # the pretrain section decides the pretraining; its volumes, crops, split and experiment are ours
        ours = {f.name: getattr(cfg, f.name) for f in (*dataclasses.fields(DataSettings),
                                                       *dataclasses.fields(RunSettings))}
        pre = dataclasses.replace(cfg.pretrain, **{**ours, "output": f"{cfg.output}/pretrain"})
        pretrained = run_pretrain(pre, nested=True)
        runs["pretrain"] = pretrained.run_id
        model = dataclasses.replace(cfg.model, backbone=pre.backbone, weights=pretrained.weights_uri)
    trained = run_train(derive(TrainConfig, cfg, model=model, output=f"{cfg.output}/train"), nested=True)
    runs["training"] = trained.run_id
    if trained.model_uri:
        runs["stego_model"] = trained.model_uri  # a self-training teacher `method: stego` without a model_uri
    for crf in (False, True) if cfg.stego_crf and crf_available() else (False,):
        result = run_reconstruct(derive(ReconstructConfig, cfg, engine=engine, crf=crf,
                                        model_uri=trained.model_uri or "", output=f"{cfg.output}/reconstruct"),
                                 nested=True)
        name = "stego+crf" if crf else "stego"
        table[name], runs[name], per_case[name] = result.summary, result.run_id, _rows(result)
    return runs


def _selftrain(cfg: MainConfig, engine: EngineConfig, table: dict[str, dict[str, float]],
               per_case: dict[str, dict[str, dict[str, float]]], stego_model: str | None = None) -> dict[str, str]:
    """Self-training on the pipeline's volumes: the teacher's row and the student's row go into ``table``.
    ``teacher.method: stego`` without a ``model_uri`` teaches with the STEGO model this pipeline trained."""
    plan = {f.name: getattr(cfg.selftrain, f.name) for f in dataclasses.fields(SelfTrainPlan)}
    teacher = plan["teacher"]
    if teacher.method == "stego" and not teacher.settings.get("model_uri") and not teacher.config:
        if stego_model is None:
            raise ValueError("selftrain.teacher.method=stego needs a model: list stego before selftrain in "
                             "learned, or give selftrain.teacher.settings.model_uri")
        plan["teacher"] = dataclasses.replace(teacher, settings={**teacher.settings, "model_uri": stego_model})
    result = run_selftrain(derive(SelfTrainConfig, cfg, **plan, engine=engine, output=f"{cfg.output}/selftrain"),
                           nested=True)
    teacher = f"teacher-{cfg.selftrain.teacher.label}"
    table[teacher] = {k[len("teacher_"):]: v for k, v in result.summary.items() if k.startswith("teacher_")}
    table["selftrain"] = {k: v for k, v in result.summary.items() if not k.startswith("teacher_")}
    per_case[teacher], per_case["selftrain"] = _rows(result, "teacher_"), _rows(result)
    return {"selftrain": result.run_id, teacher: result.run_id}


def run_main(cfg: MainConfig) -> str:
    """Run every step as a run nested under one ``pipeline`` run; returns the comparison table.

    The pipeline run (under ``mlflow run -e main``: the project's own run) logs the table and the bar chart.
    """
    from stego_core.steps.prepare import run_prepare
    from stego_core.report.visualize import comparison_bar_figure, per_case_figure, radius_recall_figure

    engine = dataclasses.replace(cfg.engine, axis=cfg.slicing.axis)  # every method's window, along the crops
    with tracking.start_run(cfg.experiment, run_name="pipeline", output_root=f"{cfg.output}/pipeline",
                            tags={"step": "pipeline", "method": "pipeline"},
                            description="The whole demo: prepare, classical baselines, STEGO training and "
                                        "reconstruction (the comparison appears here when it ends).") as parent:
        tracking.log_plan(cfg, parent.output_dir)
        table: dict[str, dict[str, float]] = {}
        runs: dict[str, str] = {}
        per_case: dict[str, dict[str, dict[str, float]]] = {}
        if "stego" in cfg.learned:  # STEGO's crops, also exported in the seed's dataset layout
            run_prepare(derive(PrepareConfig, cfg, output=f"{cfg.output}/prepare"), nested=True)
        for method in cfg.baselines:
            result = run_baseline(derive(BaselineConfig, cfg, engine=engine, method=method,
                                         output=f"{cfg.output}/baseline"), nested=True)
            table[method], runs[method], per_case[method] = result.summary, result.run_id, _rows(result)
        for learned in cfg.learned:
            if learned == "stego":
                runs.update(_stego(cfg, engine, table, per_case))
            else:
                runs.update(_selftrain(cfg, engine, table, per_case, runs.get("stego_model")))

        text = format_table(table)
        key = {m: m.replace("+", "_") for m in {**table, **runs}}  # MLflow keys allow no '+'
        tracking.set_tags({f"run.{key[m]}": r for m, r in runs.items()}
                          | ({"training_run_id": runs["training"]} if "training" in runs else {}))
        tracking.log_text(text + "\n", "comparison.txt")
        means = {m: {k: s.get(f"{k}_mean", float("nan")) for k in SCORE_KEYS} for m, s in table.items()}
        tracking.log_metrics({f"{key[m]}/{k}": v for m, row in means.items() for k, v in row.items()})
        tracking.log_figure(comparison_bar_figure(means, keys=("dice", "cldice")), "comparison.png")
        note = markdown_table(table, runs, parent.experiment_id)
        if per_case and any(per_case.values()):
            note += "\n\n" + log_comparison(per_case, title="Statistics across the held-out volumes")
            tracking.log_figure(per_case_figure(per_case), "comparison_cases.png")
            figures = ["`comparison_cases.png` (Dice and clDice per case and method)"]
            if any(f"recall_{b}" in row for rows in per_case.values() for row in rows.values() for b in RADIUS_BINS):
                tracking.log_figure(radius_recall_figure(per_case), "comparison_radius.png")
                figures.append("`comparison_radius.png` (recall by vessel radius, one line per method)")
            note += "\n\nFigures: " + ", ".join(figures) + "."
        viewers = log_viewers(cfg, [m for m in table if m in runs], runs, parent.output_dir)
        if viewers:
            note += ("\n\nSlice viewers (image, label and every method's prediction; TP grey, FP red, FN cyan): "
                     + ", ".join(f"`viewer/{c}.html`" for c in viewers) + ".")
        tracking.set_description(note)
    return text
