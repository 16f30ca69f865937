"""The ``pretrain`` step: DINO self-distillation of a small ViT on unlabelled 2D crops, as one MLflow run.

``volumes -> preprocessed volumes (labels dropped) -> crops -> label-free crop weights -> multi-crop views ->
student / EMA teacher -> teacher backbone (.safetensors + spec)``. The teacher backbone plugs into ``train`` as
``model.backbone=<name> model.weights=runs:/<this run id>`` (resolved by :func:`resolve_weights`) or
``model.weights=<file>.safetensors``.

Logged: every config value as a param; curves ``pretrain/loss``, ``pretrain/teacher_entropy`` (collapse check:
near ``log(out_dim)`` = uniform, near 0 = one prototype), ``pretrain/center_norm``, ``pretrain/lr``,
``pretrain/momentum``, ``pretrain/teacher_temp``, ``pretrain/weight_decay``, ``pretrain/crops_per_s``; every
``figure_every`` steps a figure of fixed crops (the highest-weighted ones; no label involved) with a 3-component
PCA of the teacher's patch features and its last-block CLS attention, as the MLflow image ``pretrain/teacher_features``
with its step; checkpoints (``checkpoints/last.pt``; ``resume=<run id>`` continues that run from it); the
teacher backbone as ``backbone/teacher_backbone.safetensors`` with ``backbone/spec.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stego_core import tracking
from stego_core.backbones import create_vit, get_spec, normalize_input
from stego_core.config import PretrainConfig, to_dict
from stego_core.data import ensure_cases, make_crop_set, preprocess_case
from stego_core.dino import (
    DinoModel,
    cosine_value,
    dino_step,
    lr_at,
    multi_crop,
    teacher_temperature,
)
from stego_core.sampling import bright_threshold, crop_weights

log = logging.getLogger(__name__)

#: Where the teacher backbone and its spec go inside a pretraining run's artifacts.
WEIGHTS_ARTIFACT = "backbone/teacher_backbone.safetensors"
SPEC_ARTIFACT = "backbone/spec.json"
CHECKPOINT_ARTIFACT = "checkpoints/last.pt"


@dataclass
class PretrainResult:
    run_id: str
    weights_path: Path
    weights_uri: str
    metrics: dict[str, float]
    output_dir: Path


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
    meta = {"backbone": spec.name, "patch_size": str(spec.patch_size), "embed_dim": str(spec.embed_dim),
            "res": str(spec.res), **{k: str(v) for k, v in extra.items()}}
    sd = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=meta)
    (path.parent / "spec.json").write_text(json.dumps(meta, indent=2))
    return path


def resolve_weights(weights: str, backbone: str | None = None) -> str:
    """Turn ``runs:/<pretrain run id>[/<artifact path>]`` into a local weights file; anything else unchanged.

    The one place where run ids become weight files (``train`` calls it before building the backbone). Checks the
    run's ``backbone/spec.json`` against ``backbone`` when given.

    Raises
    ------
    ValueError
        The run has no such artifact, or it was pretrained for another backbone.
    """
    if not isinstance(weights, str) or not weights.startswith("runs:/"):
        return weights
    rest = weights[len("runs:/"):].strip("/")
    run_id, _, artifact = rest.partition("/")
    artifact = artifact or WEIGHTS_ARTIFACT
    try:
        local = tracking.download_artifacts(f"runs:/{run_id}/{artifact}")
    except Exception as exc:  # noqa: BLE001 - re-raised with what to do
        raise ValueError(f"model.weights={weights!r}: cannot fetch artifact {artifact!r} of run {run_id!r} "
                         f"({type(exc).__name__}: {exc}); is it a `pretrain` run of this tracking store "
                         f"({tracking.tracking_uri()})?") from exc
    if backbone is not None and artifact == WEIGHTS_ARTIFACT:
        from safetensors import safe_open

        with safe_open(str(local), framework="pt") as fh:
            meta = fh.metadata() or {}
        if meta.get("backbone") and meta["backbone"] != backbone:
            raise ValueError(f"model.weights={weights!r} holds a pretrained {meta['backbone']!r} (patch "
                             f"{meta.get('patch_size')}, dim {meta.get('embed_dim')}) but model.backbone="
                             f"{backbone!r}; use model.backbone={meta['backbone']}")
    return str(local)


def _checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def _load_checkpoint(run_id: str, run_dir: Path) -> dict[str, Any]:
    path = _checkpoint_path(run_dir)
    if not path.is_file():
        try:
            path = tracking.download_artifacts(f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"resume={run_id!r}: no checkpoint in {run_dir} nor as artifact "
                             f"{CHECKPOINT_ARTIFACT} of that run") from exc
    return torch.load(path, map_location="cpu", weights_only=False)


def run_pretrain(cfg: PretrainConfig, *, nested: bool = False, run_name: str | None = None,
                 tags: dict[str, str] | None = None) -> PretrainResult:
    """DINO pretraining of ``cfg.backbone`` as one MLflow run (or continuing run ``cfg.resume``)."""
    spec = get_spec(cfg.backbone)
    if spec.kind != "vit" or not spec.trainable:
        raise ValueError(f"pretrain.backbone={cfg.backbone!r} is not an in-domain ViT; choose one of "
                         f"{', '.join(n for n in _trainable_names())}")
    device = _device(cfg.accelerator)
    resume = cfg.resume or None
    description = (f"DINO pretraining of {cfg.backbone} on unlabelled crops of {Path(cfg.data.root).name} "
                   f"(up to {cfg.max_steps} steps); curves pretrain/*, stepped figures of attention and feature PCA, "
                   f"checkpoints/, the teacher backbone as `backbone/teacher_backbone.safetensors` (use it as "
                   f"model.weights=runs:/<this run id>).")
    with tracking.start_run(cfg.experiment, run_name=run_name or f"pretrain-{cfg.backbone}", nested=nested,
                            output_root=cfg.output, run_id=resume, description=description,
                            tags={"method": "dino-pretrain", "step": "pretrain", "backbone": cfg.backbone,
                                  **(tags or {})}) as run:
        if resume is None:
            tracking.log_plan(cfg, run.output_dir)
        torch.manual_seed(cfg.seed)
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
        base_lr = cfg.lr * cfg.batch_size / 256.0
        generator = torch.Generator().manual_seed(cfg.seed)
        start = 0
        if resume is not None:
            state = _load_checkpoint(resume, run.output_dir)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            criterion.center.copy_(state["center"].to(device))
            generator.set_state(state["generator"])
            start = int(state["step"])
            tracking.set_tags({"resumed_at_step": str(start)})
            log.info("pretrain: resuming run %s at step %d", resume, start)

        augment = cfg.augment
        fixed = crops[torch.argsort(weights, descending=True)[: cfg.n_figure_crops]].to(device)
        use_bf16 = device == "cuda" and cfg.precision in ("auto", "bf16")
        ckpt_path = _checkpoint_path(run.output_dir)

        def save_checkpoint(step: int) -> None:
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "center": criterion.center.detach().cpu(), "generator": generator.get_state(),
                        "config": to_dict(cfg)}, tmp)
            tmp.replace(ckpt_path)

        def log_figure(step: int) -> None:
            fig = feature_figure(model.teacher_backbone, fixed, to_input, spec.patch_size,
                                 title=f"teacher, step {step}")
            tracking.log_image(fig, "pretrain/teacher_features", step=step)  # stepped image; closes the figure

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, disable=not (cfg.progress and sys.stderr.isatty()),
                   desc="pretrain")
        t0, done, last, logged = time.time(), 0, {}, True
        step = start
        model.train()
        while step < cfg.max_steps:
            if cfg.max_minutes > 0 and time.time() - t0 > 60.0 * cfg.max_minutes:
                tracking.set_tags({"stopped_early": f"time budget {cfg.max_minutes} min at step {step}"})
                break
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
            loss, entropy = dino_step(model, criterion, optimizer, views, n_global=augment.n_global, step=step,
                                      teacher_temp=t_temp, momentum=momentum, clip_grad=cfg.clip_grad,
                                      bf16=use_bf16)
            step += 1
            done += 1
            bar.update(1)
            last = {"pretrain/loss": float(loss.detach()), "pretrain/teacher_entropy": entropy,
                    "pretrain/center_norm": float(criterion.center.norm()), "pretrain/lr": lr,
                    "pretrain/momentum": momentum, "pretrain/teacher_temp": t_temp, "pretrain/weight_decay": wd,
                    "pretrain/crops_per_s": done * cfg.batch_size / max(time.time() - t0, 1e-9)}
            logged = step % cfg.log_every == 0 or step == cfg.max_steps
            if logged:
                tracking.log_metrics(last, step=step)
                bar.set_postfix(loss=f"{last['pretrain/loss']:.3f}", H=f"{entropy:.2f}")
            if step % cfg.checkpoint_every == 0:
                save_checkpoint(step)
            if cfg.figure_every > 0 and step % cfg.figure_every == 0:
                log_figure(step)
        bar.close()
        if last and not logged:  # stopped by the time budget between two logging steps
            tracking.log_metrics(last, step=step)
        save_checkpoint(step)
        if cfg.figure_every > 0 and step % cfg.figure_every != 0:
            log_figure(step)
        entropy_max = math.log(cfg.out_dim)
        summary = {"final/steps": float(step), "final/teacher_entropy_ratio":
                   float(last.get("pretrain/teacher_entropy", float("nan")) / entropy_max),
                   "final/crops_per_s": done * cfg.batch_size / max(time.time() - t0, 1e-9)}
        tracking.log_metrics(summary)
        ratio = summary["final/teacher_entropy_ratio"]
        if ratio > 0.95 or ratio < 0.05:
            tracking.set_tags({"collapse_warning": f"teacher entropy {ratio:.2f} of log(K): "
                                                   + ("near uniform" if ratio > 0.95 else "one prototype")})
        path = save_backbone(model.teacher_backbone, spec.name, spec.res, run.output_dir / WEIGHTS_ARTIFACT,
                             {"pretrain_run_id": run.run_id, "steps": step})
        tracking.log_artifact(path, "backbone")
        tracking.log_artifact(path.parent / "spec.json", "backbone")
        tracking.log_artifact(ckpt_path, "checkpoints")
        return PretrainResult(run_id=run.run_id, weights_path=path, weights_uri=f"runs:/{run.run_id}",
                              metrics={**last, **summary}, output_dir=run.output_dir)


class _InputTransform:
    """Views ``(B, 1, S, S)`` in [0, 1] -> backbone input (the spec's normalisation; no resize)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        return normalize_input(views, self.spec)


def _trainable_names() -> list[str]:
    from stego_core.backbones import BACKBONES

    return sorted(n for n, s in BACKBONES.items() if s.trainable)
