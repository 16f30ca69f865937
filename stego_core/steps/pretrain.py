"""The ``pretrain`` step: DINO self-distillation of a small ViT on unlabelled 2D crops, as one MLflow run.

``volumes -> preprocessed volumes (labels dropped) -> crops -> label-free crop weights -> multi-crop views ->
student / EMA teacher -> teacher backbone (.safetensors + spec)``. The teacher backbone plugs into ``train`` as
``model.backbone=<name> model.weights=runs:/<this run id>`` (resolved by
:func:`stego_core.platform.weights.fetch_weights`) or ``model.weights=<file>.safetensors``. The data, the learner
and the loop are :mod:`stego_core.features.pretraining` (pure torch); this module is the tracked step around them:
:func:`run_pretrain` opens the run, logs the plan, loads the crops, builds the learner (or takes it back from a
checkpoint), runs the loop with a monitor that writes into the run, and logs the teacher's weights.

Logged: the plan as params and ``plan.yaml``, except :data:`ATTEMPT_TAGS` (``max_steps``, ``max_minutes``),
which are tags set again by every attempt; curves ``pretrain/loss``, ``pretrain/teacher_entropy`` (collapse
check: near ``log(out_dim)`` = uniform, near 0 = one prototype), ``pretrain/center_norm``, ``pretrain/lr``,
``pretrain/momentum``, ``pretrain/teacher_temp``, ``pretrain/weight_decay``, ``pretrain/crops_per_s``; every
``figure_every`` steps a figure of fixed crops (the highest-weighted ones; no label involved) with a 3-component
PCA of the teacher's patch features and its last-block CLS attention, as the MLflow image
``pretrain/teacher_features`` with its step; checkpoints (``checkpoints/last.pt`` every ``checkpoint_every``
steps and at the end, ``checkpoints/interrupted.pt`` when SIGTERM / SIGINT stops the run); the teacher
backbone as ``backbone/teacher_backbone.safetensors`` with ``backbone/spec.json``; the tag ``end_reason``.

``resume=<run id>`` continues that run from its latest checkpoint, after checking, before anything is changed,
that the run exists, is a pretraining run, is not running, has a checkpoint and has the same plan (only
:data:`RESUMABLE` keys may differ); a refused resume leaves the run as it was.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from stego_core._checks import check_choice, check_range
from stego_core.config import flatten, to_dict
from stego_core.data.sampling import SamplingConfig
from stego_core.features.backbones import BACKBONES, BackboneSpec, get_spec
from stego_core.features.dino import AugmentConfig, DinoModel
from stego_core.features.pretraining import (
    DinoLearner,
    PretrainEnd,
    PretrainLoop,
    Probe,
    build_learner,
    pretraining_crops,
    save_backbone,
)
from stego_core.features.vit import WEIGHTS_ARTIFACT
from stego_core.platform import tracking
from stego_core.platform.params import always_logged, key_params
from stego_core.runtime import distributed, faults
from stego_core.runtime.distributed import TrainerSettings
from stego_core.steps.base import DataSettings, RunSettings


@dataclass(frozen=True)
class PretrainConfig(DataSettings, RunSettings):
    """The ``pretrain`` entry point: DINO (Caron et al., ICCV 2021) of an in-domain ViT on unlabelled crops.

    Defaults follow the DINO recipe adapted to grey crops (teacher temperature 0.04 -> 0.07, student 0.1,
    centre momentum 0.9, EMA 0.996 -> 1 by a cosine, AdamW ``lr * batch / 256`` with warm-up and cosine decay,
    weight decay 0.04 -> 0.4, clipping 3.0, last layer frozen at first) with a smaller prototype count for CPUs.
    ``max_minutes > 0`` stops earlier (schedules still span ``max_steps``; tagged ``stopped_early``).
    ``resume=<run id>`` continues that pretraining run from its latest checkpoint (last or interrupted).
    ``trainer`` (:class:`TrainerSettings`): under several processes ``batch_size`` is per process, each draws
    its own crops, gradients are averaged and the teacher's centre is the mean over all ranks, so the student,
    the EMA teacher and the centre stay the same on every rank; ``lr`` scales with the global batch.
    ``trainer.precision: auto`` (or ``bf16-mixed``) uses bf16 autocast on a GPU, float32 on CPU.
    """

    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    backbone: str = "mra_vit_t4_p2"
    seed: int = 0
    max_steps: int = 2000
    max_minutes: float = 0.0
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_steps: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    clip_grad: float = 3.0
    freeze_last_layer_steps: int = 100
    out_dim: int = 4096
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    teacher_temp_start: float = 0.04
    teacher_temp: float = 0.07
    teacher_temp_warmup_steps: int = 300
    student_temp: float = 0.1
    center_momentum: float = 0.9
    momentum: float = 0.996
    log_every: int = 10
    figure_every: int = 500
    n_figure_crops: int = 8
    checkpoint_every: int = 200
    accelerator: str = "auto"
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    progress: bool = True
    resume: str = ""
    output: str = "outputs/pretrain"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_steps", "batch_size", "out_dim", "hidden_dim", "bottleneck_dim", "log_every",
                     "checkpoint_every", "n_figure_crops"):
            check_range(getattr(self, name), f"{name}", 1)
        for name in ("warmup_steps", "freeze_last_layer_steps", "teacher_temp_warmup_steps", "figure_every"):
            check_range(getattr(self, name), f"{name}", 0)
        for name in ("lr", "teacher_temp_start", "teacher_temp", "student_temp"):
            check_range(getattr(self, name), f"{name}", 0.0, low_inclusive=False)
        check_range(self.min_lr, "min_lr", 0.0)
        check_range(self.max_minutes, "max_minutes", 0.0)
        check_range(self.clip_grad, "clip_grad", 0.0)
        check_range(self.center_momentum, "center_momentum", 0.0, 1.0)
        check_range(self.momentum, "momentum", 0.0, 1.0)
        check_choice(self.accelerator, "accelerator", ("auto", "cpu", "cuda", "gpu"))
        check_choice(self.trainer.precision, "trainer.precision", ("auto", "bf16-mixed", "32-true"))


log = logging.getLogger(__name__)

__all__ = ["ATTEMPT_TAGS", "RESUMABLE", "PretrainConfig", "PretrainResult", "resume_state", "run_pretrain"]

#: Checkpoints of a run (folder ``checkpoints/``): the periodic and final one, and the one written when a signal
#: stops the run. A resume takes whichever holds the later step.
CHECKPOINTS = ("last.pt", "interrupted.pt")
#: Settings of one attempt, recorded as tags (current after a resume) rather than params (which cannot change).
ATTEMPT_TAGS = ("max_steps", "max_minutes")
#: Settings that may differ between the run and a resume of it; any other difference refuses the resume.
RESUMABLE = (*ATTEMPT_TAGS, "resume", "progress", "accelerator", "trainer.precision", "trainer.strategy", "output",
             "experiment", "log_every",
             "figure_every", "n_figure_crops", "checkpoint_every")
#: Tags describing how an attempt ended, removed when the run is resumed.
_END_TAGS = ("end_reason", "error", "stopped_early", "collapse_warning", "resume_with", "interrupted_at_step")


@dataclass
class PretrainResult:
    run_id: str
    weights_path: Path
    weights_uri: str
    metrics: dict[str, float]
    output_dir: Path
    #: the trained student and EMA teacher, and the teacher's centre ``(1, out_dim)``, as this process holds them
    model: DinoModel | None = None
    center: torch.Tensor | None = None


def _device(accelerator: str) -> str:
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def resume_state(cfg: PretrainConfig) -> dict[str, Any]:
    """The checkpoint that ``cfg.resume`` continues from, after every check a resume needs.

    Reads only: the run is not touched and no folder is made unless every check passes (a logged checkpoint
    is then downloaded into the run's output folder).

    Raises
    ------
    ValueError
        No such run, not a pretraining run, still running, another plan, or no checkpoint.
    """
    run_id = cfg.resume
    client = tracking.client()
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001 - MLflow says RESOURCE_DOES_NOT_EXIST in several ways
        raise ValueError(f"resume={run_id!r}: there is no run with this id in the tracking store "
                         f"{tracking.mask_secrets(tracking.tracking_uri())}") from None
    tags, name = run.data.tags, run.info.run_name
    if tags.get("step") != "pretrain":
        kind = tags.get("step") or tags.get("method") or "untagged"
        raise ValueError(f"resume={run_id!r} is a {kind!r} run ({name!r}), not a pretraining run; only a `pretrain` "
                         f"run can be resumed by `pretrain` (the run was left as it was)")
    if run.info.status == "RUNNING" and faults.owner_alive(tags):
        raise ValueError(f"resume={run_id!r}: the run is still running (process {tags.get('owner_pid')}); stop it "
                         f"first (the run was left as it was)")
    # a setting the run did not log was at its default (a run logs what differs from the defaults and the
    # settings always logged; a run without those logged no plan: nothing to compare)
    params, logged_now = run.data.params, key_params(cfg)
    differ = [f"{k} (run {params.get(k, 'its default')!r}, now {tracking.param_text(v)!r})"
              for k, v in flatten(cfg).items() if k not in RESUMABLE
              and (params[k] != tracking.param_text(v) if k in params
                   else k in logged_now and not always_logged(k) and "backbone" in params)]
    if differ:
        raise ValueError(f"resume={run_id!r}: the plan differs from the run's in {'; '.join(differ[:4])}"
                         f"{' and more' if len(differ) > 4 else ''}. A resume continues the same plan (only "
                         f"{', '.join(ATTEMPT_TAGS)} and the like may change): pass the run's plan.yaml as --config "
                         f"(the run was left as it was)")
    folder = Path(cfg.output) / run_id / "checkpoints"
    found = [folder / n for n in CHECKPOINTS if (folder / n).is_file()]
    if not found:
        with contextlib.suppress(Exception):
            logged = {a.path for a in client.list_artifacts(run_id, "checkpoints")}
            found = [tracking.download_artifacts(f"runs:/{run_id}/checkpoints/{n}", folder)
                     for n in CHECKPOINTS if f"checkpoints/{n}" in logged]
    if not found:
        raise ValueError(f"resume={run_id!r}: the run has no checkpoint (none in {folder}, none logged): it "
                         f"stopped before its first one; start a new run instead (the run was left as it was)")
    states = [torch.load(path, map_location="cpu", weights_only=False) for path in found]
    return max(states, key=lambda state: int(state["step"]))


def run_pretrain(cfg: PretrainConfig, *, nested: bool = False, run_name: str | None = None,
                 tags: dict[str, str] | None = None, probe: Probe | None = None,
                 probe_every: int = 100) -> PretrainResult:
    """DINO pretraining of ``cfg.backbone`` as one MLflow run (or continuing run ``cfg.resume``; see the module
    docstring). SIGTERM / SIGINT (:class:`stego_core.runtime.faults.Interrupted`) stop it between two steps with
    ``checkpoints/interrupted.pt`` written and logged; the run ends KILLED and ``resume=<run id>`` continues it.

    ``probe`` (optional, for studies of the pretraining itself) is called with the teacher backbone (in eval
    mode) before the first step of a new run, every ``probe_every`` steps and at the end; the metrics it returns
    are logged at that step. The step itself never sees what the probe reads (a label-scored probe stays a
    measurement: ``benchmarks/dino_probe.py``)."""
    spec = _pretrainable_spec(cfg.backbone)
    n_ranks = distributed.init_from_env(devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    device = _device(cfg.accelerator)
    resume = cfg.resume or None
    with distributed.main_first():  # rank 0 fetches a logged checkpoint; the others then read it
        state = resume_state(cfg) if resume is not None else None  # every check before the run is touched
    with tracking.start_run(cfg.experiment, run_name=None if resume else run_name or f"pretrain-{cfg.backbone}",
                            nested=nested, output_root=cfg.output, run_id=resume, description=_description(cfg),
                            tags={"method": "dino-pretrain", "step": "pretrain", "backbone": cfg.backbone,
                                  **(tags or {})}) as run:
        _log_attempt(cfg, run.output_dir, resumed=resume is not None)
        torch.manual_seed(cfg.seed)
        with distributed.main_first():  # rank 0 writes generated phantoms; the others read them
            crops, weights, cases = pretraining_crops(cfg.data, cfg.slicing, cfg.sampling)
        if resume is None:
            tracking.log_dataset(cases, name=Path(cfg.data.root).name, context="pretraining", source=cfg.data.root)
        tracking.set_tags({"device": device, "sampling": cfg.sampling.method, "n_crops": str(len(crops))})
        learner = build_learner(spec, crops, weights, cfg, device=device, n_ranks=n_ranks,
                                bf16=device == "cuda" and cfg.trainer.precision in ("auto", "bf16-mixed"))
        start = 0 if state is None else _resume(learner, state, cfg)
        loop = PretrainLoop(learner, cfg, monitor=tracking.RunMonitor(), checkpoint_dir=run.output_dir / "checkpoints",
                            config=to_dict(cfg), probe=probe, probe_every=probe_every)
        try:
            end = loop.run(start)
        except faults.Interrupted:
            _keep_interrupted(loop, run.run_id)
            raise
        path = _log_teacher(learner, end, run.run_id, run.output_dir)
        return PretrainResult(run_id=run.run_id, weights_path=path, weights_uri=f"runs:/{run.run_id}",
                              metrics=end.metrics, output_dir=run.output_dir, model=learner.model,
                              center=learner.criterion.center.detach().cpu())


def _pretrainable_spec(name: str) -> BackboneSpec:
    """The spec of an in-domain ViT (``trainable``); anything else is refused, naming those."""
    spec = get_spec(name)
    if spec.kind != "vit" or not spec.trainable:
        trainable = sorted(n for n, s in BACKBONES.items() if s.trainable)
        raise ValueError(f"pretrain.backbone={name!r} is not an in-domain ViT; choose one of {', '.join(trainable)}")
    return spec


def _description(cfg: PretrainConfig) -> str:
    return (f"DINO pretraining of {cfg.backbone} on unlabelled crops of {Path(cfg.data.root).name}; "
            f"curves pretrain/*, stepped figures of attention and feature PCA, checkpoints/, the teacher "
            f"backbone as `backbone/teacher_backbone.safetensors` (use it as model.weights=runs:/<this run "
            f"id>).")


def _log_attempt(cfg: PretrainConfig, output_dir: Path, *, resumed: bool) -> None:
    """The plan as params (once: the same values again on a resume are no-ops) and this attempt's tags."""
    if resumed:
        tracking.delete_tags(_END_TAGS)  # the previous attempt's end; this attempt writes its own
    tracking.log_plan(cfg, output_dir, exclude=(*ATTEMPT_TAGS, "resume"))
    tracking.set_tags({k: getattr(cfg, k) for k in ATTEMPT_TAGS})


def _resume(learner: DinoLearner, state: Mapping[str, Any], cfg: PretrainConfig) -> int:
    """Continue from the checkpoint ``state``; returns its step."""
    start = learner.load_state(state, seed=cfg.seed)
    tracking.set_tags({"resumed_at_step": str(start)})
    log.info("pretrain: resuming run %s at step %d", cfg.resume, start)
    return start


def _keep_interrupted(loop: PretrainLoop, run_id: str) -> None:
    """Write and log ``checkpoints/interrupted.pt`` after a signal, with the tags that say how to resume."""
    with faults.deferred_signals():  # a second signal waits until the checkpoint is safe
        # this rank may stop a step before the others: no collective here
        path = loop.save_checkpoint(loop.step, "interrupted.pt", all_ranks=False)
        tracking.log_artifact(path, "checkpoints")
        tracking.set_tags({"interrupted_at_step": str(loop.step), "resume_with": f"resume={run_id}"})
        log.warning("pretrain: interrupted at step %d; checkpoint %s (continue with resume=%s)", loop.step, path,
                    run_id)


def _log_teacher(learner: DinoLearner, end: PretrainEnd, run_id: str, output_dir: Path) -> Path:
    """Save and log the teacher backbone (with ``spec.json``) and the last checkpoint; tag how the run ended."""
    spec = learner.spec
    path = output_dir / WEIGHTS_ARTIFACT
    if distributed.is_main():
        save_backbone(learner.model.teacher_backbone, spec.name, spec.res, path,
                      {"pretrain_run_id": run_id, "steps": end.step})
    tracking.log_artifact(path, "backbone")
    tracking.log_artifact(path.parent / "spec.json", "backbone")
    tracking.log_artifact(end.checkpoint, "checkpoints")
    tracking.set_tags({"end_reason": end.end_reason})
    return path
