"""One registry of segmentation methods, classical and learned, built by name (timm style).

A method turns a preprocessed volume into vessel probabilities; the evaluation, the pipeline, the ablation and
the benchmarks all call it the same way::

    method = build_method("gmm", {"n_components": 4}, engine)
    method.fit(train_cases)       # optional: classical methods fit nothing, learned ones may train here
    prob = method.predict(case)   # (I, J, K) float32 vessel probabilities in [0, 1]

Labels never enter a method: ``fit`` and ``predict`` read ``image`` and ``brain_mask`` of a
:class:`~stego_core.data.PreparedCase`, never its ``label``.

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

from stego_core.baselines import SEGMENTERS, build_segmenter
from stego_core.config import EngineConfig
from stego_core.data import PreparedCase
from stego_core.reconstruction import predict_volume
from stego_core.segmenter import Segmenter

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
    """Any engine :class:`~stego_core.segmenter.Segmenter` as a method: nothing to fit across volumes (volume
    statistics are fitted per volume by the engine), prediction by the one sliding window
    (:func:`~stego_core.reconstruction.predict_volume`)."""

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


def resolve_model_uri(model_uri: str) -> str:
    """Accept a bare training run id as ``runs:/<id>/model``; other URIs (``runs:/``, ``models:/<name>/<version>``,
    ``models:/<name>@<alias>``) and local model folders pass through.

    >>> resolve_model_uri("0123456789abcdef0123456789abcdef")
    'runs:/0123456789abcdef0123456789abcdef/model'
    """
    import re

    return f"runs:/{model_uri}/model" if re.fullmatch(r"[0-9a-f]{32}", model_uri) else model_uri


def load_model_segmenter(model_uri: str, *, device: str = "auto", amp: bool = False, compile: bool = False) -> Any:
    """A logged segmentation model (STEGO, a self-trained student) as an engine segmenter."""
    import torch

    from stego_core import tracking
    from stego_core.inference import TorchSegmenter

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
