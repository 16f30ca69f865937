"""DINO pretraining of an in-domain ViT as a library loop (pure torch; no MLflow): what the ``pretrain`` step runs.

``volumes -> crops (labels dropped) and label-free sampling weights`` (:func:`pretraining_crops`) ``->``
:class:`DinoLearner` (student / EMA teacher, the loss with the teacher's centre, AdamW, this rank's random
stream; one update per call of :meth:`DinoLearner.step`, with DINO's :class:`Schedules`) ``->``
:class:`PretrainLoop` (steps from a start to ``max_steps``: curves, figures and probes reported to a
:class:`PretrainMonitor`, checkpoints written as files, a time budget) ``->`` the teacher backbone
(:func:`save_backbone`: ``.safetensors`` with its spec).

The tracked step (:func:`stego_core.steps.pretrain.run_pretrain`) opens the run, builds these pieces from its
config and hands the loop a monitor that writes into the run (``tracking.RunMonitor``), as a method's training
reports through :class:`stego_core.methods.registry.Monitor`; nothing here knows MLflow.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from stego_core.data.cases import DataConfig, ensure_cases, make_crop_set, preprocess_case
from stego_core.data.io import Case
from stego_core.data.sampling import SamplingConfig, bright_threshold, crop_weights
from stego_core.data.slicing import SlicingConfig
from stego_core.features.backbones import get_spec
from stego_core.features.base import BackboneSpec, normalize_input
from stego_core.features.dino import (
    AugmentConfig,
    DinoModel,
    cosine_value,
    dino_step,
    lr_at,
    multi_crop,
    teacher_temperature,
)
from stego_core.features.vit import create_vit
from stego_core.runtime import distributed, faults
from stego_core.runtime.progress import PlainProgress

log = logging.getLogger(__name__)

__all__ = ["DinoLearner", "DinoRecipe", "InputTransform", "PretrainEnd", "PretrainLoop", "PretrainMonitor", "Probe",
           "Schedules", "build_learner", "collapse_warning", "feature_figure", "param_groups", "pretraining_crops",
           "save_backbone"]

#: A probe of the teacher backbone (in eval mode): metric name -> value, logged at the step it ran.
Probe = Callable[[nn.Module], Mapping[str, float]]


class PretrainMonitor(Protocol):
    """Where the loop reports (the run's :class:`~stego_core.platform.tracking.RunMonitor` in the ``pretrain``
    step); the same three calls as :class:`stego_core.methods.registry.Monitor`."""

    def metrics(self, values: Mapping[str, float], step: int | None = None) -> None: ...

    def image(self, figure: Any, key: str, step: int) -> None: ...

    def tags(self, tags: Mapping[str, str]) -> None: ...


class DinoRecipe(Protocol):
    """The settings a DINO pretraining reads (:class:`stego_core.steps.pretrain.PretrainConfig` has them all,
    with their defaults and meaning)."""

    seed: int
    augment: AugmentConfig
    # optimisation: steps, batch per process, AdamW with warm-up and cosine decay, clipping
    max_steps: int
    max_minutes: float
    batch_size: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    clip_grad: float
    # student / teacher heads and DINO's loss
    freeze_last_layer_steps: int
    out_dim: int
    hidden_dim: int
    bottleneck_dim: int
    teacher_temp_start: float
    teacher_temp: float
    teacher_temp_warmup_steps: int
    student_temp: float
    center_momentum: float
    momentum: float
    # what the loop reports and writes
    log_every: int
    figure_every: int
    n_figure_crops: int
    checkpoint_every: int
    progress: bool


# --------------------------------------------------------------------------------------------- data


def pretraining_crops(data: DataConfig, slicing: SlicingConfig, sampling: SamplingConfig
                      ) -> tuple[np.ndarray, np.ndarray, list[Case]]:
    """Crops ``(N, P, P)`` of every configured volume, their sampling weights ``(N,)`` and the cases.

    Labels are dropped before loading (pretraining is unsupervised); the weights come from the images only.
    """
    cases = [dataclasses.replace(c, label=None) for c in ensure_cases(data)]
    prepared = [preprocess_case(c, data) for c in cases]
    crop_set = make_crop_set(prepared, slicing)
    thr_case = {p.case.case_id: bright_threshold(p.image, p.brain_mask, sampling.quantile) for p in prepared}
    thresholds = np.array([thr_case[c] for c in crop_set.case_ids])
    weights = crop_weights(crop_set.crops, thresholds, method=sampling.method, floor=sampling.floor)
    return crop_set.crops, weights, cases


class InputTransform:
    """Views ``(B, 1, S, S)`` in [0, 1] -> backbone input (the spec's normalisation; no resize)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        return normalize_input(views, self.spec)


# --------------------------------------------------------------------------------------------- one update


def param_groups(module: torch.nn.Module) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices, none on biases, norms and tokens (as DINO does)."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or "token" in name or "pos_embed" in name
         else decay).append(p)
    return [{"params": decay, "weight_decay": 0.0, "decays": True}, {"params": no_decay, "weight_decay": 0.0,
                                                                    "decays": False}]


@dataclass(frozen=True)
class Schedules:
    """DINO's schedules over ``max_steps`` steps: the learning rate (linear warm-up to ``base_lr``, then cosine
    to ``min_lr``), the weight decay and the teacher's EMA momentum (cosines from their start to their end
    value) and the teacher temperature (linear warm-up)."""

    max_steps: int
    base_lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    weight_decay_end: float
    momentum: float
    teacher_temp_start: float
    teacher_temp: float
    teacher_temp_warmup_steps: int

    @classmethod
    def of(cls, recipe: DinoRecipe, n_ranks: int = 1) -> Schedules:
        """The recipe's schedules; the learning rate scales with the global batch (DINO: ``lr x batch / 256``)."""
        return cls(max_steps=recipe.max_steps, base_lr=recipe.lr * recipe.batch_size * n_ranks / 256.0,
                   min_lr=recipe.min_lr, warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
                   weight_decay_end=recipe.weight_decay_end, momentum=recipe.momentum,
                   teacher_temp_start=recipe.teacher_temp_start, teacher_temp=recipe.teacher_temp,
                   teacher_temp_warmup_steps=recipe.teacher_temp_warmup_steps)

    def at(self, step: int) -> dict[str, float]:
        """``lr``, ``weight_decay``, ``momentum`` and ``teacher_temp`` of step ``step`` (0-based)."""
        return {"lr": lr_at(step, self.max_steps, self.base_lr, self.warmup_steps, self.min_lr),
                "weight_decay": cosine_value(step, self.max_steps, self.weight_decay, self.weight_decay_end),
                "momentum": cosine_value(step, self.max_steps, self.momentum, 1.0),
                "teacher_temp": teacher_temperature(step, self.teacher_temp_warmup_steps, self.teacher_temp_start,
                                                    self.teacher_temp)}


class DinoLearner:
    """What one process of a DINO pretraining trains and draws from; build it with :func:`build_learner`.

    Parameters
    ----------
    model : DinoModel
        Student and EMA teacher.
    criterion : lightly.loss.DINOLoss
        The loss; it holds the teacher's centre ``(1, out_dim)``.
    optimizer : torch.optim.AdamW
        Over the student, with the groups of :func:`param_groups`.
    crops : (N, 1, P, P) float tensor in [0, 1]
        Every pretraining crop (on the CPU).
    weights : (N,) float tensor
        Their sampling weights (:func:`pretraining_crops`); batches are drawn by weight with replacement.
    generator : torch.Generator
        This rank's stream of batches and views (checkpointed).
    spec : BackboneSpec
        The ViT being pretrained.
    schedules : Schedules
    augment : AugmentConfig
        The multi-crop views.
    batch_size : int
        Crops per step and process.
    clip_grad : float
        Gradient-norm clip of the student (0: none).
    device : str
    bf16 : bool
        Forward passes under bfloat16 autocast (CUDA).
    n_ranks : int
        Processes; with more than one, gradients are averaged over them before clipping.
    """

    def __init__(self, model: DinoModel, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                 crops: torch.Tensor, weights: torch.Tensor, generator: torch.Generator, *, spec: BackboneSpec,
                 schedules: Schedules, augment: AugmentConfig, batch_size: int, clip_grad: float, device: str,
                 bf16: bool = False, n_ranks: int = 1) -> None:
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.crops, self.weights, self.generator = crops, weights, generator
        self.spec, self.schedules, self.augment = spec, schedules, augment
        self.batch_size, self.clip_grad, self.device, self.bf16 = batch_size, clip_grad, device, bf16
        self.n_ranks = n_ranks

    def step(self, step: int) -> tuple[torch.Tensor, float, dict[str, float]]:
        """One update at step ``step`` (0-based): this step's schedules, a batch drawn by weight, its views, and
        :func:`~stego_core.features.dino.dino_step`.

        Returns
        -------
        loss : scalar tensor (detached; this process's batch)
        teacher_entropy : float
        values : dict
            The schedules' values of this step (:meth:`Schedules.at`).
        """
        values = self.schedules.at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = values["lr"]
            group["weight_decay"] = values["weight_decay"] if group["decays"] else 0.0
        idx = torch.multinomial(self.weights, self.batch_size, replacement=True, generator=self.generator)
        views = [v.to(self.device) for v in multi_crop(self.crops[idx], self.augment, self.generator)]
        sync = distributed.average_gradients if self.n_ranks > 1 else None
        loss, entropy = dino_step(self.model, self.criterion, self.optimizer, views, n_global=self.augment.n_global,
                                  step=step, teacher_temp=values["teacher_temp"], momentum=values["momentum"],
                                  clip_grad=self.clip_grad, bf16=self.bf16, sync_gradients=sync)
        return loss, entropy, values

    def highest_weighted(self, n: int) -> torch.Tensor:
        """The ``n`` crops ``(n, 1, P, P)`` of highest sampling weight, on the device (the figures' fixed crops)."""
        return self.crops[torch.argsort(self.weights, descending=True)[:n]].to(self.device)

    def state(self, step: int, generators: list[torch.Tensor] | None, config: Mapping[str, Any]) -> dict[str, Any]:
        """A checkpoint after ``step`` steps: model, optimizer, centre, this rank's stream and, when gathered,
        every rank's (``generators``), and the ``config`` that made it."""
        return {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "center": self.criterion.center.detach().cpu(), "generator": self.generator.get_state(),
                "generators": generators, "config": config}

    def load_state(self, state: Mapping[str, Any], *, seed: int) -> int:
        """Continue from a checkpoint of :meth:`state`; returns its step.

        Each rank takes back its own stream when the checkpoint holds one per rank of this world size;
        otherwise (another world size, or an interrupted rank's own checkpoint) each rank starts a fresh stream
        seeded by ``seed``, its rank and the step.
        """
        rank = distributed.global_rank()
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.criterion.center.copy_(state["center"].to(self.device))
        start = int(state["step"])
        generators = state.get("generators") or [state["generator"]]
        if len(generators) == self.n_ranks:
            self.generator.set_state(generators[rank])
        else:
            self.generator.manual_seed(seed + 7919 * rank + start)
        return start


def build_learner(spec: BackboneSpec, crops: np.ndarray, weights: np.ndarray, recipe: DinoRecipe, *, device: str,
                  bf16: bool = False, n_ranks: int = 1) -> DinoLearner:
    """A fresh :class:`DinoLearner` for ``spec``: the ViT (seeded by ``recipe.seed``) with DINO heads, lightly's
    ``DINOLoss``, AdamW, and this rank's stream (each rank draws its own crops and views; rank 0 as a single
    process does). The heads are initialised from the global RNG (the caller seeds it).

    Parameters
    ----------
    crops : (N, P, P) float array in [0, 1]
    weights : (N,) float array
        Sampling weights of the crops.
    """
    from lightly.loss import DINOLoss

    model = DinoModel(create_vit(spec, seed=recipe.seed, dynamic_img_size=True), spec.embed_dim,
                      out_dim=recipe.out_dim, hidden_dim=recipe.hidden_dim, bottleneck_dim=recipe.bottleneck_dim,
                      freeze_last_layer_steps=recipe.freeze_last_layer_steps, to_input=InputTransform(spec)).to(device)
    criterion = DINOLoss(output_dim=recipe.out_dim, warmup_teacher_temp=recipe.teacher_temp_start,
                         teacher_temp=recipe.teacher_temp, student_temp=recipe.student_temp,
                         center_momentum=recipe.center_momentum).to(device)
    student = torch.nn.ModuleList([model.student_backbone, model.student_head])
    optimizer = torch.optim.AdamW(param_groups(student), lr=0.0)
    generator = torch.Generator().manual_seed(recipe.seed + 7919 * distributed.global_rank())
    return DinoLearner(model, criterion, optimizer, torch.from_numpy(crops)[:, None], torch.from_numpy(weights),
                       generator, spec=spec, schedules=Schedules.of(recipe, n_ranks), augment=recipe.augment,
                       batch_size=recipe.batch_size, clip_grad=recipe.clip_grad, device=device, bf16=bf16,
                       n_ranks=n_ranks)


# --------------------------------------------------------------------------------------------- the loop


@dataclass
class PretrainEnd:
    """How a loop ended: the steps done in all, why it stopped, the last curves' values with the ``final/*``
    summary, and the checkpoint written at the end."""

    step: int
    end_reason: str
    metrics: dict[str, float]
    checkpoint: Path


def collapse_warning(entropy_ratio: float) -> str | None:
    """The ``collapse_warning`` tag for a final teacher entropy of ``entropy_ratio`` x ``log(out_dim)``: above
    0.95 near uniform (collapse to the centre), below 0.05 one prototype (collapse to a point); else None."""
    if entropy_ratio > 0.95 or entropy_ratio < 0.05:
        return (f"teacher entropy {entropy_ratio:.2f} of log(K): "
                + ("near uniform" if entropy_ratio > 0.95 else "one prototype"))
    return None


class PretrainLoop:
    """DINO steps of a :class:`DinoLearner` from a start to ``recipe.max_steps``, reported to a monitor.

    Every ``log_every`` steps the curves ``pretrain/loss`` (mean over the ranks), ``pretrain/teacher_entropy``,
    ``pretrain/center_norm``, ``pretrain/lr``, ``pretrain/momentum``, ``pretrain/teacher_temp``,
    ``pretrain/weight_decay``, ``pretrain/crops_per_s``; every ``figure_every`` steps (and at step 0 of a new
    run) the image ``pretrain/teacher_features`` (:func:`feature_figure` of the highest-weighted crops); the probe
    at step 0 of a new run, every ``probe_every`` steps and at the end; ``checkpoint_dir/last.pt`` every
    ``checkpoint_every`` steps and at the end. ``max_minutes > 0`` stops earlier (tag ``stopped_early``).

    A signal (:class:`stego_core.runtime.faults.Interrupted`) waits for the end of the current step (the
    teacher's EMA and the step's metrics included) and leaves the loop with :attr:`step` the steps done, so that
    ``save_checkpoint(loop.step, "interrupted.pt", all_ranks=False)`` holds the state after exactly that many
    steps and the curves have no gap where a resume continues them.
    """

    def __init__(self, learner: DinoLearner, recipe: DinoRecipe, *, monitor: PretrainMonitor, checkpoint_dir: Path,
                 config: Mapping[str, Any], probe: Probe | None = None, probe_every: int = 100) -> None:
        self.learner, self.recipe, self.monitor = learner, recipe, monitor
        self.checkpoint_dir, self.config = checkpoint_dir, config
        self.probe, self.probe_every = probe, probe_every
        self.fixed = learner.highest_weighted(recipe.n_figure_crops)
        #: steps done (the start, then one more after each update)
        self.step = 0
        self.last: dict[str, float] = {}
        self._logged, self._done, self._t0 = True, 0, 0.0

    def run(self, start: int = 0) -> PretrainEnd:
        """Train from step ``start`` (0: a new run, which first probes and draws the untrained teacher)."""
        from tqdm.auto import tqdm

        r = self.recipe
        self.step, self._t0 = start, time.time()
        plain = PlainProgress("pretrain", r.max_steps, log, enabled=r.progress and distributed.is_main(), start=start)
        with tqdm(total=r.max_steps, initial=start, disable=not (r.progress and sys.stderr.isatty()),
                  desc="pretrain") as bar:
            if start == 0:
                self.run_probe(0)
                if r.figure_every > 0:  # the untrained teacher: MLflow's image cards open on step 0
                    self.log_figure(0)
            end_reason = f"max_steps={r.max_steps} reached"
            self.learner.model.train()
            while self.step < r.max_steps:
                if r.max_minutes > 0 and distributed.broadcast_object(time.time() - self._t0 > 60.0 * r.max_minutes):
                    end_reason = f"time budget {r.max_minutes} min at step {self.step}"
                    self.monitor.tags({"stopped_early": end_reason})
                    break
                with faults.deferred_signals():  # one whole step or none
                    entropy = self._update()
                bar.update(1)
                if self._logged:
                    bar.set_postfix(loss=f"{self.last['pretrain/loss']:.3f}", H=f"{entropy:.2f}")
                plain.update(self.step, loss=self.last["pretrain/loss"], entropy=entropy)
                self._after_step()
            plain.update(self.step, final=True, loss=self.last.get("pretrain/loss", float("nan")))
        return self._finish(end_reason)

    def _update(self) -> float:
        """One update and its curves (logged every ``log_every`` steps and at ``max_steps``); the entropy."""
        r, learner = self.recipe, self.learner
        loss, entropy, values = learner.step(self.step)
        self.step += 1
        self._done += 1
        self._logged = self.step % r.log_every == 0 or self.step == r.max_steps
        if self._logged and learner.n_ranks > 1:  # the mean over ranks: the global batch's loss
            loss = torch.stack(distributed.gather_objects(loss.detach().cpu())).mean()
        self.last = {"pretrain/loss": float(loss.detach()), "pretrain/teacher_entropy": entropy,
                     "pretrain/center_norm": float(learner.criterion.center.norm()), "pretrain/lr": values["lr"],
                     "pretrain/momentum": values["momentum"], "pretrain/teacher_temp": values["teacher_temp"],
                     "pretrain/weight_decay": values["weight_decay"], "pretrain/crops_per_s": self._crops_per_s()}
        if self._logged:
            self.monitor.metrics(self.last, step=self.step)
        return entropy

    def _after_step(self) -> None:
        """The periodic checkpoint, figure and probe after an update."""
        step, r = self.step, self.recipe
        if step % r.checkpoint_every == 0:
            self.save_checkpoint(step)
        if r.figure_every > 0 and step % r.figure_every == 0:
            self.log_figure(step)
        if self.probe_every > 0 and step % self.probe_every == 0:
            self.run_probe(step)

    def _finish(self, end_reason: str) -> PretrainEnd:
        """The end of the curves, the last checkpoint, figure and probe, the ``final/*`` summary, the collapse
        check."""
        step, r = self.step, self.recipe
        if self.last and not self._logged:  # stopped by the time budget between two logging steps
            self.monitor.metrics(self.last, step=step)
        checkpoint = self.save_checkpoint(step)
        if r.figure_every > 0 and step % r.figure_every != 0:
            self.log_figure(step)
        if self.probe_every <= 0 or step % self.probe_every != 0:
            self.run_probe(step)
        entropy_max = math.log(r.out_dim)
        summary = {"final/steps": float(step), "final/teacher_entropy_ratio":
                   float(self.last.get("pretrain/teacher_entropy", float("nan")) / entropy_max),
                   "final/crops_per_s": self._crops_per_s()}
        self.monitor.metrics(summary)
        warning = collapse_warning(summary["final/teacher_entropy_ratio"])
        if warning is not None:
            self.monitor.tags({"collapse_warning": warning})
        return PretrainEnd(step=step, end_reason=end_reason, metrics={**self.last, **summary}, checkpoint=checkpoint)

    def _crops_per_s(self) -> float:
        return self._done * self.recipe.batch_size * self.learner.n_ranks / max(time.time() - self._t0, 1e-9)

    def save_checkpoint(self, step: int, name: str = "last.pt", *, all_ranks: bool = True) -> Path:
        """Write ``checkpoint_dir/name`` (rank 0; through a temporary file). ``all_ranks`` (every rank calls it,
        a collective) also keeps every rank's data stream; a rank stopping alone passes False."""
        path = self.checkpoint_dir / name
        generators = distributed.gather_objects(self.learner.generator.get_state()) if all_ranks else None
        if not distributed.is_main():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(self.learner.state(step, generators, self.config), tmp)
        tmp.replace(path)
        return path

    def log_figure(self, step: int) -> None:
        """The teacher's :func:`feature_figure` of the fixed crops as the image ``pretrain/teacher_features``."""
        if not distributed.is_main():
            return
        model = self.learner.model
        fig = feature_figure(model.teacher_backbone, self.fixed, model.to_input, self.learner.spec.vit_patch,
                             title=f"teacher, step {step}")
        self.monitor.image(fig, "pretrain/teacher_features", step)  # stepped image; closes the figure

    def run_probe(self, at: int) -> None:
        """Report what the probe returns for the teacher backbone (in eval mode) at step ``at``."""
        if self.probe is None:
            return
        teacher = self.learner.model.teacher_backbone
        was_training = teacher.training
        teacher.eval()
        try:
            self.monitor.metrics(dict(self.probe(teacher)), step=at)
        finally:
            teacher.train(was_training)


# --------------------------------------------------------------------------------------------- outputs


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
    side = 6.0 / n  # 600 px wide at 100 dpi: MLflow's image card
    fig, axes = plt.subplots(rows, n, figsize=(6.0, side * rows + 0.5), dpi=100, squeeze=False)
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
