"""STEGO as a registered method: ``fit`` trains the head and its clusters, ``predict`` reconstructs a volume.

``fit(train, validation)`` -> :func:`~stego_core.methods.stego.training.train_stego` (the frozen backbone first:
missing weights fail within seconds) -> a :class:`~stego_core.methods.stego.inference.StegoSegmenterModel`, the
method's state. ``predict(case)`` slides the model over the case's slices with the engine's one window
(:func:`~stego_core.engine.reconstruction.predict_volume`), crops of the model's training side by default.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import lightning as L

from stego_core.data.cases import PreparedCase
from stego_core.engine.reconstruction import predict_volume
from stego_core.features.backbones import build_backbone
from stego_core.methods.registry import BuildContext, MethodEntry, Result
from stego_core.methods.stego.inference import StegoSegmenterModel, TorchSegmenter
from stego_core.methods.stego.settings import StegoSettings
from stego_core.methods.stego.training import device_for, train_stego
from stego_core.runtime import distributed

__all__ = ["StegoMethod", "STEGO"]


class StegoMethod:
    """STEGO (Hamilton et al., ICLR 2022): frozen ViT features, a head trained by distilling feature
    correspondences, codes clustered, clusters mapped to vessel by a recorded rule."""

    name = "stego"
    #: the held-out volumes draw its training curves (their labels score the curves, they choose nothing)
    wants_validation = True

    def __init__(self, settings: StegoSettings, context: BuildContext) -> None:
        self._settings = settings
        self.context = context
        self.threshold = float(settings.model.threshold)
        self.model: StegoSegmenterModel | None = None
        self._segmenter: TorchSegmenter | None = None

    def settings(self) -> StegoSettings:
        return self._settings

    def state(self) -> StegoSegmenterModel | None:
        return self.model

    def load_state(self, state: Any) -> None:
        if not isinstance(state, StegoSegmenterModel):
            raise ValueError(f"method 'stego' expects a STEGO model, got a {type(state).__name__}")
        self.model = state
        self.threshold = float(state.threshold)
        self._segmenter = None
        self.context.monitor.tags({"cluster_mapping_rule": state.mapping_rule})

    def fit(self, cases: Sequence[PreparedCase], validation: Sequence[PreparedCase] = ()) -> None:
        """Train on ``cases`` (nothing when a trained model was loaded); ``validation`` draws the curves."""
        if self.model is not None:
            return
        s, ctx = self._settings, self.context
        distributed.init_from_env(devices=s.trainer.devices, num_nodes=s.trainer.num_nodes)
        L.seed_everything(s.train.seed, workers=True, verbose=False)
        backbone = self.setup()
        workdir = ctx.workdir if ctx.workdir is not None else _scratch()
        overlap = bool({c.case_id for c in cases} & {c.case_id for c in validation})
        fit = train_stego(s, backbone, cases, validation, monitor=ctx.monitor, workdir=workdir,
                          device=device_for(s.train.accelerator), overlap=overlap)
        # the last validation, named to sort after the curves (train/*, val/*) in the run's charts and columns
        ctx.monitor.metrics({k.replace("val/", "val_final/"): v for k, v in fit.metrics.items()})
        if distributed.is_main():
            (workdir / "checkpoints" / "best_k.json").write_text(json.dumps(
                {"monitor": "val/cldice", "best_k": fit.best_k, "best": fit.best}, indent=2))
        self.load_state(fit.model)

    def setup(self) -> Any:
        """The frozen backbone, built once: missing or wrong weights fail here, within seconds, before any data
        is touched (the ``train`` step calls it first)."""
        if getattr(self, "_backbone", None) is None:
            s, ctx = self._settings, self.context
            weights = s.model.weights
            if isinstance(weights, str) and weights.startswith("runs:/"):
                ctx.monitor.tags({"pretrain_run_id": weights[len("runs:/"):].split("/")[0]})
                if ctx.fetch is None:
                    raise ValueError(f"model.weights={weights!r} needs the platform's artifact reader")
                weights = ctx.fetch(weights, s.model.backbone)
            self._backbone = build_backbone(s.model.backbone, weights=weights, res=s.model.res,
                                            standardize=s.model.classical_standardize)
        return self._backbone

    def _window(self) -> TorchSegmenter:
        if self.model is None:
            raise ValueError("method 'stego' has no model: fit it on training volumes or give settings.model_uri")
        if self._segmenter is None:
            device = self.context.device
            if device == "auto":
                device = device_for("auto")
            self._segmenter = TorchSegmenter(self.model, device=device, amp=self.context.amp,
                                             compile=self.context.compile)
        return self._segmenter

    def engine(self) -> Any:
        """The sliding window it predicts with: the context's, with the model's crop side when none is set."""
        engine = self.context.engine
        if engine.patch_size is None and self.model is not None:
            engine = dataclasses.replace(engine, patch_size=self.model.patch_size)
        return engine

    def predict(self, case: PreparedCase) -> Result:
        segmenter = self._window()
        engine = self.engine()
        trained = dict(getattr(self.model, "preprocessing", {}) or {})
        asked = {**case.preprocessing, "axis": engine.axis}
        mismatch = {k: (trained[k], v) for k, v in asked.items() if k in trained and trained[k] != v}
        if mismatch:
            raise ValueError("the STEGO model was trained with other preprocessing than this evaluation asks for: "
                             + ", ".join(f"{k}: trained {a!r}, asked {b!r}" for k, (a, b) in mismatch.items())
                             + "; set data.skull_strip / data.standardize / engine.axis to the training run's")
        return Result(predict_volume(segmenter, case.image, case.brain_mask, engine, progress=self.context.progress,
                                     spacing=case.spacing))


def _scratch() -> Any:
    import tempfile
    from pathlib import Path

    return Path(tempfile.mkdtemp(prefix="stego-fit-"))


def _build(settings: StegoSettings, context: BuildContext) -> StegoMethod:
    return StegoMethod(settings, context)


#: The registry entry (registered in :mod:`stego_core.methods`).
STEGO = MethodEntry("stego", "learned", _build, settings=StegoSettings,
                    summary="STEGO: frozen ViT features, correspondence-distilled head, clusters mapped to vessel")
