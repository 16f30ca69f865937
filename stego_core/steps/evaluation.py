"""Evaluate any registered method on held-out volumes, tracked in MLflow with one metric vocabulary.

:func:`run_method` is the one evaluation run, whatever the method: its plan, a ``method`` tag, the data manifest
as a dataset input; a learned method fitted on the training volumes (or loaded from ``model_uri``); then
:func:`evaluate_cases`, the one loop: per volume ``predict`` -> post-processing and the method's own threshold
(:func:`~stego_core.evaluation.scoring.score_result`, extras such as a self-training teacher scored beside it) ->
per-volume metrics ``<key>/<case_id>``, the predicted NIfTI volumes (source affine and header kept), a MIP / error
figure and (``viewer: true``) ``viewer/<case>.html``; then ``<key>_mean`` / ``<key>_std``,
``evaluation_results.txt`` and ``.csv``, and a learned method's trained state as the run's model.
``baseline`` and ``reconstruct`` are this run; the pipeline, the sweeps and the benchmarks call it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from stego_core._checks import check_choice
from stego_core.config import SHIPPED_PRESETS
from stego_core.data.cases import (
    DataConfig,
    PreparedCase,
    ensure_cases,
    preprocess_case,
    split_cases,
)
from stego_core.data.io import Case, save_volume
from stego_core.engine.crf import CRFSettings
from stego_core.engine.postprocess import STEPS, PostprocessStep, steps_tag
from stego_core.engine.reconstruction import EngineConfig
from stego_core.evaluation.metrics import write_results
from stego_core.evaluation.guard import DomainConfig, mask_warnings, profile_warnings
from stego_core.evaluation.scoring import ANALYSIS_KEYS, score_result, summarize_rows
from stego_core.methods import METHODS, BuildContext, build_method
from stego_core.methods.registry import (
    CaseRefused,
    Method,
    Result,
    remember_state,
    resolve_settings,
    state_key,
)
from stego_core.platform import tracking
from stego_core.platform.params import settings_params
from stego_core.runtime import distributed
from stego_core.steps.base import RunSettings

log = logging.getLogger(__name__)


def check_data(settings: Any, data: DataConfig, split: str) -> None:
    """A method's settings may require a preprocessing (a self-training teacher chosen with a skull strip) or
    refuse a split (STEGO mapping clusters with labels refuses ``split: all``, which evaluates its training
    volumes)."""
    for hook, value in (("check_data", data), ("check_split", split)):
        check = getattr(settings, hook, None)
        if callable(check):
            check(value)


@dataclass(frozen=True)
class EvaluateConfig(RunSettings):
    """Which volumes to evaluate and how to reconstruct them.

    ``split: test`` evaluates the held-out volumes of the same seeded split that training uses
    (``test_fraction``, ``split_seed``); ``all`` evaluates every case. ``analysis`` adds the Betti-number errors,
    recall per vessel radius and (voxel size in mm known) HD95 / ASSD per case. ``crf: true`` refines every slice's
    probabilities with a dense CRF (``crf_settings``; needs ``pydensecrf2``) and adds ``+crf`` to the method.
    ``domain``: the domain the method or preset was chosen for (:class:`~stego_core.evaluation.guard.DomainConfig`;
    a preset file declares it): a case outside it, or a mask implausible for it, is warned about (a log line, the
    ``domain_warning`` tag, the ``domain_warnings`` count, ``cases.csv``, a mark in the viewer).
    ``viewer`` logs ``viewer/<case>.html`` per volume (:mod:`stego_core.report.viewer`; about 2 MB and a few seconds for
    a 320 x 320 x 247 volume).
    """

    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    split: str = "test"
    output: str = "outputs/evaluate"
    save_probabilities: bool = False
    progress: bool = True
    analysis: bool = True
    viewer: bool = True
    crf: bool = False
    crf_settings: CRFSettings = field(default_factory=CRFSettings)
    postprocess: tuple[PostprocessStep, ...] = ()
    domain: DomainConfig = field(default_factory=DomainConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.split, "split", ("test", "all"))
        seen_mask = False
        for st in self.postprocess:
            if STEPS[st.step].kind == "mask":
                seen_mask = True
            elif seen_mask:
                raise ValueError(f"postprocess: probability step {st.step!r} after a mask step; list smooth/crf "
                                 "first")

    def postprocess_steps(self) -> tuple[PostprocessStep, ...]:
        """The steps run after the segmenter: ``crf: true`` is a ``crf`` step in front of ``postprocess``."""
        crf = () if not self.crf or any(s.step == "crf" for s in self.postprocess) else (PostprocessStep("crf"),)
        return crf + tuple(self.postprocess)


@dataclass(frozen=True)
class BaselineConfig(EvaluateConfig):
    """The ``baseline`` entry point: any registered method by name with its settings (e.g. ``{q: 99.5}``),
    resolved and checked when the config is loaded (``--print-config`` shows every setting in force). A learned
    method is fitted on the training volumes of the split in the same run (or loaded: ``settings.model_uri``).
    ``log_model``: log a learned method's trained state as the run's model. ``preset: auto``: the preset is chosen
    from the cases' label-free profiles (:func:`choose_preset`; ``convention`` says which MRA preset: ``lumen`` or
    ``tree`` labels), said in the log and the run's tags, and its plan is the one logged."""

    method: str = "frangi"
    settings: Any = field(default_factory=dict)
    log_model: bool = True
    preset: str = ""
    convention: str = "lumen"
    preset_dir: str = "experiments/configs"
    output: str = "outputs/baseline"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.preset, "preset", ("", "auto"))
        check_choice(self.convention, "convention", tuple(AUTO_PRESETS["mra"]))
        object.__setattr__(self, "settings", resolve_settings(self.method, self.settings))
        check_data(self.settings, self.data, self.split)


@dataclass(frozen=True)
class ReconstructConfig(EvaluateConfig):
    """The ``reconstruct`` entry point: any trained learned method (the run id of a ``train``, ``baseline`` or
    ``main`` run that logged a model, ``runs:/<id>/model``, ``models:/<name>/<version>``) evaluated on held-out
    volumes with the settings it was trained with. ``engine.patch_size: null``
    means the model's own training crop size. ``amp``: bf16 autocast on a GPU; ``compile``: ``torch.compile``
    the model first (about a minute of compilation; pays off on whole volumes)."""

    model_uri: str = ""
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    output: str = "outputs/reconstruct"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.device, "device", ("auto", "cpu", "cuda"))



log = logging.getLogger(__name__)




#: ``preset: auto``: the preset file per modality the profile rule reads (and per labelling convention for MRA).
AUTO_PRESETS = {"2pm": {"dense": "best_2pm.yaml"}, "mra": {"lumen": "best_mra.yaml", "tree": "best_mra_tree.yaml"}}


def choose_preset(profiles: dict[str, dict[str, Any]], convention: str = "lumen") -> tuple[str, str]:
    """The preset file for a set of cases, from their label-free profiles alone: the modality that
    :func:`~stego_core.data.profile.guess_modality` reads from every case (a mixed set is refused, naming the cases
    of each modality), then the preset of that modality and labelling ``convention`` (:data:`AUTO_PRESETS`).

    Returns
    -------
    name : str
        The preset file's name (``best_2pm.yaml``).
    reason : str
        One line: the modality, the cases' votes and the rule.

    Examples
    --------
    >>> slab = {"shape_ratio": 0.03, "otsu_fraction": 0.05, "skewness": 4.0, "spacing_um": None}
    >>> choose_preset({"a": slab, "b": slab})[0]
    'best_2pm.yaml'
    """
    from stego_core.data.profile import guess_modality

    guesses = {case: guess_modality(p) for case, p in profiles.items()}
    modalities = {m for m, _ in guesses.values()}
    if not guesses:
        raise ValueError("preset=auto: no case to profile")
    if len(modalities) > 1:
        by = {m: sorted(c for c, (g, _) in guesses.items() if g == m) for m in modalities}
        raise ValueError("preset=auto: the cases look like different modalities (" + "; ".join(
            f"{m}: {', '.join(cs)}" for m, cs in sorted(by.items())) + "): run each folder with its own preset")
    (modality,) = modalities
    presets = AUTO_PRESETS[modality]
    name = presets.get(convention, next(iter(presets.values())))
    votes = sum(sum(v.values()) for _, v in guesses.values())
    reason = (f"{len(guesses)} case(s) read as {modality} by the profile rule (shape ratio < 0.1, Otsu fraction < "
              f"0.2, skewness > 1.7: two of three vote two-photon; {votes} two-photon votes of {3 * len(guesses)})"
              + (f", labelling convention {convention}" if modality == "mra" else ""))
    return name, reason


def resolve_auto_preset(cfg: BaselineConfig) -> tuple[BaselineConfig, str, str]:
    """``cfg`` with ``preset: auto`` replaced by the chosen preset file's method, settings, post-processing, skull
    strip and domain (the run's data root, split, output and experiment kept)."""
    from stego_core.config import config_path, load_config
    from stego_core.data.io import load_case
    from stego_core.data.profile import case_profile

    profiles = {}
    for case in select_cases(cfg):
        image = load_case(case).image
        unit = image.header.get_xyzt_units()[0] if image.header is not None else None
        zooms = tuple(float(z) for z in image.header.get_zooms()[:3]) if image.header is not None else None
        profiles[case.case_id] = case_profile(image.data, zooms, unit)
    name, reason = choose_preset(profiles, cfg.convention)
    # the working directory, preset_dir, then the presets installed with the package
    shipped = SHIPPED_PRESETS / name
    path = next((p for p in (config_path(name), Path(cfg.preset_dir) / name, shipped) if p.is_file()), None)
    if path is None:
        raise ValueError(f"preset=auto chose {name} but the file is neither in the working directory, nor in "
                         f"preset_dir={cfg.preset_dir}, nor among the installed presets ({shipped.parent})")
    log.info("preset=auto: %s (%s)", name, reason)
    keep = {"data.source": cfg.data.source, "data.root": cfg.data.root, "split": cfg.split,
            "test_fraction": cfg.test_fraction, "split_seed": cfg.split_seed, "test_cases": list(cfg.test_cases),
            "output": cfg.output, "experiment": cfg.experiment, "viewer": cfg.viewer, "analysis": cfg.analysis,
            "progress": cfg.progress, "save_probabilities": cfg.save_probabilities}
    chosen = load_config(BaselineConfig, path, keep)
    return dataclasses.replace(chosen, preset="", convention=cfg.convention), name, reason


@dataclass
class EvaluationResult:
    run_id: str
    rows: list[dict[str, Any]]
    summary: dict[str, float]
    output_dir: Path
    #: the logged model of a learned method fitted in this run (``runs:/<id>/model``), else None
    model_uri: str | None = None
    #: the method as evaluated (fitted): a pipeline evaluates it again with other post-processing
    method: Any = None
    #: the cases the domain guard warned about (the reasons: ``rows[i]["domain_warning"]``)
    warned: list[str] = field(default_factory=list)


def select_cases(cfg: EvaluateConfig) -> list[Case]:
    """The cases an evaluation covers (see :class:`EvaluateConfig`); refuses an empty selection."""
    cases = ensure_cases(cfg.data)
    if cfg.split != "all":
        cases = split_cases(cases, cfg.test_fraction, seed=cfg.split_seed, test_ids=cfg.test_cases)[1]
    if not cases:
        raise ValueError(f"no volume to evaluate in {cfg.data.root} with split={cfg.split} test_fraction="
                         f"{cfg.test_fraction}: use split=all, a larger test_fraction or test_cases=<case id>")
    return cases


def training_cases(cfg: EvaluateConfig) -> list[Case]:
    """The cases a learned method is fitted on: the training part of the split (every case with ``split: all``)."""
    cases = ensure_cases(cfg.data)
    if cfg.split == "all":
        return cases
    return split_cases(cases, cfg.test_fraction, seed=cfg.split_seed, test_ids=cfg.test_cases)[0]


def build_context(cfg: EvaluateConfig, monitor: Any, workdir: Path | None, *, device: str = "auto",
                  amp: bool = False, compile: bool = False, shared: dict | None = None) -> BuildContext:
    """What a method is built with in a tracked run: the engine, the run as its monitor, MLflow as its reader."""
    from stego_core.platform.weights import fetch_weights

    return BuildContext(engine=cfg.engine, monitor=monitor, load=tracking.load_learned, fetch=fetch_weights,
                        device=device, amp=amp, compile=compile, progress=cfg.progress, workdir=workdir,
                        shared=shared)


class PredictionStore:
    """Each volume's :class:`~stego_core.methods.registry.Result` kept on disk for the rows of one pipeline that
    differ only in post-processing (``stego``, ``stego+largest``, ``stego+crf``): the first row predicts, the
    others read. A key is the method, its resolved settings, the data and the engine (:meth:`key`); a result is
    one ``.npz`` file in ``folder`` (the pipeline's temporary folder, removed when it ends)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._files: dict[tuple[str, str], Path] = {}

    @staticmethod
    def key(method: Method, cfg: EvaluateConfig) -> str:
        """What makes two predictions of a volume equal: method and settings, preprocessing, engine."""
        import json

        from stego_core.config import to_dict

        return state_key(method.name, method.settings()) + json.dumps(
            [to_dict(cfg.data), to_dict(cfg.engine)], sort_keys=True, default=str)

    def get(self, key: str, case_id: str) -> Result | None:
        """The stored result of ``case_id`` under ``key``, or None."""
        path = self._files.get((key, case_id))
        if path is None:
            return None
        with np.load(path) as z:
            names = [str(n) for n in z["names"]]
            return Result(prob=z["prob"], extras={n: z[f"extra{i}"] for i, n in enumerate(names)})

    def put(self, key: str, case_id: str, result: Result) -> None:
        """Keep ``result`` of ``case_id`` under ``key``."""
        path = self.folder / f"{len(self._files)}.npz"
        names = list(result.extras)
        np.savez(path, prob=result.prob, names=np.array(names, dtype=str),
                 **{f"extra{i}": result.extras[n] for i, n in enumerate(names)})
        self._files[(key, case_id)] = path


def evaluate_cases(method: Method, cases: list[Case], cfg: EvaluateConfig, out_dir: Path, *,
                   log_to_mlflow: bool = True, name: str | None = None,
                   store: PredictionStore | None = None) -> list[dict[str, Any]]:
    """The one evaluation loop: reconstruct every case with ``method``, write predictions under ``out_dir``, and
    return one metrics row per case (:func:`~stego_core.evaluation.scoring.score_result`). Predictions are named
    ``<case>_<name>_pred.nii.gz`` (``name``: the run's method tag, default ``method.name``); a mask extra of the
    method's result (a self-training teacher) is written as ``<case>_<row>_pred.nii.gz``, ``<row>`` its row name
    (``method.extra_rows``), and drawn with the others in the stepped image ``<method>/slices``. A case the
    method refuses (:class:`~stego_core.methods.registry.CaseRefused`) gets a warning, a tag and a row without
    scores. With ``store``, a volume predicted before with the same method, settings, data and engine (a
    pipeline row that differs only in post-processing) is read back instead of predicted again.

    Launched as several processes (:mod:`stego_core.runtime.distributed`), each rank takes every ``world size``-th
    case and writes its predictions; rank 0 logs every case's scores, tags, predictions and figure into the one
    run, and every rank returns all rows in case order."""
    from stego_core.report.visualize import extras_figure, mip_figure

    name = name or method.name
    steps = cfg.postprocess_steps()
    extra_rows = dict(getattr(method, "extra_rows", {}) or {})
    rows = []
    key = PredictionStore.key(method, cfg) if store is not None else ""
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
        try:
            result = store.get(key, case.case_id) if store is not None else None
            if result is None:
                result = method.predict(prepared)
                if store is not None:
                    store.put(key, case.case_id, result)
        except CaseRefused as exc:
            log.warning("%s refused case %s: %s", name, case.case_id, exc)
            if log_to_mlflow:
                out.tag({"case_refused": "true", f"case_refused/{case.case_id}": str(exc)[:4000]})
                if distributed.is_main():
                    out.log()
            rows.append((index, {"case_id": case.case_id, "refused": str(exc)}, out))
            continue
        post, row = score_result(result, prepared, steps, threshold=method.threshold, slice_axis=cfg.engine.axis,
                                 crf_settings=cfg.crf_settings, analysis=cfg.analysis)
        warning = domain_warning(prepared, post.mask, cfg.domain, name)
        log.info("%s on %s (%d/%d): %s", name, case.case_id, index + 1, len(cases),
                 ", ".join(f"{k} {row[k]:.3f}" for k in ("dice", "cldice") if k in row) or "scored (no label)")
        if prepared.profile:
            row["profile"] = prepared.profile
        if warning:
            row["domain_warning"] = warning
            if log_to_mlflow:
                out.tag({"domain_warning": "true", f"domain_warning/{case.case_id}": warning[:4000]})
        predictions = out_dir / "predictions"
        out.artifacts.append((str(save_volume(predictions / f"{case.case_id}_{name}_pred.nii.gz",
                                              post.mask.astype(np.uint8), prepared.affine, prepared.header)),
                              "predictions"))
        for extra, mask in result.masks().items():
            stem = extra_rows.get(extra, f"{name}-{extra}")
            out.artifacts.append((str(save_volume(predictions / f"{case.case_id}_{stem}_pred.nii.gz",
                                                  mask.astype(np.uint8), prepared.affine, prepared.header)),
                                  "predictions"))
        if cfg.save_probabilities:
            out.artifacts.append((str(save_volume(predictions / f"{case.case_id}_{name}_prob.nii.gz", post.prob,
                                                  prepared.affine, prepared.header)), "predictions"))
        if log_to_mlflow:
            out.metrics = {f"{k}/{case.case_id}": v for k, v in row.items() if _is_number(v)}
            fig = mip_figure(prepared.image, prepared.label, post.mask, axis=cfg.engine.axis,
                             title=f"{method.name} on {case.case_id}")
            out.figure(fig, out_dir / "figures" / f"{case.case_id}_mip.png")
            if result.extras:
                out.image(extras_figure(prepared.image, result.extras, post.mask, axis=cfg.engine.axis,
                                        title=f"{case.case_id}: {name}"), f"{method.name}/slices", index)
            if cfg.viewer:
                out.artifacts.append((str(write_viewer(prepared, post.mask, name, out_dir, note=warning)),
                                      "viewer"))
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
    """What one evaluated case logs into the run: tags, metrics, stepped images and ``(file, folder)`` pairs."""

    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    artifacts: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    images: list[tuple[Any, str, int]] = dataclasses.field(default_factory=list)
    figures: list[tuple[Any, str]] = dataclasses.field(default_factory=list)
    logged: bool = False

    def tag(self, tags: dict[str, str]) -> None:
        """Set ``tags`` now (rank 0; before the case's prediction, which may fail) and keep them for :meth:`log`."""
        tracking.set_tags(tags)
        self.tags.update(tags)

    def figure(self, fig: Any, path: Path) -> None:
        """A figure for ``figures/``: logged by rank 0 as it is, saved under ``path`` by another rank (rank 0
        logs the file)."""
        if distributed.is_main():
            self.figures.append((fig, f"figures/{path.name}"))
        else:
            self.artifacts.append((_save_figure(fig, path), "figures"))

    def image(self, fig: Any, key: str, step: int) -> None:
        """A stepped image (``key`` at ``step``): drawn here as an array, logged by rank 0."""
        self.images.append((tracking.figure_array(fig), key, step))

    def log(self) -> None:
        if self.logged:
            return
        self.logged = True
        if self.tags:
            tracking.set_tags(self.tags)
        for path, folder in self.artifacts:
            tracking.log_artifact(path, folder)
        for fig, name in self.figures:
            tracking.log_figure(fig, name)
        self.figures = []  # logged and closed: nothing heavy goes to the gather
        for image, key, step in self.images:
            tracking.log_image(image, key, step=step)
        if self.metrics:
            tracking.log_metrics(self.metrics)


def _save_figure(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def domain_warning(prepared: PreparedCase, mask: np.ndarray, domain: DomainConfig, name: str) -> str:
    """The guard's reasons for one case as one line ("" when there are none), also logged as a warning naming the
    case and the preset (or method)."""
    reasons = profile_warnings(prepared.profile, domain) if prepared.profile else []
    reasons += mask_warnings(mask, prepared.brain_mask, domain)
    if not reasons:
        return ""
    text = "; ".join(reasons)
    who = f"preset {domain.name}" if domain.name != "any" else f"method {name}"
    log.warning("domain warning: case %s, %s: %s", prepared.case_id, who, text)
    return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def write_viewer(prepared: PreparedCase, mask: np.ndarray, name: str, out_dir: Path, *, note: str = "") -> Path:
    """Write ``viewer/<case>.html`` under ``out_dir``: the case's image as stored (as the pipeline's viewer shows
    it: the head, in the image's own intensities) with ``mask`` against its label
    (:func:`~stego_core.report.viewer.viewer_html`, one self-contained page that MLflow's artifact pane shows);
    ``note``: a domain warning shown on the page."""
    from stego_core.data.io import load_volume
    from stego_core.report.viewer import viewer_html

    image = load_volume(prepared.case.image).data
    page = viewer_html(image, {name: mask}, prepared.label, spacing_mm=prepared.spacing,
                       title=f"{name} on {prepared.case_id}", notes={name: note} if note else None)
    path = out_dir / "viewer" / f"{prepared.case_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


#: The profile fields ``cases.csv`` shows (:func:`stego_core.data.profile.case_profile`).
PROFILE_COLUMNS = ("unit", "spacing", "anisotropy", "shape", "shape_ratio", "skewness", "otsu_fraction",
                   "bright_fraction", "saturated_fraction", "border_ratio")


def write_case_table(rows: list[dict[str, Any]], out_dir: Path) -> Path:
    """``cases.csv``: per case its label-free profile and the modality the rule reads from it, the guard's
    verdict (``domain_warning``, empty when in domain), why a method refused it, and the headline scores."""
    import csv

    from stego_core.data.profile import guess_modality

    path = out_dir / "cases.csv"
    keys = ["case_id", "modality", *PROFILE_COLUMNS, "dice", "cldice", "predicted_fraction", "domain_warning",
            "refused"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            profile = row.get("profile") or {}
            extra = {"modality": guess_modality(profile)[0]} if profile else {}
            writer.writerow({**row, **{k: profile.get(k, "") for k in PROFILE_COLUMNS}, **extra})
    return path


def fit_method(method: Method, cfg: EvaluateConfig, evaluated: Sequence[Case]) -> None:
    """Fit ``method`` on the training volumes of ``cfg``'s split, inside the active run (datasets logged). The
    held-out volumes are handed over for the training curves only. A method that must not see the volumes it is
    evaluated on (``method.needs_disjoint_fit``) is refused when they overlap."""
    train = training_cases(cfg)
    overlap = {c.case_id for c in train} & {c.case_id for c in evaluated}
    if getattr(method, "needs_disjoint_fit", False) and (not train or overlap):
        raise ValueError(f"method {method.name!r} trains on volumes apart from the evaluated ones, but "
                         + ("there are none" if not train else f"{sorted(overlap)} are in both")
                         + ": use split=test with test_cases=... or a test_fraction that leaves training volumes")
    if not train:
        raise ValueError(f"method {method.name!r} needs training volumes: the split leaves none")
    source = cfg.data.root
    tracking.log_dataset(train, name=Path(source).name + "-train", context="training", source=source)
    with distributed.main_first():
        prepared = [preprocess_case(c, cfg.data) for c in train]
    validation = [preprocess_case(c, cfg.data) for c in evaluated] if _wants_validation(method) else []
    method.fit(prepared, validation)


def _wants_validation(method: Method) -> bool:
    return bool(getattr(method, "wants_validation", False))


def log_state(method: Method, *, name: str = "model") -> str | None:
    """Log a learned method's trained state with its whole resolved settings as the run's model; its URI."""
    state = method.state()
    if state is None:
        return None
    return tracking.log_learned(method.name, method.settings(), state, name=name)


def run_method(method: Method | str, cfg: EvaluateConfig, *, settings: Any = None, name: str | None = None,
               run_name: str | None = None, config: Any = None, nested: bool = False,
               tags: dict[str, str] | None = None, log_model: bool = True, context: dict | None = None,
               suffix: bool = True, store: PredictionStore | None = None) -> EvaluationResult:
    """One MLflow run that (for a learned method) fits and then reconstructs and scores a method on the cases of
    ``cfg``.

    Parameters
    ----------
    method : Method or str
        An already built (perhaps already fitted) method, or a registered name built here with ``settings`` and
        the run as its monitor.
    cfg : EvaluateConfig
        The volumes, split, engine and post-processing.
    name : str, optional
        The row / ``method`` tag (default: the method's name; with ``suffix``, post-processing steps add
        ``+smooth``...).
    config : dataclass, optional
        The entry point's resolved config, saved as ``plan.yaml`` and flattened into params (default ``cfg``).
    log_model : bool
        Log a learned method's state after a fit in this run.
    context : dict, optional
        ``device``, ``amp``, ``compile``, ``shared`` (fitted states by settings) for the method's context.
    store : PredictionStore, optional
        Volumes already predicted by an equal method (:func:`evaluate_cases`).
    """
    config = config if config is not None else cfg
    tail = steps_tag(cfg.postprocess_steps()) if suffix else ""  # e.g. "+crf", "+smooth+largest"
    base = name or (method if isinstance(method, str) else method.name)
    label, run_name = f"{base}{tail}", f"{run_name or base}{tail}"
    description = (f"Evaluation of {label} on the {cfg.split} volumes of {Path(cfg.data.root).name}: "
                   f"dice_mean / cldice_mean, per volume <key>/<case>, MIP and error overlays in figures/"
                   + (", a slice viewer per volume in viewer/ (open <case>.html)." if cfg.viewer else "."))
    kind = METHODS[method if isinstance(method, str) else method.name].kind
    with tracking.start_run(cfg.experiment, run_name=run_name, output_root=cfg.output, nested=nested,
                            description=description,
                            tags={"method": label, "step": "evaluate",
                                  "kind": "baseline" if kind == "classical" else kind, **(tags or {})}) as run:
        ctx = build_context(cfg, tracking.RunMonitor(), run.output_dir, **(context or {}))
        if isinstance(method, str):
            method = build_method(method, settings, ctx)
        tracking.log_plan(config, run.output_dir,
                          params=settings_params(method.settings(), method=method.name))
        with distributed.main_first():  # rank 0 writes generated phantoms; the others read them
            cases = select_cases(cfg)
        tracking.tag_case_keys(c.case_id for c in cases)  # metric keys of every case: distinct, mapped back
        tracking.log_dataset(cases, name=Path(cfg.data.root).name, context="evaluation", source=cfg.data.root)
        fitted_here = False
        uri = str(getattr(method.settings(), "model_uri", "") or "")
        if kind == "learned" and uri:
            tracking.set_tags({"model_uri": uri, **_training_run(uri)})
        elif kind == "learned" and method.state() is None:
            fit_method(method, cfg, cases)
            remember_state(method, ctx)
            fitted_here = True
        rows = evaluate_cases(method, cases, cfg, run.output_dir, name=label, store=store)
        refused = [r["refused"] for r in rows if "refused" in r]
        if rows and len(refused) == len(rows):  # a run that scored nothing does not report success
            raise ValueError(f"{label} scored none of the {len(rows)} volume(s): the method refused every one "
                             f"(first: {refused[0]})")
        _state_of_the_last_case(method, rows)
        extras = list(dict(getattr(method, "extra_rows", {}) or {}))
        summary = summarize_rows(rows, extras)
        warned = [r["case_id"] for r in rows if r.get("domain_warning")]
        tracking.log_metrics({"domain_warnings": float(len(warned))})
        if warned:
            tracking.set_tags({"domain_warning": "true"})
        if distributed.is_main():
            tracking.log_artifact(write_case_table(rows, run.output_dir))
        if summary:
            tracking.log_metrics(summary)
            scored = [r for r in rows if "dice" in r]
            if distributed.is_main():
                columns = [k for k in ANALYSIS_KEYS if all(k in r for r in scored)]  # a bin may be absent
                columns += [f"{e}_{k}" for e in extras for k in ("dice", "cldice") if all(f"{e}_{k}" in r
                                                                                       for r in scored)]
                txt, csv = write_results(scored, run.output_dir, method=label, extra_keys=columns)
                tracking.log_artifact(txt)
                tracking.log_artifact(csv)
        model_uri = None
        if kind == "learned" and log_model and not uri and (fitted_here or method.state() is not None):
            model_uri = log_state(method)
            if model_uri:
                tracking.set_tags({"model_uri": model_uri})
        return EvaluationResult(run_id=run.run_id, rows=rows, summary=summary, output_dir=run.output_dir,
                                model_uri=model_uri, method=method, warned=warned)


def _state_of_the_last_case(method: Method, rows: list[dict[str, Any]]) -> None:
    """A transductive method's state is that of the last volume it scored (``method.state_per_case``): launched
    as several processes, the rank that scored it hands it to the others, so the run logs the state one process
    would have logged."""
    if distributed.world_size() == 1 or not getattr(method, "state_per_case", False):
        return
    scored = [i for i, row in enumerate(rows) if "refused" not in row]
    if not scored:
        return
    owner = scored[-1] % distributed.world_size()  # the shard of evaluate_cases
    state = distributed.broadcast_object(method.state() if distributed.global_rank() == owner else None, src=owner)
    if state is not None and distributed.global_rank() != owner:
        method.set_case_state(state)


def _flat_settings(settings: Any) -> dict[str, Any]:
    from stego_core.config import flatten

    if dataclasses.is_dataclass(settings):
        return flatten(settings)
    return dict(settings or {})


def _training_run(model_uri: str) -> dict[str, str]:
    run = tracking.run_of_model(tracking.resolve_model_uri(model_uri))
    return {"training_run_id": run} if run else {}


def run_baseline(cfg: BaselineConfig, *, nested: bool = False, tags: dict[str, str] | None = None
                 ) -> EvaluationResult:
    """Evaluate the registered method ``cfg.method`` (fitted first when it learns) as one MLflow run;
    ``preset: auto`` chooses the preset from the cases' profiles first (:func:`resolve_auto_preset`)."""
    if cfg.preset == "auto":
        cfg, name, reason = resolve_auto_preset(cfg)
        tags = {**(tags or {}), "preset_auto": name.removesuffix(".yaml"), "preset_auto_reason": reason}
    return run_method(cfg.method, cfg, settings=cfg.settings, run_name=f"baseline-{cfg.method}", nested=nested,
                      tags=tags, log_model=cfg.log_model)


def run_reconstruct(cfg: ReconstructConfig, *, nested: bool = False) -> EvaluationResult:
    """Evaluate any trained learned method (``cfg.model_uri``) with the settings it was trained with, the same
    engine and metric keys as every other method, linked to the run that trained it."""
    if not cfg.model_uri:
        raise ValueError("model_uri is required, e.g. model_uri=<train run id> or runs:/<run id>/model")
    context = {"device": cfg.device, "amp": cfg.amp, "compile": cfg.compile}
    method = tracking.learned_method_of(cfg.model_uri)  # which method saved it (its model's metadata)
    return run_method(method, cfg, settings={"model_uri": cfg.model_uri}, run_name=f"reconstruct-{method}",
                      nested=nested, context=context, tags={"kind": method})
