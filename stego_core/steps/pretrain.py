"""The ``pretrain`` step: DINO self-distillation of a small ViT on unlabelled 2D crops, as one MLflow run.

``volumes -> preprocessed volumes (labels dropped) -> crops -> label-free crop weights -> multi-crop views ->
student / EMA teacher -> teacher backbone (.safetensors + spec)``. The teacher backbone plugs into ``train`` as
``model.backbone=<name> model.weights=runs:/<this run id>`` (resolved by
:func:`stego_core.platform.weights.fetch_weights`) or ``model.weights=<file>.safetensors``.

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
import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stego_core._checks import check_choice, check_range
from stego_core.config import flatten, to_dict
from stego_core.data.cases import ensure_cases, make_crop_set, preprocess_case
from stego_core.data.sampling import SamplingConfig, bright_threshold, crop_weights
from stego_core.features.backbones import get_spec
from stego_core.features.base import normalize_input
from stego_core.features.vit import WEIGHTS_ARTIFACT, create_vit
from stego_core.features.dino import (
    AugmentConfig,
    DinoModel,
    cosine_value,
    dino_step,
    lr_at,
    multi_crop,
    teacher_temperature,
)
from stego_core.platform import tracking
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

__all__ = ["ATTEMPT_TAGS", "RESUMABLE", "WEIGHTS_ARTIFACT", "PretrainResult", "feature_figure", "pretraining_crops",
           "resume_state", "run_pretrain", "save_backbone"]

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


def pretraining_crops(cfg: PretrainConfig) -> tuple[np.ndarray, np.ndarray, list]:
    """Crops ``(N, P, P)`` of every configured volume, their sampling weights ``(N,)`` and the cases.

    Labels are dropped before loading (pretraining is unsupervised); the weights come from the images only.
    """
    cases = [dataclasses.replace(c, label=None) for c in ensure_cases(cfg.data)]
    prepared = [preprocess_case(c, cfg.data) for c in cases]
    crop_set = make_crop_set(prepared, cfg.slicing)
    thr_case = {p.case.case_id: bright_threshold(p.image, p.brain_mask, cfg.sampling.quantile) for p in prepared}
    thresholds = np.array([thr_case[c] for c in crop_set.case_ids])
    weights = crop_weights(crop_set.crops, thresholds, method=cfg.sampling.method, floor=cfg.sampling.floor)
    return crop_set.crops, weights, cases


def _param_groups(module: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms and tokens (as DINO does)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
         else decay).append(p)
    return [{"params": decay, "weight_decay": 0.0, "decays": True}, {"params": no_decay, "weight_decay": 0.0,
                                                                    "decays": False}]


@torch.no_grad()
def feature_figure(backbone: torch.nn.Module, crops: torch.Tensor, to_input: Any, patch_size: int,
                   title: str = "") -> Any:
    """Crops, a 3-component PCA of the backbone's patch tokens and its last-block CLS attention.

    Parameters
    ----------
    crops : (n, 1, P, P) float tensor in [0, 1]
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was_training = backbone.training
    backbone.eval()
    attn_mod = backbone.blocks[-1].attn
    captured: list[torch.Tensor] = []
    fused = attn_mod.fused_attn
    attn_mod.fused_attn = False
    hook = attn_mod.attn_drop.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        tokens = backbone.forward_features(to_input(crops)).float()
    finally:
        hook.remove()
        attn_mod.fused_attn = fused
        backbone.train(was_training)
    n_prefix = backbone.num_prefix_tokens
    patch = tokens[:, n_prefix:]  # (n, h*w, C)
    n, hw, c = patch.shape
    g = int(round(math.sqrt(hw)))
    x = patch.reshape(-1, c)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    pcs = x @ v[:3].T
    lo, hi = pcs.quantile(0.01, dim=0), pcs.quantile(0.99, dim=0)
    rgb = ((pcs - lo) / (hi - lo + 1e-8)).clamp(0, 1).reshape(n, g, g, 3).cpu().numpy()
    rows = 3 if captured else 2
    fig, axes = plt.subplots(rows, n, figsize=(1.6 * n, 1.6 * rows), squeeze=False)
    for i in range(n):
        axes[0, i].imshow(crops[i, 0].cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axes[1, i].imshow(rgb[i], interpolation="nearest")
        if captured:
            a = captured[-1][i, :, 0, n_prefix:].mean(0).reshape(g, g).cpu().numpy()
            axes[2, i].imshow(a, cmap="magma", interpolation="nearest")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_ylabel("crop")
    axes[1, 0].set_ylabel("PCA(3)")
    if captured:
        axes[2, 0].set_ylabel("CLS attn")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_backbone(backbone: torch.nn.Module, spec_name: str, res: int, path: Path, extra: dict[str, Any]) -> Path:
    """Write a ViT's state dict as ``.safetensors`` with its spec (name, patch, dim, res) in the metadata."""
    from safetensors.torch import save_file

    spec = get_spec(spec_name, res=res)
    meta = {"backbone": spec.name, "vit_patch": str(spec.vit_patch), "embed_dim": str(spec.embed_dim),
            "res": str(spec.res), **{k: str(v) for k, v in extra.items()}}
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    (path.parent / "spec.json").write_text(json.dumps(meta, indent=2))
    return path


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
    params = run.data.params
    differ = [f"{k} (run {params[k]!r}, now {tracking.param_text(v)!r})" for k, v in flatten(cfg).items()
              if k not in RESUMABLE and k in params and params[k] != tracking.param_text(v)]
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
                 tags: dict[str, str] | None = None,
                 probe: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
                 probe_every: int = 100) -> PretrainResult:
    """DINO pretraining of ``cfg.backbone`` as one MLflow run (or continuing run ``cfg.resume``; see the module
    docstring). SIGTERM / SIGINT (:class:`stego_core.runtime.faults.Interrupted`) stop it between two steps with
    ``checkpoints/interrupted.pt`` written and logged; the run ends KILLED and ``resume=<run id>`` continues it.

    ``probe`` (optional, for studies of the pretraining itself) is called with the teacher backbone (in eval
    mode) before the first step of a new run, every ``probe_every`` steps and at the end; the metrics it returns
    are logged at that step. The step itself never sees what the probe reads (a label-scored probe stays a
    measurement: ``benchmarks/dino_probe.py``)."""
    spec = get_spec(cfg.backbone)
    if spec.kind != "vit" or not spec.trainable:
        raise ValueError(f"pretrain.backbone={cfg.backbone!r} is not an in-domain ViT; choose one of "
                         f"{', '.join(n for n in _trainable_names())}")
    n_ranks = distributed.init_from_env(devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes)
    rank = distributed.global_rank()
    device = _device(cfg.accelerator)
    resume = cfg.resume or None
    with distributed.main_first():  # rank 0 fetches a logged checkpoint; the others then read it
        state = resume_state(cfg) if resume is not None else None  # every check before the run is touched
    description = (f"DINO pretraining of {cfg.backbone} on unlabelled crops of {Path(cfg.data.root).name}; "
                   f"curves pretrain/*, stepped figures of attention and feature PCA, checkpoints/, the teacher "
                   f"backbone as `backbone/teacher_backbone.safetensors` (use it as model.weights=runs:/<this run "
                   f"id>).")
    with tracking.start_run(cfg.experiment, run_name=None if resume else run_name or f"pretrain-{cfg.backbone}",
                            nested=nested, output_root=cfg.output, run_id=resume, description=description,
                            tags={"method": "dino-pretrain", "step": "pretrain", "backbone": cfg.backbone,
                                  **(tags or {})}) as run:
        if resume is not None:
            tracking.delete_tags(_END_TAGS)  # the previous attempt's end; this attempt writes its own
        # params that a resume cannot change are logged once (the same values again on a resume: no-ops)
        tracking.log_plan(cfg, run.output_dir, exclude=(*ATTEMPT_TAGS, "resume"))
        tracking.set_tags({k: getattr(cfg, k) for k in ATTEMPT_TAGS})
        torch.manual_seed(cfg.seed)
        with distributed.main_first():  # rank 0 writes generated phantoms; the others read them
            crops_np, weights_np, cases = pretraining_crops(cfg)
        if resume is None:
            tracking.log_dataset(cases, name=Path(cfg.data.root).name, context="pretraining", source=cfg.data.root)
        tracking.set_tags({"device": device, "sampling": cfg.sampling.method, "n_crops": str(len(crops_np))})
        crops = torch.from_numpy(crops_np)[:, None]
        weights = torch.from_numpy(weights_np)

        to_input = _InputTransform(spec)
        model = DinoModel(create_vit(spec, seed=cfg.seed, dynamic_img_size=True), spec.embed_dim,
                          out_dim=cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                          freeze_last_layer_steps=cfg.freeze_last_layer_steps, to_input=to_input).to(device)
        from lightly.loss import DINOLoss

        criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp=cfg.teacher_temp_start,
                             teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                             center_momentum=cfg.center_momentum).to(device)
        student_params = torch.nn.ModuleList([model.student_backbone, model.student_head])
        optimizer = torch.optim.AdamW(_param_groups(student_params), lr=0.0)
        base_lr = cfg.lr * cfg.batch_size * n_ranks / 256.0  # DINO: lr x global batch / 256
        # each rank draws its own crops and views (rank 0 as a single process does)
        generator = torch.Generator().manual_seed(cfg.seed + 7919 * rank)
        sync = distributed.average_gradients if n_ranks > 1 else None
        start = 0
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            criterion.center.copy_(state["center"].to(device))
            start = int(state["step"])
            generators = state.get("generators") or [state["generator"]]
            if len(generators) == n_ranks:
                generator.set_state(generators[rank])
            else:  # another world size (or an interrupted rank's own checkpoint): fresh streams per rank
                generator.manual_seed(cfg.seed + 7919 * rank + start)
            tracking.set_tags({"resumed_at_step": str(start)})
            log.info("pretrain: resuming run %s at step %d", resume, start)

        augment = cfg.augment
        fixed = crops[torch.argsort(weights, descending=True)[: cfg.n_figure_crops]].to(device)
        use_bf16 = device == "cuda" and cfg.trainer.precision in ("auto", "bf16-mixed")
        ckpt_dir = run.output_dir / "checkpoints"

        def save_checkpoint(step: int, name: str = "last.pt", *, all_ranks: bool = True) -> Path:
            """Rank 0 writes; ``all_ranks`` (every rank calls it) also keeps every rank's data stream."""
            path = ckpt_dir / name
            generators = distributed.gather_objects(generator.get_state()) if all_ranks else None
            if not distributed.is_main():
                return path
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "center": criterion.center.detach().cpu(), "generator": generator.get_state(),
                        "generators": generators, "config": to_dict(cfg)}, tmp)
            tmp.replace(path)
            return path

        def log_figure(step: int) -> None:
            if not distributed.is_main():
                return
            fig = feature_figure(model.teacher_backbone, fixed, to_input, spec.vit_patch,
                                 title=f"teacher, step {step}")
            tracking.log_image(fig, "pretrain/teacher_features", step=step)  # stepped image; closes the figure

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and sys.stderr.isatty()),
                   desc="pretrain")
        t0, done, last, logged = time.time(), 0, {}, True
        step = start

        def run_probe(at: int) -> None:
            if probe is None:
                return
            was_training = model.teacher_backbone.training
            model.teacher_backbone.eval()
            try:
                tracking.log_metrics(dict(probe(model.teacher_backbone)), step=at)
            finally:
                model.teacher_backbone.train(was_training)

        if start == 0:
            run_probe(0)
            if cfg.figure_every > 0:  # the untrained teacher: MLflow's image cards open on step 0
                log_figure(0)
        end_reason = f"max_steps={cfg.max_steps} reached"
        model.train()
        try:
            while step < cfg.max_steps:
                if cfg.max_minutes > 0 and distributed.broadcast_object(time.time() - t0 > 60.0 * cfg.max_minutes):
                    end_reason = f"time budget {cfg.max_minutes} min at step {step}"
                    tracking.set_tags({"stopped_early": end_reason})
                    break
                # One whole step or none: a signal waits for the end of the step (the teacher's EMA update and
                # the step's metrics included), so an interrupted checkpoint holds the state after exactly
                # `step` steps and the curves have no gap where a resume continues them.
                with faults.deferred_signals():
                    lr = lr_at(step, cfg.max_steps, base_lr, cfg.warmup_steps, cfg.min_lr)
                    wd = cosine_value(step, cfg.max_steps, cfg.weight_decay, cfg.weight_decay_end)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                        group["weight_decay"] = wd if group["decays"] else 0.0
                    momentum = cosine_value(step, cfg.max_steps, cfg.momentum, 1.0)
                    t_temp = teacher_temperature(step, cfg.teacher_temp_warmup_steps, cfg.teacher_temp_start,
                                                 cfg.teacher_temp)
                    idx = torch.multinomial(weights, cfg.batch_size, replacement=True, generator=generator)
                    views = [v.to(device) for v in multi_crop(crops[idx], augment, generator)]
                    loss, entropy = dino_step(model, criterion, optimizer, views, n_global=augment.n_global,
                                              step=step, teacher_temp=t_temp, momentum=momentum,
                                              clip_grad=cfg.clip_grad, bf16=use_bf16, sync_gradients=sync)
                    step += 1
                    done += 1
                    logged = step % cfg.log_every == 0 or step == cfg.max_steps
                    if logged and n_ranks > 1:  # the mean over ranks: the global batch's loss
                        loss = torch.stack(distributed.gather_objects(loss.detach().cpu())).mean()
                    last = {"pretrain/loss": float(loss.detach()), "pretrain/teacher_entropy": entropy,
                            "pretrain/center_norm": float(criterion.center.norm()), "pretrain/lr": lr,
                            "pretrain/momentum": momentum, "pretrain/teacher_temp": t_temp,
                            "pretrain/weight_decay": wd,
                            "pretrain/crops_per_s": done * cfg.batch_size * n_ranks / max(time.time() - t0, 1e-9)}
                    if logged:
                        tracking.log_metrics(last, step=step)
                bar.update(1)
                if logged:
                    bar.set_postfix(loss=f"{last['pretrain/loss']:.3f}", H=f"{entropy:.2f}")
                if step % cfg.checkpoint_every == 0:
                    save_checkpoint(step)
                if cfg.figure_every > 0 and step % cfg.figure_every == 0:
                    log_figure(step)
                if probe_every > 0 and step % probe_every == 0:
                    run_probe(step)
        except faults.Interrupted:
            bar.close()
            with faults.deferred_signals():  # a second signal waits until the checkpoint is safe
                # this rank may stop a step before the others: no collective here
                path = save_checkpoint(step, "interrupted.pt", all_ranks=False)
                tracking.log_artifact(path, "checkpoints")
                tracking.set_tags({"interrupted_at_step": str(step), "resume_with": f"resume={run.run_id}"})
                log.warning("pretrain: interrupted at step %d; checkpoint %s (continue with resume=%s)", step,
                            path, run.run_id)
            raise
        bar.close()
        if last and not logged:  # stopped by the time budget between two logging steps
            tracking.log_metrics(last, step=step)
        ckpt_path = save_checkpoint(step)
        if cfg.figure_every > 0 and step % cfg.figure_every != 0:
            log_figure(step)
        if probe_every <= 0 or step % probe_every != 0:
            run_probe(step)
        entropy_max = math.log(cfg.out_dim)
        summary = {"final/steps": float(step), "final/teacher_entropy_ratio":
                   float(last.get("pretrain/teacher_entropy", float("nan")) / entropy_max),
                   "final/crops_per_s": done * cfg.batch_size * n_ranks / max(time.time() - t0, 1e-9)}
        tracking.log_metrics(summary)
        ratio = summary["final/teacher_entropy_ratio"]
        if ratio > 0.95 or ratio < 0.05:
            tracking.set_tags({"collapse_warning": f"teacher entropy {ratio:.2f} of log(K): "
                                                   + ("near uniform" if ratio > 0.95 else "one prototype")})
        path = run.output_dir / WEIGHTS_ARTIFACT
        if distributed.is_main():
            save_backbone(model.teacher_backbone, spec.name, spec.res, path,
                          {"pretrain_run_id": run.run_id, "steps": step})
        tracking.log_artifact(path, "backbone")
        tracking.log_artifact(path.parent / "spec.json", "backbone")
        tracking.log_artifact(ckpt_path, "checkpoints")
        tracking.set_tags({"end_reason": end_reason})
        return PretrainResult(run_id=run.run_id, weights_path=path, weights_uri=f"runs:/{run.run_id}",
                              metrics={**last, **summary}, output_dir=run.output_dir, model=model,
                              center=criterion.center.detach().cpu())


class _InputTransform:
    """Views ``(B, 1, S, S)`` in [0, 1] -> backbone input (the spec's normalisation; no resize)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        return normalize_input(views, self.spec)


def _trainable_names() -> list[str]:
    from stego_core.features.backbones import BACKBONES

    return sorted(n for n, s in BACKBONES.items() if s.trainable)
