"""The whole pipeline on one config (``make demo`` / ``mlflow run . -e main``).

Every row of ``methods`` is a registered method by name: the pipeline loops over them in order, each one an
MLflow run nested under one ``pipeline`` run (:func:`~stego_core.steps.evaluation.run_method`: a learned method is
fitted on the split's training volumes, then every held-out volume is reconstructed and scored). The pipeline run
holds the comparison table and bar chart, the per-case Dice / clDice plot, the recall by vessel radius, and per
held-out volume one slice viewer (``viewer/<case>.html``) that switches between the methods' predictions. A mask
that a method returns beside its own (a self-training teacher) is a row of its own (``teacher-<name>``).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stego_core._checks import check_choice
from stego_core._markdown import cell
from stego_core._markdown import row as md_row
from stego_core.config import derive, from_dict
from stego_core.engine.postprocess import STEPS, PostprocessStep
from stego_core.engine.reconstruction import EngineConfig
from stego_core.evaluation.guard import DomainConfig
from stego_core.evaluation.metrics import SCORE_KEYS
from stego_core.methods.registry import METHODS, resolve_settings
from stego_core.platform import tracking
from stego_core.platform.console import StepClock, closing_block
from stego_core.steps.base import DataSettings, RunSettings
from stego_core.steps.comparison import REPORT, log_comparison
from stego_core.steps.evaluation import (
    EvaluateConfig,
    PredictionStore,
    check_data,
    run_method,
    select_cases,
)
from stego_core.steps.prepare import PrepareConfig
from stego_core.steps.pretrain import PretrainConfig, run_pretrain

log = logging.getLogger(__name__)

#: The demo's rows when a config names none: every classical method at its defaults, and STEGO.
DEFAULT_METHODS = ("percentile", "otsu", "multiotsu", "kmeans", "gmm", "frangi", "sato", "stego")


@dataclass(frozen=True)
class MethodSpec:
    """One row of the comparison: a registered ``method`` (default: the row's name, or the part before a ``+``),
    its ``settings`` (resolved and checked when the config is loaded), and ``postprocess`` steps after it. A row
    named ``<row>+<step>`` with no method or settings of its own is row ``<row>`` (the same fitted state) followed
    by that step at its defaults (``stego+crf``)."""

    method: str = ""
    settings: Any = field(default_factory=dict)
    postprocess: tuple[PostprocessStep, ...] = ()


def _spec(row: str, value: Any, slicing: Any = None) -> MethodSpec:
    """A row of ``methods`` as a :class:`MethodSpec`: from a mapping, or ``{}`` / None for the defaults. A method
    with crops of its own (a ``slicing`` section, STEGO's) takes the pipeline's ``slicing`` unless it states one."""
    if isinstance(value, MethodSpec):
        spec = value
    else:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise ValueError(f"methods.{row} must be a mapping (method, settings, postprocess), got {value!r}")
        spec = from_dict(MethodSpec, dict(value), prefix=f"methods.{row}.")
    method, steps = spec.method, spec.postprocess
    if not method:
        method, *extra = row.split("+")
        if extra and not steps:
            unknown = [e for e in extra if e not in STEPS]
            if unknown:
                raise ValueError(f"methods.{row}: {unknown} are not post-processing steps ({', '.join(STEPS)}); "
                                 f"name the method with methods.{row}.method")
            steps = tuple(PostprocessStep(e) for e in extra)
    if method not in METHODS:
        raise ValueError(f"methods.{row}: unknown method {method!r}; valid names: {', '.join(METHODS)}")
    settings = spec.settings
    entry = METHODS[method]
    if (slicing is not None and isinstance(settings, Mapping) and "slicing" not in settings
            and entry.settings is not None and "slicing" in {f.name for f in dataclasses.fields(entry.settings)}):
        settings = {**settings, "slicing": slicing}
    settings = resolve_settings(method, settings, prefix=f"methods.{row}.settings.")
    return MethodSpec(method=method, settings=settings, postprocess=tuple(steps))


@dataclass(frozen=True)
class MainConfig(DataSettings, RunSettings):
    """What the demo (``make demo``, ``mlflow run . -e main``) runs, read top to bottom: the data (and, with
    ``prepare``, its crops exported in the seed's dataset layout), the volumes scored (``split``), then
    ``methods``: the rows of the comparison in order, each a registered method with its settings (a list of
    names takes every default). ``pretrain`` (a :class:`PretrainConfig` mapping; its ``data``, ``slicing``,
    ``experiment`` and ``output`` are this config's) first pretrains a backbone with DINO on the same volumes
    without labels; every row whose settings name a backbone (``model.backbone``) then uses it. ``engine``: the
    sliding window every method reconstructs with (its ``axis`` is ``slicing.axis``), e.g. ``stride: 16`` for
    16-pixel crops without overlap; ``slicing`` is also the crops of every method that trains on crops (STEGO)
    unless its settings state their own."""

    split: str = "test"
    methods: Any = field(default_factory=lambda: {name: {} for name in DEFAULT_METHODS})
    domain: DomainConfig = field(default_factory=DomainConfig)
    prepare: bool = True
    pretrain: PretrainConfig | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: str = "outputs"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.split, "split", ("test", "all"))
        rows = self.methods
        if isinstance(rows, (list, tuple)):
            rows = {str(name): {} for name in rows}
        if not isinstance(rows, Mapping) or not rows:
            raise ValueError(f"methods must name at least one method (a list of names or a mapping of rows), "
                             f"got {self.methods!r}")
        specs: dict[str, MethodSpec] = {}
        for row, value in rows.items():
            row = str(row)
            base = row.split("+")[0]
            if "+" in row and base in specs and not (value or {}).get("method") and not (value or {}).get("settings"):
                # ``<row>+<step>``: row ``<row>``'s method and settings (one fit), then its steps
                value = {**(value or {}), "method": specs[base].method, "settings": specs[base].settings}
                if not value.get("postprocess"):
                    value["postprocess"] = [{"step": e} for e in row.split("+")[1:]]
            specs[row] = _spec(row, value, self.slicing)
        for row, spec in specs.items():
            try:
                check_data(spec.settings, self.data, self.split)
            except ValueError as exc:
                raise ValueError(f"methods.{row}: {exc}") from None
        object.__setattr__(self, "methods", specs)


def _warned(s: dict[str, float]) -> str:
    """The domain guard's column: cases warned about out of the cases scored ("" when nothing was counted)."""
    if "domain_warnings" not in s:
        return ""
    return f"{int(s['domain_warnings'])}/{int(s.get('n_cases', 0))}"


def metric_name(row: str) -> str:
    """A row's name in MLflow metric keys (``<name>/dice``): MLflow's names hold no ``+``, so ``stego+crf`` is
    ``stego_crf`` there; tables name the row ``stego+crf (stego_crf)`` so that both read the same.

    >>> metric_name("stego+crf"), metric_name("otsu")
    ('stego_crf', 'otsu')
    """
    return tracking.safe_key(row).replace("/", "_")


def _label(row: str) -> str:
    key = metric_name(row)
    return row if key == row else f"{row} ({key})"


def _n(s: dict[str, float]) -> int:
    """How many volumes a row's summary is over (``n_cases``: the volumes it scored)."""
    return int(s.get("n_cases", 0))


def _mean_std(s: dict[str, float], k: str, digits: int = 3) -> str:
    """``mean ± std`` of key ``k`` over the row's volumes; the mean alone for one volume (no spread to show)."""
    mean, std = s.get(f"{k}_mean", float("nan")), s.get(f"{k}_std", float("nan"))
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if _n(s) >= 2 else f"{mean:.{digits}f}"


def format_table(table: dict[str, dict[str, float]], keys: tuple[str, ...] = SCORE_KEYS) -> str:
    """A plain-text comparison table: one row per method, the volumes it scored (``n``), mean ± std of each key
    over them (the value alone when n = 1), and the cases the domain guard warned about (``domain``: warned /
    scored; the reasons are in each run's ``cases.csv``)."""
    w = max([12, *(len(_label(m)) + 1 for m in table)])
    head = f"{'method':<{w}}{'n':>3}" + "".join(f"{k:>16}" for k in keys) + f"{'domain':>9}"
    rows = [head, "-" * len(head)]
    for method, s in table.items():
        rows.append(f"{_label(method):<{w}}{_n(s):>3}" + "".join(f"{_mean_std(s, k):>16}" for k in keys)
                    + f"{_warned(s):>9}")
    ns = sorted({_n(s) for s in table.values()})
    what = "mean ± std over the held-out volumes" if max(ns, default=0) >= 2 else "the score of the one volume"
    return "\n".join([f"n = {'/'.join(map(str, ns))} held-out volume(s) per method; {what}.", *rows])


def markdown_table(table: dict[str, dict[str, float]], runs: dict[str, str], experiment_id: str,
                   keys: tuple[str, ...] = SCORE_KEYS, *, run_id: str = "") -> str:
    """The comparison as a markdown note (the pipeline run's description): one row per method linking its run,
    best Dice / clDice in bold, and the best method by clDice named below the table."""
    top = {k: max((s.get(f"{k}_mean", float("-inf")) for s in table.values()), default=float("nan")) for k in keys}
    lines = [md_row(["method", *map(cell, keys), "domain warnings"]), "|---|" + "---|" * (len(keys) + 1)]
    for method, s in table.items():
        values = []
        for k in keys:
            mean = s.get(f"{k}_mean", float("nan"))
            text = _mean_std(s, k)
            values.append(f"**{text}**" if mean == top[k] else text)
        name = cell(method).replace("[", "\\[").replace("]", "\\]")
        link = f"[{name}](#/experiments/{experiment_id}/runs/{runs[method]})" if method in runs else name
        warned = _warned(s)
        flag = f"⚠ {warned}" if warned and not warned.startswith("0/") else warned
        lines.append(md_row([link, *values, flag]))
    scored = {m: s["cldice_mean"] for m, s in table.items() if s.get("cldice_mean") == s.get("cldice_mean")
              and "cldice_mean" in s}
    best = max(scored, key=scored.get) if scored else None
    n = max((_n(s) for s in table.values()), default=0)
    head = [f"**Pipeline comparison** on n = {n} held-out volume{'s' if n != 1 else ''} ("
            + ("mean ± std over volumes)." if n >= 2 else "one volume: no spread).")
            + (f" **Report: [{REPORT}](#/experiments/{experiment_id}/runs/{run_id}/artifacts/{REPORT})** (table with "
               "CIs, per-case plots, viewers; `make ui` opens it full page)." if run_id else ""), ""]
    tail = ["", f"Best by clDice: **{cell(best)}** ({scored[best]:.3f}), run `{runs.get(best, '?')}`." if best else
            "No labels: no scores.", "", "Per-method metrics of this row: `<method>/dice`, `<method>/cldice`; "
            "figure: artifacts `comparison.png`."]
    return "\n".join(head + lines + tail)


def log_viewers(cfg: Any, methods: list[str], runs: dict[str, str], out_dir: Path,
                folders: dict[str, Path] | None = None, notes: dict[str, dict[str, str]] | None = None
                ) -> list[str]:
    """Log ``viewer/<case>.html`` on the active run for every volume ``cfg`` evaluates: the image as stored and
    its label, with each method's prediction (``predictions/<case>_<method>_pred.nii.gz`` of the run
    ``runs[method]``: read from the run's output folder ``folders[method]`` when it is there, else downloaded)
    behind one method selector (:func:`~stego_core.report.viewer.viewer_html`); ``notes[method][case]``: the
    domain guard's warning, marked in the viewer. A prediction that cannot be fetched is skipped with a warning.
    Returns the case ids with a viewer."""
    from stego_core.data.io import load_case, load_volume
    from stego_core.report.viewer import viewer_html
    from stego_core.steps.evaluation import EvaluateConfig

    logged = []
    for case in select_cases(derive(EvaluateConfig, cfg)):
        predictions = {}
        for method in methods:
            name = f"{case.case_id}_{method}_pred.nii.gz"
            local = (folders or {}).get(method, Path("/nonexistent")) / "predictions" / name
            if local.is_file():
                predictions[method] = load_volume(local).data > 0
                continue
            uri = f"runs:/{runs[method]}/predictions/{name}"
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
                           title=f"{case.case_id}: {len(predictions)} methods",
                           notes={m: (notes or {}).get(m, {}).get(case.case_id, "") for m in predictions})
        tracking.log_text(page, f"viewer/{case.case_id}.html")
        logged.append(case.case_id)
    return logged


def _rows(result: Any, prefix: str = "") -> dict[str, dict[str, float]]:
    """An evaluation's per-case scores by case id (keys with ``prefix`` stripped, e.g. a teacher's)."""
    return {r["case_id"]: {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix) and k != "case_id"
                           and isinstance(v, (int, float)) and not isinstance(v, bool)}
            for r in result.rows if "dice" in r}


def crf_available() -> bool:
    """Whether the optional dense-CRF package is installed (``pip install 'stego-vessels[crf]'``)."""
    import importlib.util

    if importlib.util.find_spec("pydensecrf") is None:
        log.warning("pydensecrf2 is not installed: skipping the rows with a crf step")
        return False
    return True


def _extra_rows(result: Any, row: str, extras: Mapping[str, str]) -> dict[str, tuple[dict, dict]]:
    """The rows of a method's mask extras (a teacher): ``{row name: (summary, per-case scores)}``."""
    out = {}
    for role, name in extras.items():
        prefix = f"{role}_"
        summary = {k[len(prefix):]: v for k, v in result.summary.items() if k.startswith(prefix)}
        cases = {r["case_id"]: {k[len(prefix):]: v for k, v in r.items() if k.startswith(prefix)}
                 for r in result.rows if f"{prefix}dice" in r}
        if summary:
            out[name] = (summary, cases)
    return out


def _with_backbone(settings: Any, backbone: str, weights: str) -> Any:
    """``settings`` with a pretrained backbone when they name one (``model.backbone``), else unchanged."""
    model = getattr(settings, "model", None)
    if model is None or not hasattr(model, "backbone"):
        return settings
    return dataclasses.replace(settings, model=dataclasses.replace(model, backbone=backbone, weights=weights))


def run_main(cfg: MainConfig) -> str:
    """Run every row of ``cfg.methods`` as a run nested under one ``pipeline`` run; returns the comparison table
    followed by the last block (:func:`~stego_core.platform.console.closing_block`: the run, its report, ``make ui``).

    The pipeline run (under ``mlflow run -e main``: the project's own run) logs the table and the bar chart.
    Rows with the same method and settings share one fitted state (``stego`` and ``stego+crf`` train once). Every
    step opens with a banner naming it and ends with its elapsed time (:class:`~stego_core.platform.console.StepClock`).
    """
    from stego_core.report.visualize import comparison_bar_figure
    from stego_core.steps.prepare import run_prepare

    rows = [r for r, spec in cfg.methods.items() if not any(st.step == "crf" for st in spec.postprocess)
            or crf_available()]
    clock = StepClock(int(cfg.prepare) + int(cfg.pretrain is not None) + len(rows) + 1, log)
    engine = dataclasses.replace(cfg.engine, axis=cfg.slicing.axis)  # every method's window, along the crops
    with tracking.start_run(cfg.experiment, run_name="pipeline", output_root=f"{cfg.output}/pipeline",
                            tags={"step": "pipeline", "method": "pipeline"},
                            description="The whole pipeline: " + ", ".join(cfg.methods) + " (the comparison "
                                        "appears here when it ends).") as parent, \
            tempfile.TemporaryDirectory(prefix="stego-predictions-") as scratch:
        tracking.log_plan(cfg, parent.output_dir)
        if cfg.prepare:  # the crops, also exported in the seed's dataset layout
            with clock.step("prepare", "the volumes (phantoms generated if need be), their crops"):
                run_prepare(derive(PrepareConfig, cfg, output=f"{cfg.output}/prepare"), nested=True)
        backbone = None
        if cfg.pretrain is not None:
            # the pretrain section decides the pretraining; its volumes, crops, split and experiment are ours
            ours = {f.name: getattr(cfg, f.name) for f in (*dataclasses.fields(DataSettings),
                                                           *dataclasses.fields(RunSettings))}
            pre = dataclasses.replace(cfg.pretrain, **{**ours, "output": f"{cfg.output}/pretrain"})
            with clock.step(f"pretrain {pre.backbone}", f"DINO on the training volumes' crops (no labels), at most "
                                                        f"{pre.max_steps} steps / {pre.max_minutes:g} min"):
                backbone = (pre.backbone, run_pretrain(pre, nested=True).weights_uri)
        table: dict[str, dict[str, float]] = {}
        runs: dict[str, str] = {}
        per_case: dict[str, dict[str, dict[str, float]]] = {}
        shared: dict[str, Any] = {}  # fitted states by method and settings: rows with equal ones train once
        # and predict once (rows that differ in post-processing only read the volumes back); a row without such a
        # twin writes nothing there
        store = PredictionStore(scratch)
        twins = {r: [o for o in rows if (cfg.methods[o].method, cfg.methods[o].settings)
                     == (cfg.methods[r].method, cfg.methods[r].settings)] for r in rows}
        folders: dict[str, Path] = {}
        notes: dict[str, dict[str, str]] = {}
        for row in rows:
            spec = cfg.methods[row]
            settings = spec.settings if backbone is None else _with_backbone(spec.settings, *backbone)
            evaluate = derive(EvaluateConfig, cfg, engine=engine, postprocess=spec.postprocess,
                              output=f"{cfg.output}/{spec.method}")
            learned = METHODS[spec.method].kind == "learned"
            same = twins[row][0] if twins[row][0] != row else None  # trained once, shared
            uri = str(getattr(settings, "model_uri", "") or "")
            fit = ((f"the model {uri}, " if uri else f"{same}'s model, " if same else
                    "fit on the training volumes, then ") if learned else "")
            with clock.step(row, fit + "scored on the held-out volumes"):
                result = run_method(spec.method, evaluate, settings=settings, name=row, run_name=row, nested=True,
                                    suffix=False, context={"shared": shared},
                                    store=store if len(twins[row]) > 1 else None)
            runs[row], per_case[row] = result.run_id, _rows(result)
            table[row] = {**result.summary, "domain_warnings": len(result.warned), "n_cases": len(per_case[row])}
            folders[row] = result.output_dir
            notes[row] = {r["case_id"]: r["domain_warning"] for r in result.rows if r.get("domain_warning")}
            for name, (summary, cases) in _extra_rows(result, row, getattr(result.method, "extra_rows", {})).items():
                table[name], runs[name], per_case[name] = {**summary, "n_cases": len(cases)}, result.run_id, cases
                folders[name] = result.output_dir  # its predictions are in the same run's folder

        with clock.step("comparison", "tables, figures, viewers, report.html on the pipeline run"):
            text = format_table(table)
            key = {m: metric_name(m) for m in {**table, **runs}}  # MLflow keys allow no '+'
            tracking.set_tags({f"run.{key[m]}": r for m, r in runs.items()})
            tracking.log_text(text + "\n", "comparison.txt")
            means = {m: {k: s.get(f"{k}_mean", float("nan")) for k in SCORE_KEYS} for m, s in table.items()}
            tracking.log_metrics({f"{key[m]}/{k}": round(v, 4) for m, row in means.items() for k, v in row.items()})
            tracking.log_figure(comparison_bar_figure(means, keys=("dice", "cldice")), "comparison.png")
            viewers = log_viewers(derive(EvaluateConfig, cfg), [m for m in table if m in runs], runs,
                                  parent.output_dir, folders, notes)
            note = markdown_table(table, runs, parent.experiment_id, run_id=parent.run_id)
            if per_case and any(per_case.values()):
                note += "\n\n" + log_comparison(per_case, title="Statistics across the held-out volumes",
                                                 report_title="Pipeline: the methods on the held-out volumes",
                                                 runs=runs, viewers={c: f"viewer/{c}.html" for c in viewers})
                note += ("\n\nFigures: `comparison_cases.png` (Dice and clDice per case and method), "
                         "`comparison_radius.png` (recall by vessel radius), `comparison_betti.png` (Betti-number "
                         "errors).")
            if any(notes.values()):
                note += ("\n\nDomain warnings (the case lies outside the domain the method or preset was chosen for, "
                         "or its mask is implausible there):\n\n") + "\n".join(
                    f"- {row} on {case}: {text}" for row, cases in notes.items() for case, text in cases.items())
            if viewers:
                note += ("\n\nSlice viewers (image, label and every method's prediction, two side by side; TP gold, FP "
                         "red, FN cyan): " + ", ".join(f"`viewer/{c}.html`" for c in viewers) + ".")
            tracking.set_description(note)
        report = f"{tracking.client().get_run(parent.run_id).info.artifact_uri}/{REPORT}"
        return text + "\n\n" + closing_block(parent.run_id, cfg.experiment, report, clock=clock)
