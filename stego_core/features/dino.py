"""DINO self-distillation pieces for grey 2D crops (pure torch; no data loading, no tracking).

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021. A student network
``g_s`` (ViT backbone + projection head) is trained to match an exponential-moving-average teacher ``g_t`` on
different views of the same crop::

    P_t(x) = softmax((g_t(x) - c) / tau_t),   P_s(x') = softmax(g_s(x') / tau_s)
    L = mean over pairs (x in global views, x' in all views, x' != x) of  -sum_k P_t(x)_k log P_s(x')_k
    c <- m_c c + (1 - m_c) mean_batch g_t(x)                    (centring, m_c = 0.9)
    theta_t <- lambda theta_t + (1 - lambda) theta_s            (EMA, lambda cosine 0.996 -> 1)

The loss, projection head, EMA update and cosine schedule come from ``lightly`` (``DINOLoss``,
``DINOProjectionHead``, ``update_momentum``, ``cosine_schedule``); this module adds the multi-crop
augmentation for grey MRA crops, the student/teacher wrapper, the schedules and the collapse diagnostics.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stego_core._checks import check_range


@dataclass(frozen=True)
class AugmentConfig:
    """DINO multi-crop views of grey crops (:func:`stego_core.features.dino.multi_crop`); no colour operations.

    Scales are fractions of the crop's area; sizes are the side of each view in pixels."""

    n_global: int = 2
    n_local: int = 6
    global_size: int = 32
    local_size: int = 16
    global_scale: tuple[float, float] = (0.4, 1.0)
    local_scale: tuple[float, float] = (0.1, 0.4)
    flip_p: float = 0.5
    rotate: bool = True
    intensity_scale: tuple[float, float] = (0.8, 1.2)
    intensity_shift: tuple[float, float] = (-0.1, 0.1)
    gamma: tuple[float, float] = (0.7, 1.5)
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    noise_std: tuple[float, float] = (0.0, 0.03)

    def __post_init__(self) -> None:
        check_range(self.n_global, "augment.n_global", 2)
        check_range(self.n_local, "augment.n_local", 0)
        check_range(self.global_size, "augment.global_size", 4)
        check_range(self.local_size, "augment.local_size", 2)
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"augment.{name}={getattr(self, name)!r} must satisfy 0 < low <= high <= 1")



__all__ = ["DinoModel", "augment_view", "cosine_value", "dino_step", "lr_at", "multi_crop",
           "teacher_entropy", "teacher_temperature"]


def _uniform(n: int, lo: float, hi: float, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def _resized_crop_boxes(n: int, size: int, scale: tuple[float, float], g: torch.Generator | None,
                        device: torch.device) -> torch.Tensor:
    """Boxes ``(n, 4)`` (x0, y0, x1, y1) in pixels of a ``size`` crop: area fraction in ``scale``, aspect 3/4-4/3."""
    area = _uniform(n, scale[0], scale[1], g, device) * size * size
    log_r = _uniform(n, math.log(3 / 4), math.log(4 / 3), g, device)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(1.0, size)
    h = torch.sqrt(area / r).clamp(1.0, size)
    x0 = torch.rand(n, generator=g, device=device) * (size - w)
    y0 = torch.rand(n, generator=g, device=device) * (size - h)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur of ``x (B, 1, S, S)`` with ``sigma (B,)`` pixels (reflect padding)."""
    radius = 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    b = x.shape[0]
    xp = F.pad(x.transpose(0, 1), (radius, radius, radius, radius), mode="reflect")  # (1, B, S+2r, S+2r)
    xp = F.conv2d(xp, k.view(b, 1, 1, -1), groups=b)
    xp = F.conv2d(xp, k.view(b, 1, -1, 1), groups=b)
    return xp.transpose(0, 1)


def augment_view(crops: torch.Tensor, size: int, scale: tuple[float, float], s: AugmentConfig,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """One augmented view of every crop.

    Parameters
    ----------
    crops : (B, 1, P, P) float tensor
        Preprocessed crops in [0, 1].
    size : int
        Side of the view.
    scale : (float, float)
        Range of the area fraction of the random resized crop.

    Returns
    -------
    view : (B, 1, size, size) float tensor
    """
    from torchvision.ops import roi_align

    b, _, p, _ = crops.shape
    dev = crops.device
    boxes = _resized_crop_boxes(b, p, scale, generator, dev)
    rois = torch.cat([torch.arange(b, device=dev, dtype=crops.dtype)[:, None], boxes.to(crops.dtype)], 1)
    x = roi_align(crops, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)
    flip = torch.rand(b, generator=generator, device=dev) < s.flip_p
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if s.rotate:
        k = torch.randint(0, 4, (b,), generator=generator, device=dev)
        rots = torch.stack([torch.rot90(x, i, dims=(-2, -1)) for i in range(4)])  # (4, B, 1, S, S)
        x = rots[k, torch.arange(b, device=dev)]
    gamma = torch.exp(_uniform(b, math.log(s.gamma[0]), math.log(s.gamma[1]), generator, dev))
    x = x.clamp(0, 1) ** gamma[:, None, None, None]
    if s.blur_p > 0:
        sig = _uniform(b, *s.blur_sigma, generator, dev)
        do = torch.rand(b, generator=generator, device=dev) < s.blur_p
        x = torch.where(do[:, None, None, None], _blur(x, sig), x)
    a = _uniform(b, *s.intensity_scale, generator, dev)[:, None, None, None]
    c = _uniform(b, *s.intensity_shift, generator, dev)[:, None, None, None]
    x = a * x + c
    std = _uniform(b, *s.noise_std, generator, dev)[:, None, None, None]
    noise = torch.randn(x.shape, generator=generator, device=dev, dtype=x.dtype)
    return x + std * noise


def multi_crop(crops: torch.Tensor, settings: AugmentConfig, generator: torch.Generator | None = None
               ) -> list[torch.Tensor]:
    """DINO multi-crop views: ``n_global`` views of ``global_size`` then ``n_local`` of ``local_size``.

    Parameters
    ----------
    crops : (B, 1, P, P) float tensor in [0, 1]

    Returns
    -------
    views : list of (B, 1, S, S) tensors
        The global views first.
    """
    if crops.ndim != 4 or crops.shape[1] != 1 or crops.shape[2] != crops.shape[3]:
        raise ValueError(f"crops must have shape (B, 1, P, P); got {tuple(crops.shape)}")
    s = settings
    views = [augment_view(crops, s.global_size, s.global_scale, s, generator) for _ in range(s.n_global)]
    views += [augment_view(crops, s.local_size, s.local_scale, s, generator) for _ in range(s.n_local)]
    return views


def teacher_temperature(step: int, warmup_steps: int, start: float = 0.04, end: float = 0.07) -> float:
    """Linear warm-up of the teacher temperature from ``start`` to ``end`` over ``warmup_steps``."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def cosine_value(step: int, max_steps: int, start: float, end: float) -> float:
    """Cosine schedule from ``start`` (step 0) to ``end`` (step ``max_steps - 1``)."""
    from lightly.utils.scheduler import cosine_schedule

    if max_steps <= 1:
        return end
    return float(cosine_schedule(min(step, max_steps - 1), max_steps, start, end))


def lr_at(step: int, max_steps: int, base_lr: float, warmup_steps: int, min_lr: float = 1e-6) -> float:
    """Linear warm-up to ``base_lr`` then cosine decay to ``min_lr``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return cosine_value(step - warmup_steps, max(1, max_steps - warmup_steps), base_lr, min_lr)


@torch.no_grad()
def teacher_entropy(teacher_out: torch.Tensor, center: torch.Tensor, temperature: float) -> float:
    """Mean entropy (nats) of the teacher's centred, sharpened distribution ``softmax((t - c) / tau)``.

    ``log(K)``: uniform (collapse to the centre); ``0``: one prototype (collapse to a point).
    """
    p = torch.softmax((teacher_out.float() - center.reshape(1, -1).float()) / temperature, dim=-1)
    return float(-(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean())


class DinoModel(nn.Module):
    """Student and EMA teacher (ViT backbone + DINO projection head).

    Parameters
    ----------
    backbone : timm VisionTransformer
        ``forward`` returns the CLS embedding ``(B, embed_dim)`` (``num_classes=0``); built with
        ``dynamic_img_size=True`` so that local views of another size pass. The teacher is a deep copy.
    embed_dim : int
    out_dim, hidden_dim, bottleneck_dim : int
        Projection head sizes (3 layers, weight-normalised last layer with ``out_dim`` prototypes).
    freeze_last_layer_steps : int
        Steps during which the last layer's gradients are dropped.
    to_input : callable
        Maps ``(B, 1, S, S)`` views in [0, 1] to the backbone input.
    """

    def __init__(self, backbone: nn.Module, embed_dim: int, *, out_dim: int = 4096, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, freeze_last_layer_steps: int = 0,
                 to_input: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        super().__init__()
        from lightly.models.modules import DINOProjectionHead

        self.student_backbone = backbone
        with warnings.catch_warnings():  # lightly's head uses torch's weight_norm, which warns that it is deprecated
            warnings.filterwarnings("ignore", message=r".*weight_norm.*", category=FutureWarning)
            self.student_head = DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, out_dim,
                                                   freeze_last_layer=freeze_last_layer_steps)
            self.teacher_head = DINOProjectionHead(embed_dim, hidden_dim, bottleneck_dim, out_dim)
        self.teacher_backbone = copy.deepcopy(backbone)
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for p in list(self.teacher_backbone.parameters()) + list(self.teacher_head.parameters()):
            p.requires_grad_(False)
        self.to_input = to_input or (lambda v: v)

    def student(self, view: torch.Tensor) -> torch.Tensor:
        """Student prototype scores ``(B, out_dim)`` of a view ``(B, 1, S, S)``."""
        return self.student_head(self.student_backbone(self.to_input(view)))

    @torch.no_grad()
    def teacher(self, view: torch.Tensor) -> torch.Tensor:
        """Teacher prototype scores ``(B, out_dim)`` (no gradient)."""
        return self.teacher_head(self.teacher_backbone(self.to_input(view)))

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA: ``theta_t <- m theta_t + (1 - m) theta_s`` (lightly's ``update_momentum``)."""
        from lightly.models.utils import update_momentum

        update_momentum(self.student_backbone, self.teacher_backbone, m=momentum)
        update_momentum(self.student_head, self.teacher_head, m=momentum)


def dino_step(model: DinoModel, criterion: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
              *, n_global: int, step: int, teacher_temp: float, momentum: float, clip_grad: float = 0.0,
              bf16: bool = False,
              sync_gradients: Callable[[list[nn.Parameter]], None] | None = None) -> tuple[torch.Tensor, float]:
    """One DINO update on a batch's multi-crop views (the learning rate and weight decay are set by the caller).

    Teacher on the ``n_global`` global views, student on all of them, ``criterion`` (lightly's ``DINOLoss``,
    which also updates its centre), backward, optional gradient clipping, the last layer's gradients dropped
    while frozen, the optimizer step and the teacher's EMA.

    Parameters
    ----------
    model : DinoModel
    criterion : lightly.loss.DINOLoss
    optimizer : torch.optim.Optimizer
        Over the student's parameters.
    views : list of (B, 1, S, S) tensors on the model's device
        :func:`multi_crop` output, global views first.
    n_global : int
    step : int
        Global step (the last layer's freeze).
    teacher_temp, momentum : float
        This step's teacher temperature and EMA momentum.
    clip_grad : float
        Gradient-norm clip of the student (0: none).
    bf16 : bool
        Forward passes under bfloat16 autocast (CUDA).
    sync_gradients : callable, optional
        Called with the student's parameters after the backward pass, before clipping: under several processes
        it averages the gradients over the ranks
        (:func:`stego_core.runtime.distributed.average_gradients`), so every rank takes the same step and the EMA
        teacher stays the same everywhere. (The centre is averaged over the ranks by lightly's ``DINOLoss``
        itself once ``torch.distributed`` is initialised, as in DINO's reference code.)

    Returns
    -------
    loss : scalar tensor (detached)
    teacher_entropy : float
        :func:`teacher_entropy` of the first global view, before the centre moves.

    Raises
    ------
    RuntimeError
        A non-finite loss (the learning rate is too high).
    """
    device_type = views[0].device.type
    with torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16 and device_type == "cuda"):
        teacher_out = [model.teacher(v) for v in views[:n_global]]
        student_out = [model.student(v) for v in views]
    teacher_out = [t.float() for t in teacher_out]
    entropy = teacher_entropy(teacher_out[0], criterion.center, teacher_temp)
    loss = criterion(teacher_out, [s.float() for s in student_out], teacher_temp=teacher_temp)
    if not torch.isfinite(loss):
        raise RuntimeError(f"pretraining loss is {loss.item()} at step {step}; lower pretrain.lr")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [*model.student_backbone.parameters(), *model.student_head.parameters()]
    if sync_gradients is not None:
        sync_gradients(params)
    if clip_grad > 0:
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    model.student_head.cancel_last_layer_gradients(step)
    optimizer.step()
    model.update_teacher(momentum)
    return loss.detach(), entropy
