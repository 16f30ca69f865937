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
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stego_core._checks import check_choice
from stego_core._markdown import cell
from stego_core._markdown import row as md_row
from stego_core.config import to_dict
from stego_core.data.cases import (
    DataConfig,
    PreparedCase,
    ensure_cases,
    preprocess_case,
    split_cases,
)
from stego_core.data.io import Case
from stego_core.data.preprocess import SKULL_STRIP_MODES
from stego_core.engine.crf import CRFSettings
from stego_core.engine.postprocess import PostprocessStep, steps_tag
from stego_core.engine.reconstruction import FUSION_MODES, EngineConfig
from stego_core.evaluation.metrics import METRIC_KEYS, summarize
from stego_core.evaluation.scoring import evaluate_case
from stego_core.methods import METHODS, BuildContext, build_method
from stego_core.methods.registry import resolve_settings
from stego_core.platform import tracking
from stego_core.steps.base import RunSettings
from stego_core.steps.comparison import log_comparison


@dataclass(frozen=True)
class AblationMethod:
    """One row family of the ablation: a registered method by name with its settings, the skull-strip modes to
    run it with, and optionally tri-planar fusion (``axes``, ``fusion``; slice-based methods only). ``alias``
    names the row (default: the method with the settings as given and the fusion, e.g. ``gmm{n_components=4}``
    or ``frangi@012mean``). The settings are resolved when the config is loaded (a bad key fails before any run
    opens; a teacher preset is read once), so the plan shows every setting in force."""

    name: str = "gmm"
    settings: Any = field(default_factory=dict)
    skull_strip: tuple[str, ...] = ("auto",)
    axes: tuple[int, ...] | None = None
    fusion: str = "mean"
    alias: str = ""

    def __post_init__(self) -> None:
        for mode in self.skull_strip:
            check_choice(mode, "ablation.methods.skull_strip", SKULL_STRIP_MODES)
        check_choice(self.fusion, "ablation.methods.fusion", FUSION_MODES)
        if not self.alias:  # named by what the config gave, before the defaults are filled in
            given = self.settings if isinstance(self.settings, dict) else {}
            out = self.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(given.items())) + "}" if given else "")
            if self.axes is not None:
                out += "@" + "".join(str(a) for a in self.axes) + self.fusion
            object.__setattr__(self, "alias", out.replace(" ", ""))
        object.__setattr__(self, "settings", resolve_settings(self.name, self.settings,
                                                              prefix=f"methods.{self.alias}.settings."))

    @property
    def row(self) -> str:
        """The row's display name."""
        return self.alias

    @property
    def cache_key(self) -> str:
        """The method, every setting in force and the fusion: what its cached probabilities depend on."""
        plain = to_dict(self.settings) if dataclasses.is_dataclass(self.settings) else self.settings
        return f"{self.name}{json.dumps(plain, sort_keys=True, default=str)}@{self.axes}{self.fusion}"


@dataclass(frozen=True)
class AblationVariant:
    """A named post-processing list applied to every method of the ablation (``none``: no step)."""

    name: str = "none"
    postprocess: tuple[PostprocessStep, ...] = ()


def _default_ablation_methods() -> tuple[AblationMethod, ...]:
    both = ("auto", "head")
    return (AblationMethod("percentile", skull_strip=both), AblationMethod("otsu"), AblationMethod("multiotsu"),
            AblationMethod("kmeans"), AblationMethod("gmm", skull_strip=both),
            AblationMethod("gmm", {"n_components": 4}, skull_strip=both), AblationMethod("frangi"),
            AblationMethod("sato"), AblationMethod("frangi3d", skull_strip=both))


def _default_ablation_variants() -> tuple[AblationVariant, ...]:
    return (AblationVariant("none"), AblationVariant("cc", (PostprocessStep("cc", min_size_vox=10),)),
            AblationVariant("largest", (PostprocessStep("largest", min_fraction=0.05),)),
            AblationVariant("fill_holes", (PostprocessStep("fill_holes", max_size_vox=64),)),
            AblationVariant("smooth+largest", (PostprocessStep("smooth", sigma_vox=0.5),
                                               PostprocessStep("largest", min_fraction=0.05))))


@dataclass(frozen=True)
class AblationConfig(RunSettings):
    """The ``ablation`` step: every method x skull-strip mode x post-processing variant on every case of every
    data set, one MLflow parent run with one nested run per (method, skull strip, variant).

    Each method's probabilities are computed once per case and mode (and kept in ``cache`` when set, keyed by
    case, mode and method label, so reruns and new variants are cheap); the variants then post-process them.
    ``datasets`` are :class:`DataConfig` sections (phantoms, folders of real cases); ``split: test`` keeps only
    the held-out cases of each.
    """

    datasets: tuple[DataConfig, ...] = (DataConfig(),)
    split: str = "all"
    engine: EngineConfig = field(default_factory=EngineConfig)
    methods: tuple[AblationMethod, ...] = field(default_factory=_default_ablation_methods)
    variants: tuple[AblationVariant, ...] = field(default_factory=_default_ablation_variants)
    crf_settings: CRFSettings = field(default_factory=CRFSettings)
    cache: str = ""
    progress: bool = True
    output: str = "outputs/ablation"
    experiment: str = "stego-vessels-ablation"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.split, "split", ("test", "all"))
        if not self.datasets or not self.methods or not self.variants:
            raise ValueError("ablation needs at least one dataset, method and variant")



#: Columns of ``ablation.csv`` after the identifying ones: the metric list, then what the case and the
#: post-processing add.
_SCORES = (*(k for k in METRIC_KEYS if k not in ("tprec", "tsens")), "n_components_before_postprocess",
           "label_retention", "predicted_fraction")


def _method(method: AblationMethod, cfg: AblationConfig, ds: int, mode: str,
            built: dict[tuple[int, str, str], Any]) -> Any:
    """The row family's method for one data set and skull-strip mode, built once; a learned one is fitted on that
    data set's training volumes (the split's training part; every volume with ``split: all``)."""
    key = (ds, mode, method.cache_key)
    if key not in built:
        engine = dataclasses.replace(cfg.engine, axes=method.axes, fusion=method.fusion)
        impl = build_method(method.name, method.settings, BuildContext(engine=engine, progress=cfg.progress))
        if METHODS[method.name].kind == "learned" and impl.state() is None:
            data = dataclasses.replace(cfg.datasets[ds], skull_strip=mode)
            cases = ensure_cases(data)
            train = cases if cfg.split == "all" else split_cases(cases, cfg.test_fraction, seed=cfg.split_seed,
                                                                 test_ids=cfg.test_cases)[0]
            if getattr(impl, "needs_disjoint_fit", False) and cfg.split == "all":
                raise ValueError(f"ablation: method {method.row!r} trains apart from the evaluated volumes; "
                                 "use split=test")
            impl.fit([preprocess_case(c, data) for c in train])
        built[key] = impl
    return built[key]


def _probabilities(method: AblationMethod, impl: Any, prepared: PreparedCase, cfg: AblationConfig, mode: str
                   ) -> np.ndarray:
    """The method's probability volume for one case and skull-strip mode (from the cache when present)."""
    cache_file = None
    if cfg.cache:
        engine = dataclasses.replace(cfg.engine, axes=method.axes, fusion=method.fusion)
        key = f"{prepared.case.image}|{mode}|{engine}|{method.cache_key}"
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        cache_file = Path(cfg.cache) / f"{prepared.case_id}__{mode}__{digest}.npy"
        if cache_file.is_file():
            return np.load(cache_file)
    prob = impl.predict(prepared).prob
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
    built: dict[tuple[int, str, str], Any] = {}
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
                    impl = _method(method, cfg, ds, mode, built)
                    prob = _probabilities(method, impl, prepared, cfg, mode)
                    for variant in cfg.variants:
                        post, scores = evaluate_case(prob, prepared, variant.postprocess, threshold=impl.threshold,
                                                     slice_axis=cfg.engine.axis, crf_settings=cfg.crf_settings)
                        row: dict[str, Any] = {
                            **scores, "method": method.row, "skull_strip": mode, "variant": variant.name,
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
    lines = [md_row(["method", "skull strip", "post-processing", *map(cell, cases), "mean"]),
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
        lines.append(md_row([cell(method), cell(mode), cell(variant), *cells, mean]))
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
    case_ids = [c.case_id for _, c in _cases(cfg)]
    tracking.case_keys(case_ids)  # refused before any work when two cases would share their metrics
    with tracking.start_run(cfg.experiment, run_name="ablation", output_root=cfg.output,
                            tags={"step": "ablation", "kind": "ablation"}) as run:
        tracking.log_plan(cfg, run.output_dir)
        tracking.tag_case_keys(dict.fromkeys(case_ids))
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
                tracking.tag_case_keys(dict.fromkeys(r["case_id"] for r in group))
                metrics = {f"{k}/{r['case_id']}": float(r[k]) for r in group for k in _SCORES
                           if r.get(k) is not None}
                scored = [r for r in group if "dice" in r]
                if scored:
                    metrics.update(summarize([{k: v for k, v in r.items() if k != "case_id"} for r in scored]))
                tracking.log_metrics(metrics)
        return f"run {run.run_id}  rows={len(rows)}  table={md}"
