"""One registry of segmentation methods, classical and learned, built by name (timm style).

Every method is one object with two calls, whatever it is::

    method = build_method("gmm", {"n_components": 4})
    method.fit(train_cases)        # classical: nothing; learned: trains (STEGO's head, a self-trained student)
    result = method.predict(case)  # Result: (I, J, K) vessel probability in [0, 1] and named extras

Everything that evaluates (the pipeline, ``baseline``, ``reconstruct``, the ablation, sweeps, benchmarks) loops
over method names through this registry and one evaluation loop (:mod:`stego_core.steps.evaluation`). Labels
never enter a method: ``fit`` and ``predict`` read ``image``, ``brain_mask`` and ``spacing`` of a
:class:`~stego_core.data.cases.PreparedCase`, never its ``label``.

A learned method's state (a ``torch.nn.Module``) is saved with its whole resolved settings and comes back through
one interface: a settings field ``model_uri`` names a saved state, :func:`build_method` reads it with the
context's ``load`` (the platform's MLflow reader: nothing here talks to MLflow) and the method never fits again.

Adding a method is one file with its settings dataclass, the method class and a :class:`MethodEntry`, plus one
:func:`register_method` line in :mod:`stego_core.methods` (see ``docs/design.md``, "Adding a method").

>>> available_methods("classical")[:3]
('percentile', 'otsu', 'multiotsu')
>>> build_method("percentile", {"q": 98.0}).name
'percentile'
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from stego_core.config import from_dict
from stego_core.data.cases import PreparedCase
from stego_core.engine.reconstruction import EngineConfig, predict_volume
from stego_core.engine.segmenter import Segmenter

__all__ = ["Result", "CaseRefused", "Monitor", "NullMonitor", "LearnedState", "BuildContext", "Method", "MethodEntry",
           "SegmenterMethod", "METHODS", "register_method", "available_methods", "resolve_settings",
           "build_method", "method_kind", "load_plugins", "PLUGINS_ENV", "state_key", "remember_state"]

log = logging.getLogger(__name__)


@dataclass
class Result:
    """What a method returns for one volume.

    Attributes
    ----------
    prob : (I, J, K) float32 ndarray in [0, 1]
        Vessel probability; the evaluation post-processes it and cuts it at the method's ``threshold``.
    extras : dict of str to (I, J, K) ndarray
        Named by-products: a bool array is a mask scored beside the method (e.g. ``teacher``: a self-training
        teacher's mask, its row in the comparison), a float array a probability shown in the run's picture.
    """

    prob: np.ndarray
    extras: dict[str, np.ndarray] = field(default_factory=dict)

    def masks(self) -> dict[str, np.ndarray]:
        """The extras that are masks (bool arrays), by name."""
        return {k: v for k, v in self.extras.items() if v.dtype == bool}


class CaseRefused(ValueError):
    """A method refuses one volume with a reason (e.g. a self-training teacher with an empty mask): the evaluation
    records the reason for that case and goes on with the others."""


@runtime_checkable
class Monitor(Protocol):
    """Where a method reports its progress (training curves, pictures, tags) without knowing MLflow."""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None: ...

    def image(self, figure: Any, key: str, step: int) -> None: ...

    def tags(self, tags: Mapping[str, str]) -> None: ...


class NullMonitor:
    """A monitor that records nothing (tests, benchmarks, a method used as another's teacher)."""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None:
        """Drop ``values``."""

    def image(self, figure: Any, key: str, step: int) -> None:
        """Close ``figure``."""
        import matplotlib.pyplot as plt

        plt.close(figure)

    def tags(self, tags: Mapping[str, str]) -> None:
        """Drop ``tags``."""


@dataclass(frozen=True)
class LearnedState:
    """A learned method's saved state as read back: which method, its whole resolved settings, the module."""

    method: str
    settings: Any
    state: Any
    source: str = ""


@dataclass(frozen=True)
class BuildContext:
    """What a method is built with besides its settings: the sliding window, where it reports, and the
    platform's readers (a method never imports MLflow).

    Attributes
    ----------
    engine : EngineConfig
        The one sliding window (axis, crops, blending, tri-planar fusion).
    monitor : Monitor
        Receives training curves and pictures.
    load : callable, optional
        ``model_uri -> LearnedState``: reads a saved learned state (``runs:/<id>``, ``models:/...``, a run id).
    fetch : callable, optional
        ``(uri, backbone) -> local path``: pretrained backbone weights logged by a run (``runs:/<id>``).
    device : str
        ``auto``, ``cpu`` or ``cuda``: where learned methods run.
    amp, compile : bool
        bf16 autocast on a GPU; ``torch.compile`` a model before inference.
    progress : bool
        Progress bars on a terminal (plain log lines otherwise).
    workdir : Path, optional
        A folder a learned method may write checkpoints into (the run's output folder).
    shared : dict, optional
        Fitted states by method and settings (:func:`state_key`), shared by the methods built with this context:
        a learned method whose name and settings equal one fitted before starts from its state (a pipeline's
        ``stego`` and ``stego+crf`` rows, or a STEGO row and a self-training teacher with the same settings,
        train once).
    """

    engine: EngineConfig = field(default_factory=EngineConfig)
    monitor: Monitor = field(default_factory=NullMonitor)
    load: Callable[[str], LearnedState] | None = None
    fetch: Callable[..., Any] | None = None
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    progress: bool = False
    workdir: Path | None = None
    shared: dict | None = None

    def replace(self, **changes: Any) -> BuildContext:
        return dataclasses.replace(self, **changes)


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

    def fit(self, cases: Sequence[PreparedCase], validation: Sequence[PreparedCase] = ()) -> None:
        """Learn from the training volumes (images and brain masks only); a no-op for classical methods and for
        a learned method whose state was loaded. ``validation``: held-out volumes a learned method may
        reconstruct to draw its training curves (their labels score curves only, never a choice)."""
        ...

    def predict(self, case: PreparedCase) -> Result:
        """The vessel probability of one preprocessed volume and its named extras."""
        ...

    def settings(self) -> Any:
        """Every setting in force, defaults included (the method's part of the plan)."""
        ...

    def state(self) -> Any | None:
        """A learned method's trained state (a ``torch.nn.Module``); None for classical methods."""
        ...

    def load_state(self, state: Any) -> None:
        """Take a trained state saved by :meth:`state` (nothing to fit afterwards)."""
        ...


@dataclass(frozen=True)
class MethodEntry:
    """One registered method.

    Attributes
    ----------
    name : str
    kind : {"classical", "learned"}
        Classical methods fit nothing across volumes; learned ones train in ``fit`` or load a saved state.
    build : callable
        ``(settings, context) -> Method``; ``settings`` is an instance of ``settings`` (the dataclass), or for
        ``settings=None`` the resolved mapping of :attr:`resolve`.
    settings : type, optional
        The frozen dataclass of its settings (defaults stated there, beside the method).
    resolve : callable, optional
        ``mapping -> mapping``: for a method without a settings dataclass (the classical ones), the full settings
        with defaults, validated (raises ``ValueError`` naming a bad key).
    summary : str
        One line for listings.
    """

    name: str
    kind: str
    build: Callable[[Any, BuildContext], Method]
    settings: type | None = None
    resolve: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None
    summary: str = ""


_REGISTRY: dict[str, MethodEntry] = {}
#: Registered methods by name (read-only view).
METHODS: Mapping[str, MethodEntry] = _REGISTRY  # type: ignore[assignment]
#: Environment variable listing extra modules (comma-separated) that register methods when imported: a plugin
#: outside this package, e.g. ``STEGO_METHOD_PLUGINS=mylab.vessels`` before ``mlflow run``.
PLUGINS_ENV = "STEGO_METHOD_PLUGINS"


def register_method(entry: MethodEntry) -> MethodEntry:
    """Add a method to the registry (a name may be registered once)."""
    if entry.name in _REGISTRY:
        if _REGISTRY[entry.name] == entry:
            return entry
        raise ValueError(f"method {entry.name!r} is registered already")
    if entry.kind not in ("classical", "learned"):
        raise ValueError(f"method kind {entry.kind!r} must be 'classical' or 'learned'")
    if entry.settings is not None and not dataclasses.is_dataclass(entry.settings):
        raise ValueError(f"method {entry.name!r}: settings must be a dataclass, got {entry.settings!r}")
    _REGISTRY[entry.name] = entry
    return entry


def load_plugins(env: Mapping[str, str] | None = None) -> list[str]:
    """Import the modules named in ``$STEGO_METHOD_PLUGINS`` (each registers its methods); returns them."""
    names = [n.strip() for n in (env if env is not None else os.environ).get(PLUGINS_ENV, "").split(",") if n.strip()]
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ValueError(f"{PLUGINS_ENV}: cannot import plugin module {name!r}: {exc}") from None
    return names


def available_methods(kind: str | None = None) -> tuple[str, ...]:
    """Registered names, all or of one ``kind`` (``classical`` / ``learned``)."""
    return tuple(n for n, e in _REGISTRY.items() if kind is None or e.kind == kind)


def _entry(name: str) -> MethodEntry:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=3)
        hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; valid names: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def method_kind(name: str) -> str:
    """``classical`` or ``learned``."""
    return _entry(name).kind


def resolve_settings(name: str, settings: Any = None, *, prefix: str = "settings.") -> Any:
    """A method's full settings from what a config gives (a mapping or the dataclass itself), validated.

    Raises
    ------
    ValueError
        Unknown method, unknown key or value out of range, naming the key (``settings.<key>``).
    """
    entry = _entry(name)
    if settings is None:
        settings = {}
    if entry.settings is not None:
        if isinstance(settings, entry.settings):
            return settings
        if dataclasses.is_dataclass(settings):
            settings = dataclasses.asdict(settings)
        if not isinstance(settings, Mapping):
            raise ValueError(f"{prefix.rstrip('.')} of method {name!r} must be a mapping, got {settings!r}")
        try:
            return from_dict(entry.settings, dict(settings), prefix=prefix)
        except TypeError as exc:
            raise ValueError(f"{prefix.rstrip('.')} of method {name!r}: {exc}") from None
    if not isinstance(settings, Mapping):
        raise ValueError(f"{prefix.rstrip('.')} of method {name!r} must be a mapping, got {settings!r}")
    return entry.resolve(settings) if entry.resolve is not None else dict(settings)


def state_key(name: str, settings: Any) -> str:
    """The key of a fitted state in :attr:`BuildContext.shared`: the method's name and its resolved settings."""
    import json

    from stego_core.config import to_dict

    plain = to_dict(settings) if dataclasses.is_dataclass(settings) else dict(settings or {})
    return name + ":" + json.dumps(plain, sort_keys=True, default=str)


def remember_state(method: Method, context: BuildContext) -> None:
    """Keep a fitted learned method's state in ``context.shared`` for methods built later with equal settings."""
    if context.shared is not None and method.state() is not None:
        context.shared[state_key(method.name, method.settings())] = method.state()


def build_method(name: str, settings: Any = None, context: BuildContext | EngineConfig | None = None) -> Method:
    """Build a registered method by name.

    Parameters
    ----------
    name : str
        One of :func:`available_methods`.
    settings : mapping or the method's settings dataclass, optional
        Omitted keys take their documented defaults. A learned method whose settings name a ``model_uri`` is
        built from that saved state: its saved settings (the whole plan it was trained with) replace these, and
        ``fit`` does nothing.
    context : BuildContext or EngineConfig, optional
        The sliding window and the platform's readers (default: the one engine default, no reader).

    Raises
    ------
    ValueError
        Unknown name (with close matches), unknown or out-of-range setting (naming it), a ``model_uri`` that
        holds another method's state or cannot be read.
    """
    if context is None:
        context = BuildContext()
    elif isinstance(context, EngineConfig):
        context = BuildContext(engine=context)
    entry = _entry(name)
    resolved = resolve_settings(name, settings)
    uri = str(getattr(resolved, "model_uri", "") or "")
    if entry.kind != "learned":
        return entry.build(resolved, context)
    if not uri:
        method = entry.build(resolved, context)
        shared = (context.shared or {}).get(state_key(name, resolved))
        if shared is not None:
            method.load_state(shared)
        return method
    if context.load is None:
        raise ValueError(f"method {name!r}: model_uri={uri!r} needs a reader of saved models (run it through an "
                         "entry point, which reads them from MLflow)")
    loaded = context.load(uri)
    if loaded.method != name:
        raise ValueError(f"model_uri={uri!r} holds a {loaded.method!r} model; method {name!r} expects a {name!r} "
                         f"model (use method={loaded.method} or reconstruct model_uri={uri})")
    saved = resolve_settings(name, loaded.settings)
    method = entry.build(dataclasses.replace(saved, model_uri=uri), context)
    method.load_state(loaded.state)
    return method


# ------------------------------------------------------------------------------------ engine segmenters


class SegmenterMethod:
    """An engine :class:`~stego_core.engine.segmenter.Segmenter` as a method: nothing to fit across volumes
    (volume statistics are fitted per volume by the engine), prediction by the one sliding window
    (:func:`~stego_core.engine.reconstruction.predict_volume`)."""

    def __init__(self, segmenter: Segmenter, engine: EngineConfig, *, progress: bool = False) -> None:
        self.segmenter = segmenter
        self.engine = engine
        self.progress = progress
        self.name = segmenter.name
        self.threshold = float(segmenter.threshold)

    def fit(self, cases: Sequence[PreparedCase], validation: Sequence[PreparedCase] = ()) -> None:
        """Nothing to learn across volumes."""

    def predict(self, case: PreparedCase) -> Result:
        # physical scales are converted with the voxel size in mm when the header's unit says so, else in voxels
        if hasattr(self.segmenter, "set_spacing"):
            self.segmenter.set_spacing(case.spacing_mm)
        return Result(predict_volume(self.segmenter, case.image, case.brain_mask, self.engine,
                                     progress=self.progress, spacing=case.spacing_mm))

    def settings(self) -> dict[str, Any]:
        get = getattr(self.segmenter, "settings", None)
        return dict(get()) if callable(get) else {}

    def state(self) -> None:
        return None

    def load_state(self, state: Any) -> None:
        raise ValueError(f"method {self.name!r} is classical: it has no trained state to load")
