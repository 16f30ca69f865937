"""One registry of segmentation methods, classical and learned, built by name (timm style).

A method turns a preprocessed volume into vessel probabilities; the evaluation, the pipeline, the ablation and
the benchmarks all call it the same way::

    method = build_method("gmm", {"n_components": 4}, engine)
    method.fit(train_cases)       # optional: classical methods fit nothing, learned ones may train here
    prob = method.predict(case)   # (I, J, K) float32 vessel probabilities in [0, 1]

Labels never enter a method: ``fit`` and ``predict`` read ``image`` and ``brain_mask`` of a
:class:`~stego_core.data.cases.PreparedCase`, never its ``label``.

Adding a method is one builder function and one :func:`register_method` line (see ``docs/design.md``).

>>> available_methods("classical")[:3]
('percentile', 'otsu', 'multiotsu')
>>> build_method("percentile", {"q": 98.0}).name
'percentile'
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from stego_core.methods.classical import SEGMENTERS, build_segmenter
from stego_core.config import EngineConfig
from stego_core.data.cases import PreparedCase
from stego_core.engine.reconstruction import predict_volume
from stego_core.engine.segmenter import Segmenter

__all__ = ["Method", "MethodEntry", "EngineMethod", "METHODS", "register_method", "available_methods",
           "build_method"]


@runtime_checkable
class Method(Protocol):
    """What every registered method provides.

    Attributes
    ----------
    name : str
        The ``method`` tag of its runs and its row in comparison tables.
    threshold : float
        Probabilities above it are vessel.
    """

    name: str
    threshold: float

    def fit(self, cases: Sequence[PreparedCase]) -> None:
        """Learn from preprocessed volumes (images and brain masks only); a no-op for methods that need no
        training."""
        ...

    def predict(self, case: PreparedCase, *, progress: bool = False) -> np.ndarray:
        """(I, J, K) float32 vessel probabilities in [0, 1] of one preprocessed volume."""
        ...

    def settings(self) -> dict[str, Any]:
        """Every setting in force, defaults included (logged as ``resolved.*`` params)."""
        ...


class EngineMethod:
    """Any engine :class:`~stego_core.engine.segmenter.Segmenter` as a method: nothing to fit across volumes (volume
    statistics are fitted per volume by the engine), prediction by the one sliding window
    (:func:`~stego_core.engine.reconstruction.predict_volume`)."""

    def __init__(self, segmenter: Segmenter, engine: EngineConfig) -> None:
        self.segmenter = segmenter
        self.engine = engine
        self.name = segmenter.name
        self.threshold = float(segmenter.threshold)

    def fit(self, cases: Sequence[PreparedCase]) -> None:
        """Nothing to learn across volumes."""

    def predict(self, case: PreparedCase, *, progress: bool = False) -> np.ndarray:
        return predict_volume(self.segmenter, case.image, case.brain_mask, self.engine, progress=progress,
                              spacing=case.spacing)

    def settings(self) -> dict[str, Any]:
        get = getattr(self.segmenter, "settings", None)
        return dict(get()) if callable(get) else {}


@dataclass(frozen=True)
class MethodEntry:
    """One registered method: how to build it from its settings and the engine, and what it is."""

    name: str
    kind: str  # "classical" (fits nothing across volumes) or "learned" (fit trains, or a trained model is loaded)
    build: Callable[[Mapping[str, Any], EngineConfig], Method]
    summary: str = ""


_REGISTRY: dict[str, MethodEntry] = {}
#: Registered methods by name (read-only view).
METHODS: Mapping[str, MethodEntry] = _REGISTRY  # type: ignore[assignment]


def register_method(entry: MethodEntry) -> MethodEntry:
    """Add a method to the registry (a name may be registered once)."""
    if entry.name in _REGISTRY:
        raise ValueError(f"method {entry.name!r} is registered already")
    if entry.kind not in ("classical", "learned"):
        raise ValueError(f"method kind {entry.kind!r} must be 'classical' or 'learned'")
    _REGISTRY[entry.name] = entry
    return entry


def available_methods(kind: str | None = None) -> tuple[str, ...]:
    """Registered names, all or of one ``kind`` (``classical`` / ``learned``)."""
    return tuple(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def build_method(name: str, settings: Mapping[str, Any] | None = None, engine: EngineConfig | None = None
                 ) -> Method:
    """Build a registered method by name.

    Parameters
    ----------
    name : str
        One of :func:`available_methods`.
    settings : mapping, optional
        The method's own settings (omitted ones take their documented defaults).
    engine : EngineConfig, optional
        The sliding window it predicts with (default: the one engine default).

    Raises
    ------
    ValueError
        Unknown name (with close matches), unknown or out-of-range setting (naming it).
    """
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name].build(dict(settings or {}), engine or EngineConfig())


# ------------------------------------------------------------------------------------- classical methods


def _classical(name: str) -> Callable[[Mapping[str, Any], EngineConfig], Method]:
    """The builder of baseline ``name``: slice-based filters run on the slices the engine feeds them."""

    def build(settings: Mapping[str, Any], engine: EngineConfig) -> Method:
        settings = dict(settings)
        if "slice_axis" in {f.name for f in dataclasses.fields(SEGMENTERS[name])}:
            if engine.axes is not None:  # tri-planar: thresholds fitted on slices along the first axis
                settings.setdefault("slice_axis", engine.axes[0])
            elif settings.setdefault("slice_axis", engine.axis) != engine.axis:
                raise ValueError(f"settings.slice_axis={settings['slice_axis']} differs from engine.axis="
                                 f"{engine.axis}; the filter must run on the slices the engine feeds it")
        return EngineMethod(build_segmenter(name, **settings), engine)

    return build


for _name, _cls in SEGMENTERS.items():
    register_method(MethodEntry(_name, "classical", _classical(_name),
                                (_cls.__doc__ or "").strip().splitlines()[0] if _cls.__doc__ else ""))


# --------------------------------------------------------------------------------------- learned methods


def is_run_id(text: str) -> bool:
    """Whether ``text`` is a bare MLflow run id (32 hex digits)."""
    import re

    return re.fullmatch(r"[0-9a-f]{32}", text or "") is not None


def resolve_model_uri(model_uri: str) -> str:
    """Accept a bare training run id as ``runs:/<id>/model``; other URIs (``runs:/``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``) and local model folders pass through.

    >>> resolve_model_uri("0123456789abcdef0123456789abcdef")
    'runs:/0123456789abcdef0123456789abcdef/model'
    """
    return f"runs:/{model_uri}/model" if is_run_id(model_uri) else model_uri


def load_model_segmenter(model_uri: str, *, device: str = "auto", amp: bool = False, compile: bool = False) -> Any:
    """A logged segmentation model (STEGO, a self-trained student) as an engine segmenter."""
    import torch

    from stego_core.platform import tracking
    from stego_core.methods.stego.inference import TorchSegmenter

    if not model_uri:
        raise ValueError("model_uri is required, e.g. model_uri=runs:/<train_run_id>/model")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_uri = resolve_model_uri(model_uri)
    try:
        model = tracking.load_pytorch_model(model_uri, map_location=device)
    except Exception as exc:
        raise ValueError(f"cannot load model_uri={model_uri!r}: {exc}") from exc
    return TorchSegmenter(model, device=device, amp=amp, compile=compile)


def _stego(settings: Mapping[str, Any], engine: EngineConfig) -> Method:
    """A trained STEGO model (``settings.model_uri``; trained by the ``train`` step): crops of the model's
    training size unless the engine names another."""
    settings = dict(settings)
    unknown = set(settings) - {"model_uri", "device", "amp", "compile"}
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)} for method 'stego'; valid settings: "
                         "['model_uri', 'device', 'amp', 'compile']")
    segmenter = load_model_segmenter(settings.get("model_uri", ""), device=settings.get("device", "auto"),
                                     amp=bool(settings.get("amp", False)),
                                     compile=bool(settings.get("compile", False)))
    if engine.patch_size is None:
        engine = dataclasses.replace(engine, patch_size=segmenter.model.patch_size)
    return EngineMethod(segmenter, engine)


register_method(MethodEntry("stego", "learned", _stego,
                            "STEGO: frozen ViT features, correspondence-distilled head, clusters mapped to vessel"))


# ------------------------------------------------------------------------------------------- self-training


class SelfTrainMethod:
    """A student network trained on a teacher's confident voxels (:mod:`stego_core.methods.selftrain`).

    ``transductive``: ``predict`` runs the teacher on the volume, trains a student on its pseudo-labels (and
    ``student.rounds`` rounds) and returns the combined mask. ``inductive``: ``fit`` trains one student on the
    teachers' pseudo-labels of the training volumes, ``predict`` applies it. The teacher's own output of the
    last volumes is kept in :attr:`teacher_masks` (for the comparison); no label is read anywhere.
    """

    name = "selftrain"
    threshold = 0.5

    def __init__(self, teacher: Method, teacher_steps: Sequence, student: Any, engine: EngineConfig, *,
                 mode: str = "transductive", on_step: Callable[[str, int, int, int, dict], None] | None = None
                 ) -> None:
        self.teacher = teacher
        self.teacher_steps = tuple(teacher_steps)
        self.student = student
        self.engine = engine
        self.mode = mode
        self.on_step = on_step
        self.models: list[Any] = []
        self.teacher_masks: dict[str, np.ndarray] = {}
        self.student_probs: dict[str, np.ndarray] = {}

    def teacher_output(self, case: PreparedCase) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's probability and post-processed mask of ``case``."""
        from stego_core.engine.postprocess import apply_postprocessing

        prob = self.teacher.predict(case)
        post = apply_postprocessing(prob, case.image, self.teacher_steps, case.spacing,
                                    threshold=self.teacher.threshold, brain_mask=case.brain_mask,
                                    slice_axis=self.engine.axis)
        return post.prob, post.mask

    def _callback(self, case_id: str) -> Callable[[int, int, int, dict], None] | None:
        if self.on_step is None:
            return None
        on_step = self.on_step
        return lambda rnd, axis, step, info: on_step(case_id, rnd, axis, step, info)

    @property
    def views(self) -> tuple[int, ...]:
        """The slicing axes of the students (one student per axis, their probabilities averaged)."""
        return tuple(self.student.views or (self.student.axis,))

    def fit(self, cases: Sequence[PreparedCase]) -> None:
        """Inductive: one student per view on the training volumes' pseudo-labels (kept when already loaded
        from a run); transductive: nothing here."""
        if self.mode != "inductive" or self.models:
            return
        from stego_core.methods.selftrain import pseudo_labels, train_student

        images, brains, targets, weights = [], [], [], []
        for case in cases:
            t_prob, t_mask = self.teacher_output(case)
            target, weight = pseudo_labels(t_prob, t_mask, case.brain_mask, self.student)
            images.append(case.image), brains.append(case.brain_mask)
            targets.append(target), weights.append(weight)
        callback = self._callback("train")
        self.models = [train_student(images, brains, targets, weights, self.student.replace(axis=view),
                                     on_step=None if callback is None else
                                     (lambda s, i, v=view: callback(1, v, s, i))) for view in self.views]

    def predict(self, case: PreparedCase, *, progress: bool = False) -> np.ndarray:
        from stego_core.methods.selftrain import combine, predict_student, self_train

        t_prob, t_mask = self.teacher_output(case)
        self.teacher_masks[case.case_id] = t_mask
        if self.mode == "inductive":
            if not self.models:
                raise ValueError("selftrain mode=inductive: fit the student on training volumes first")
            s_prob = sum(predict_student(m, case.image, case.brain_mask, self.student.replace(axis=v))
                         for m, v in zip(self.models, self.views)) / len(self.views)
            mask = combine(t_prob, t_mask, s_prob, case.image, self.student)
        else:
            mask, s_prob, self.models = self_train(case.image, case.brain_mask, t_prob, t_mask, self.student,
                                                   progress=progress, on_step=self._callback(case.case_id))
        self.student_probs[case.case_id] = s_prob
        return (mask & case.brain_mask if self.student.margin_vox == 0 else mask).astype(np.float32)

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, **dataclasses.asdict(self.student)}


def _selftrain(settings: Mapping[str, Any], engine: EngineConfig) -> Method:
    """``settings``: ``teacher`` (a :class:`~stego_core.config.TeacherConfig` mapping), ``student`` (a
    :class:`~stego_core.methods.selftrain.SelfTrainSettings` mapping), ``mode``, ``skull_strip`` (the data's)."""
    from stego_core.config import SelfTrainSettings, TeacherConfig, from_dict

    settings = dict(settings)
    unknown = set(settings) - {"teacher", "student", "mode", "skull_strip", "on_step", "model_uri"}
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)} for method 'selftrain'; valid settings: "
                         "['teacher', 'student', 'mode', 'skull_strip', 'model_uri']")
    teacher = settings.get("teacher") or TeacherConfig()
    teacher = teacher if isinstance(teacher, TeacherConfig) else from_dict(TeacherConfig, teacher,
                                                                            prefix="teacher.")
    teacher = teacher.resolved(settings.get("skull_strip"))
    student = settings.get("student") or SelfTrainSettings()
    student = student if isinstance(student, SelfTrainSettings) else from_dict(SelfTrainSettings, student,
                                                                               prefix="student.")
    if student.axis != engine.axis:
        student = student.replace(axis=engine.axis)
    method = SelfTrainMethod(build_method(teacher.method, teacher.settings, engine), teacher.postprocess, student,
                             engine, mode=settings.get("mode", "transductive"), on_step=settings.get("on_step"))
    if settings.get("model_uri"):  # a selftrain run's logged students, applied without training
        method.models = load_students(settings["model_uri"])
        method.mode = "inductive"
        if len(method.models) != len(method.views):
            raise ValueError(f"model_uri={settings['model_uri']!r} holds {len(method.models)} student(s) but "
                             f"student.views asks for {len(method.views)}: use that run's plan.yaml")
    return method


def load_students(run_id: str) -> list[Any]:
    """The students a ``selftrain`` run logged (one per view, tag ``model_uris``), in eval mode."""
    from stego_core.platform import tracking
    try:
        uris = tracking.client().get_run(run_id).data.tags["model_uris"].split(",")
    except Exception as exc:
        raise ValueError(f"model_uri={run_id!r} is not a selftrain run with logged students ({exc})") from None
    return [tracking.load_pytorch_model(uri).eval() for uri in uris]


register_method(MethodEntry("selftrain", "learned", _selftrain,
                            "a small U-Net trained on a label-free teacher's confident voxels (self-training)"))
