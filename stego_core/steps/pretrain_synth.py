"""The ``pretrain_synth`` step: ``synth``'s 3D U-Net trained on domain-randomized generated patches only, as one
MLflow run (issue 31). No real volume and no label is read.

The loop is :class:`stego_core.methods.synth_training.SynthTrainer` (pure torch); this module is the tracked step
around it. Logged: the plan (params and ``plan.yaml``); a grid of generated samples (``samples/sample_grid.png``
and the stepped image ``pretrain_synth/samples`` at step 0: middle slice, z-MIP and label of the first
``sample_grid`` training seeds); curves ``pretrain_synth/val_dice`` (Dice at 0.5 on held-out generator seeds),
``val_dice_mean``, ``loss``, ``lr``, ``train_minutes``, ``generation_minutes``, ``volumes``; every validation the
stepped image ``pretrain_synth/validation`` (held-out patches: image, label, prediction); checkpoints
``checkpoints/last.pt`` every ``train.checkpoint_every`` steps and at the end; the trained network as the run's
model (``runs:/<id>/model``, method ``synth``: ``baseline method=synth settings={model_uri: runs:/<id>/model}``)
and as ``weights/synth_vessels.pt`` with its provenance ``weights/synth_vessels.json`` (the files the package
ships: ``settings={weights: <file>}``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stego_core._checks import check_range
from stego_core.config import to_dict
from stego_core.methods.synth import SHIPPED_PROVENANCE, SHIPPED_WEIGHTS, SynthMethodSettings, save_weights
from stego_core.methods.synth_training import SynthTrainer, SynthTrainSettings, validation_figure
from stego_core.platform import tracking
from stego_core.steps.base import RunSettings

__all__ = ["PretrainSynthConfig", "PretrainSynthResult", "run_pretrain_synth"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PretrainSynthConfig(RunSettings):
    """The ``pretrain_synth`` entry point: ``train`` (network, generator, budget; defaults = the shipped
    weights' recipe, 6 minutes on one CPU thread), ``sample_grid`` generated samples pictured before training
    (0: none), ``log_model``: the network as the run's MLflow model."""

    train: SynthTrainSettings = field(default_factory=SynthTrainSettings)
    sample_grid: int = 16
    log_model: bool = True
    output: str = "outputs/pretrain_synth"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.sample_grid, "sample_grid", 0, 64)


@dataclass
class PretrainSynthResult:
    """What :func:`run_pretrain_synth` returns: the run, the weights file, the model URI, the last metrics."""

    run_id: str
    weights_path: Path
    model_uri: str | None
    metrics: dict[str, float]
    output_dir: Path
    model: Any


def run_pretrain_synth(cfg: PretrainSynthConfig, *, nested: bool = False,
                       tags: dict[str, str] | None = None) -> PretrainSynthResult:
    """Train ``synth``'s network on generated patches as one MLflow run (see the module docstring)."""
    from stego_core.data.synth import generate, sample_grid

    t = cfg.train
    commit = tracking.git_commit()  # the code that trains, read before the loop (the checkout may move on)
    with tracking.start_run(cfg.experiment, run_name="pretrain-synth", nested=nested, output_root=cfg.output,
                            description="synth: a 3D U-Net trained on domain-randomized synthetic patches only "
                                        "(val_dice: held-out generator seeds)",
                            tags={"method": "synth-pretrain", "step": "pretrain", **(tags or {})}) as run:
        out = Path(run.output_dir)
        tracking.log_plan(cfg, out)
        if cfg.sample_grid:
            seeds = [t.seed * 10 ** 6 + k for k in range(cfg.sample_grid)]
            samples = [generate(s, t.generator) for s in seeds]
            grid = sample_grid(seeds, out / "sample_grid.png", t.generator, samples=samples)
            tracking.log_artifact(grid, "samples")
            tracking.log_image(_png(grid), "pretrain_synth/samples", step=0)
            tracking.log_metrics({"pretrain_synth/sample_label_fraction":
                                  sum(s[2]["fraction"] for s in samples) / len(samples)}, step=0)

        def on_eval(step: int, metrics: dict[str, float], model: Any, val: list) -> None:
            tracking.log_metrics({f"pretrain_synth/{k}": v for k, v in metrics.items()}, step=step)
            tracking.log_image(validation_figure(model, val), "pretrain_synth/validation", step=step)
            log.info("pretrain_synth step %d: %s", step, json.dumps({k: round(v, 4) for k, v in metrics.items()}))

        def on_checkpoint(step: int, path: Path) -> None:
            tracking.log_artifact(path, "checkpoints")

        trainer = SynthTrainer(t, on_eval=on_eval, on_checkpoint=on_checkpoint, checkpoint_dir=out / "checkpoints")
        wall = time.perf_counter()
        metrics = trainer.run()
        metrics["wall_minutes"] = (time.perf_counter() - wall) / 60.0
        tracking.log_metrics({f"pretrain_synth/{k}": v for k, v in metrics.items()})
        weights = save_weights(trainer.model, out / "weights" / SHIPPED_WEIGHTS, t.network,
                               extra={"provenance": SHIPPED_PROVENANCE, "step": trainer.step})
        provenance = provenance_record(cfg, metrics, run.run_id, trainer.history, commit=commit)
        (out / "weights" / SHIPPED_PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
        tracking.log_artifact(out / "weights", "weights")
        model_uri = None
        if cfg.log_model:
            model_uri = tracking.log_learned("synth", SynthMethodSettings(), trainer.model)
            tracking.set_tags({"model_uri": model_uri})
        return PretrainSynthResult(run_id=run.run_id, weights_path=weights, model_uri=model_uri, metrics=metrics,
                                   output_dir=out, model=trainer.model)


def provenance_record(cfg: PretrainSynthConfig, metrics: dict[str, float], run_id: str,
                      history: list[dict[str, float]], *, commit: str = "") -> dict[str, Any]:
    """The provenance of trained weights: generator settings, training settings, steps, seed, commit, run,
    validation history; ``zero_shot`` is filled in when the weights are scored on real cases."""
    t = cfg.train
    return {
        "weights": SHIPPED_WEIGHTS,
        "format": "stego_core.methods.synth.save_weights: {'network': NetworkSettings, 'state_dict': ...}",
        "trained_on": "synthetic patches of stego_core.data.synth.generate only: no real image, no label",
        "steps": int(metrics.get("steps", 0)), "volumes": int(metrics.get("volumes", 0)), "seed": t.seed,
        "train_minutes": round(metrics.get("train_minutes", 0.0), 2),
        "generation_minutes": round(metrics.get("generation_minutes", 0.0), 2),
        "val_dice": metrics.get("val_dice"),
        "training": {k: v for k, v in to_dict(t).items() if k != "generator"},
        "generator": to_dict(t.generator) if dataclasses.is_dataclass(t.generator) else dict(t.generator),
        "commit": commit or tracking.git_commit(), "run_id": run_id,
        "validation_history": history,
        "zero_shot": [],
    }


def _png(path: Path) -> Any:
    """A PNG file as an (H, W, C) uint8 array (a stepped image)."""
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(str(path))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8) if img.dtype != np.uint8 else img
