"""The post-processing ablation: every method x skull-strip mode x post-processing variant, on every case.

One MLflow parent run (``ablation``) holds the full table (``ablation.csv``, ``ablation.md``) and one nested run
per (method, skull strip, variant) with the same metric keys as an evaluation run (``dice/<case_id>``...,
``dice_mean``...), tagged ``method=<name>+<steps>``, ``skull_strip`` and ``variant``. Labels only score: the
probabilities of a method do not depend on them, and every variant is a fixed list of label-free steps.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stego_core.platform import tracking
from stego_core.config import AblationConfig, AblationMethod
from stego_core.data.cases import PreparedCase, ensure_cases, preprocess_case, split_cases
from stego_core.data.io import Case
from stego_core.methods.registry import build_method
from stego_core.evaluation.metrics import summarize
from stego_core.engine.postprocess import steps_tag
from stego_core.evaluation.scoring import evaluate_case
from stego_core.steps.comparison import log_comparison

#: Columns of ``ablation.csv`` after the identifying ones.
_SCORES = ("dice", "cldice", "precision", "recall", "n_components_pred", "n_components_gt",
           "n_components_before_postprocess", "label_retention", "predicted_fraction")


def _probabilities(method: AblationMethod, prepared: PreparedCase, cfg: AblationConfig, mode: str) -> np.ndarray:
    """The method's probability volume for one case and skull-strip mode (from the cache when present)."""
    cache_file = None
    engine = dataclasses.replace(cfg.engine, axes=method.axes, fusion=method.fusion)
    if cfg.cache:
        key = f"{prepared.case.image}|{mode}|{engine}|{method.full_label}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        cache_file = Path(cfg.cache) / f"{prepared.case_id}__{mode}__{digest}.npy"
        if cache_file.is_file():
            return np.load(cache_file)
    prob = build_method(method.name, method.settings, engine).predict(prepared)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp.npy")
        np.save(tmp, prob)
        tmp.replace(cache_file)
    return prob


def _cases(cfg: AblationConfig) -> list[tuple[int, Case]]:
    out = []
    for i, data in enumerate(cfg.datasets):
        cases = ensure_cases(data)
        if cfg.split == "test":
            cases = split_cases(cases, cfg.test_fraction, seed=cfg.split_seed, test_ids=cfg.test_cases)[1]
        out.extend((i, c) for c in cases)
    return out


def ablation_rows(cfg: AblationConfig, *, csv_path: Path | None = None) -> list[dict[str, Any]]:
    """Compute the ablation table (no MLflow): one row per case x method x skull strip x variant.

    Rows are appended to ``csv_path`` as they are computed, so a long run can be watched.
    """
    rows: list[dict[str, Any]] = []
    writer = None
    handle = None
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(csv_path, "w", newline="")
        writer = csv.DictWriter(handle, fieldnames=["case_id", "method", "skull_strip", "variant", "tag",
                                                    *_SCORES], extrasaction="ignore")
        writer.writeheader()
    try:
        for ds, case in tqdm(_cases(cfg), desc="ablation", unit="case", disable=not cfg.progress):
            modes = sorted({m for method in cfg.methods for m in method.skull_strip})
            for mode in modes:
                data = dataclasses.replace(cfg.datasets[ds], skull_strip=mode)
                prepared = preprocess_case(case, data)
                for method in (m for m in cfg.methods if mode in m.skull_strip):
                    prob = _probabilities(method, prepared, cfg, mode)
                    for variant in cfg.variants:
                        post, scores = evaluate_case(prob, prepared, variant.postprocess, threshold=0.5,
                                                     slice_axis=cfg.engine.axis, crf_settings=cfg.crf_settings)
                        row: dict[str, Any] = {
                            **scores, "method": method.label, "skull_strip": mode, "variant": variant.name,
                            "tag": method.name + steps_tag(variant.postprocess),
                            "n_components_before_postprocess": float(post.n_components_before),
                            "label_retention": prepared.label_retention}
                        rows.append(row)
                        if writer is not None:
                            writer.writerow(row)
                            handle.flush()
                    del prob
                del prepared
    finally:
        if handle is not None:
            handle.close()
    return rows


def _markdown(rows: list[dict[str, Any]]) -> str:
    """Per (method, skull strip, variant): Dice / clDice on every case and their mean."""
    cases = list(dict.fromkeys(r["case_id"] for r in rows))
    keys = list(dict.fromkeys((r["method"], r["skull_strip"], r["variant"]) for r in rows))
    by = {(r["method"], r["skull_strip"], r["variant"], r["case_id"]): r for r in rows}
    lines = ["| method | skull strip | post-processing | " + " | ".join(cases) + " | mean |",
             "|---" * (len(cases) + 4) + "|"]
    for method, mode, variant in keys:
        cells, d, c = [], [], []
        for case in cases:
            r = by.get((method, mode, variant, case))
            if r is None or "dice" not in r:
                cells.append("")
                continue
            d.append(r["dice"])
            c.append(r["cldice"])
            cells.append(f"{r['dice']:.3f} / {r['cldice']:.3f}")
        mean = f"{np.mean(d):.3f} / {np.mean(c):.3f}" if d else ""
        lines.append(f"| {method} | {mode} | {variant} | " + " | ".join(cells) + f" | {mean} |")
    return "\n".join(lines) + "\n\nCells: Dice / clDice.\n"


def log_statistics_note(groups: dict[tuple[str, str, str], list[dict[str, Any]]], *, n_rows: int) -> str:
    """Log the statistics across cases of every (method, skull strip, variant) against the best one
    (:func:`stego_core.steps.comparison.log_comparison`: ``comparison.csv``, ``comparison.md``, the chart) and
    return the ablation run's note: what the run holds, then those statistics."""
    per_case = {"|".join(key): {r["case_id"]: {k: float(v) for k, v in r.items()
                                               if k not in ("case_id", "method", "skull_strip", "variant", "tag")
                                               and isinstance(v, (int, float))}
                                for r in group if "dice" in r}
                for key, group in groups.items()}
    head = (f"**Post-processing ablation**: {len(groups)} variants (method|skull strip|post-processing), "
            f"{n_rows} rows; the per-case grid is `ablation.md` / `ablation.csv`, one nested run per variant.")
    section = log_comparison(per_case, title="Statistics across cases (each variant against the best)")
    return head + ("\n\n" + section if section else "\n\nNo labels: no statistics across cases.")


def run_ablation(cfg: AblationConfig) -> str:
    """One parent MLflow run with the table, one nested run per (method, skull strip, variant)."""
    with tracking.start_run(cfg.experiment, run_name="ablation", output_root=cfg.output,
                            tags={"step": "ablation", "kind": "ablation"}) as run:
        tracking.log_plan(cfg, run.output_dir)
        csv_path = run.output_dir / "ablation.csv"
        rows = ablation_rows(cfg, csv_path=csv_path)
        tracking.log_artifact(csv_path)
        md = run.output_dir / "ablation.md"
        md.write_text(_markdown(rows))
        tracking.log_artifact(md)
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for r in rows:
            groups.setdefault((r["method"], r["skull_strip"], r["variant"]), []).append(r)
        tracking.set_description(log_statistics_note(groups, n_rows=len(rows)))
        for (method, mode, variant), group in groups.items():
            tag = group[0]["tag"]
            with tracking.start_run(cfg.experiment, run_name=f"{method}|{mode}|{variant}", nested=True,
                                    output_root=cfg.output,
                                    tags={"method": tag, "skull_strip": mode, "variant": variant,
                                          "step": "ablation-variant", "kind": "ablation"}):
                tracking.log_params({"method": method, "skull_strip": mode, "variant": variant})
                metrics = {f"{k}/{r['case_id']}": float(r[k]) for r in group for k in _SCORES
                           if r.get(k) is not None}
                scored = [r for r in group if "dice" in r]
                if scored:
                    metrics.update(summarize([{k: v for k, v in r.items() if k != "case_id"} for r in scored]))
                tracking.log_metrics(metrics)
        return f"run {run.run_id}  rows={len(rows)}  table={md}"
