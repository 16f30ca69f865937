"""Self-training: a small learned vessel segmenter trained on a label-free teacher's pseudo-labels.

A teacher (any label-free method: a classical preset, a STEGO reconstruction) gives vessel probabilities and a
mask; :func:`pseudo_labels` turns them into a target and a per-voxel weight (vessel where the teacher is
confident, background well away from its vessels, an ignored band in between, where partial volume makes it
unsure); :func:`train_student` fits a small MONAI U-Net (2D, or 2.5D with neighbouring slices as channels) on
crops of the volumes, half of them centred on teacher vessels, with a masked loss (:func:`masked_loss`:
weighted BCE + soft Dice, optionally soft-clDice, Shit et al., CVPR 2021, :DOI:`10.1109/CVPR46437.2021.01629`)
and MONAI augmentation; :func:`predict_student` applies it to whole slices; :func:`combine` turns student and
teacher into one mask by a label-free rule. :func:`self_train` chains them, with optional rounds (the
student's output becomes the next round's pseudo-labels: noisy student, Xie et al., CVPR 2020).

Nothing here reads a label, writes a file or logs to MLflow: the functions take arrays and return arrays or a
``torch.nn.Module``; ``on_step`` lets a caller record curves and images.

The trap is confirmation bias: a student trained too long or too big copies its teacher, noise and all. The
student is small, augmented, and the weights kept are those of the step that best agrees with the confident
pseudo-labels on held-apart slices (never used for training), a label-free criterion.

Volumes are ``(I, J, K)`` arrays sliced along ``settings.axis``; the student sees ``2 * context + 1``
neighbouring slices as channels (``dims="2.5d"``) or one (``dims="2d"``). Batch norm (not instance norm) keeps
the statistics of training crops and of whole inference slices the same.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi

from stego_core._checks import check_choice, check_ndim, check_same_shape
from stego_core.methods.selftrain.settings import COMBINE_RULES, StudentSettings

# ----------------------------------------------------------------------------------------------------------
# pseudo-labels

def pseudo_labels(teacher_prob: np.ndarray, teacher_mask: np.ndarray, brain_mask: np.ndarray,
                  settings: StudentSettings = StudentSettings()) -> tuple[np.ndarray, np.ndarray]:
    """Targets and loss weights from a teacher's output (no label is read).

    Parameters
    ----------
    teacher_prob : (I, J, K) float ndarray
        Teacher vessel probability in [0, 1].
    teacher_mask : (I, J, K) bool ndarray
        Teacher vessel mask (after its post-processing).
    brain_mask : (I, J, K) bool ndarray
        Voxels outside it are ignored.
    settings : StudentSettings
        ``high``, ``low``, ``band_vox``.

    Returns
    -------
    target : (I, J, K) bool ndarray
        Vessel: ``teacher_mask & (teacher_prob >= high)``.
    weight : (I, J, K) float32 ndarray
        1 on vessel voxels and on background voxels (``teacher_prob < low``, not within ``band_vox`` voxels of
        the teacher mask, inside the brain mask); 0 (ignored) elsewhere.

    Examples
    --------
    >>> prob = np.zeros((1, 7, 1)); prob[0, 3, 0] = 0.9
    >>> target, weight = pseudo_labels(prob, prob > 0.5, np.ones_like(prob, bool))
    >>> target[0, :, 0].astype(int).tolist(), weight[0, :, 0].astype(int).tolist()
    ([0, 0, 0, 1, 0, 0, 0], [1, 1, 0, 1, 0, 1, 1])
    """
    prob = np.asarray(teacher_prob, dtype=np.float32)
    check_ndim(prob, 3, "teacher_prob")
    mask = np.asarray(teacher_mask).astype(bool)
    region = np.asarray(brain_mask).astype(bool)
    check_same_shape(prob, mask, "teacher_prob", "teacher_mask")
    check_same_shape(prob, region, "teacher_prob", "brain_mask")
    target = mask & (prob >= settings.pseudo.high) & region
    near = ndi.binary_dilation(mask, iterations=settings.pseudo.band_vox) if settings.pseudo.band_vox > 0 else mask
    background = region & ~near & (prob < settings.pseudo.low)
    weight = (target | background).astype(np.float32)
    return target, weight


# ----------------------------------------------------------------------------------------------------------
# network and loss

def build_student(settings: StudentSettings = StudentSettings()) -> torch.nn.Module:
    """A small 2D MONAI ``UNet`` with batch norm, one logit channel.

    Parameters
    ----------
    settings : StudentSettings
        ``channels`` (widths per level), ``res_units``, ``in_channels`` (from ``dims`` / ``context``), ``seed``.

    Returns
    -------
    torch.nn.Module
        Maps ``(B, C, H, W)`` float32 to ``(B, 1, H, W)`` logits; H and W divisible by
        ``2 ** (len(channels) - 1)``.
    """
    from monai.networks.nets import UNet

    torch.manual_seed(settings.training.seed)
    return UNet(spatial_dims=2, in_channels=settings.in_channels, out_channels=1,
                channels=tuple(settings.network.channels), strides=(2,) * (len(settings.network.channels) - 1),
                num_res_units=settings.network.res_units, norm="BATCH", act="PRELU")


def masked_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                settings: StudentSettings = StudentSettings()) -> torch.Tensor:
    """Weighted BCE + soft Dice (+ soft-clDice) on the voxels of non-zero weight only.

    Every term sees the prediction and the target multiplied by the weight, so the gradient with respect to the
    logits of ignored voxels (weight 0) is exactly zero.

    Parameters
    ----------
    logits, target, weight : (B, 1, H, W) float tensors
        Student logits, pseudo-label in {0, 1}, weight in [0, 1].
    settings : StudentSettings
        ``bce_weight``, ``dice_weight``, ``cldice_weight``, ``cldice_iters``.

    Returns
    -------
    torch.Tensor
        Scalar loss.
    """
    known = weight.sum().clamp_min(1.0)
    loss = logits.new_zeros(())
    if settings.loss.bce_weight:
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = loss + settings.loss.bce_weight * (bce * weight).sum() / known
    prob = torch.sigmoid(logits) * weight
    tgt = target * weight
    if settings.loss.dice_weight:
        inter = (prob * tgt).sum()
        dice = 1.0 - (2.0 * inter + 1.0) / (prob.sum() + tgt.sum() + 1.0)
        loss = loss + settings.loss.dice_weight * dice
    if settings.loss.cldice_weight:
        from monai.losses import SoftclDiceLoss

        # MONAI >= 1.5 takes (input, target); one channel with include_background=True keeps channel 0
        loss = loss + settings.loss.cldice_weight * SoftclDiceLoss(iter_=settings.loss.cldice_iters)(prob, tgt)
    return loss


# ----------------------------------------------------------------------------------------------------------
# crops and augmentation

class _Volume:
    """One training volume, slicing axis first and padded so any crop centre inside it is valid."""

    def __init__(self, image, brain_mask, target, weight, settings: StudentSettings):
        ax = settings.axis
        half, ctx = settings.training.crop // 2, settings.network.context if settings.network.dims == "2.5d" else 0
        pad = ((ctx, ctx), (half, half), (half, half))
        self.ctx, self.half = ctx, half
        self.image = np.pad(np.moveaxis(np.asarray(image, np.float32), ax, 0), pad, mode="edge")
        self.target = np.pad(np.moveaxis(np.asarray(target, np.float32), ax, 0), pad)
        self.weight = np.pad(np.moveaxis(np.asarray(weight, np.float32), ax, 0), pad)
        brain = np.moveaxis(np.asarray(brain_mask, bool), ax, 0)
        n = brain.shape[0]
        has_brain = np.flatnonzero(brain.reshape(n, -1).any(1))
        # held-apart slices: every val_every-th slice with brain (offset half a period)
        self.val_slices = has_brain[settings.training.val_every // 2::settings.training.val_every]
        train = np.ones(n, bool)
        train[self.val_slices] = False
        vessel = np.moveaxis(np.asarray(target, bool), ax, 0) & train[:, None, None]
        self.vessel_idx = np.flatnonzero(vessel)
        self.brain_idx = np.flatnonzero(brain & train[:, None, None])
        self.shape = brain.shape

    def crop(self, k: int, i: int, j: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        c, h = self.ctx, self.half
        sl = (slice(k, k + 2 * c + 1), slice(i, i + 2 * h), slice(j, j + 2 * h))
        return self.image[sl], self.target[k + c, sl[1], sl[2]][None], self.weight[k + c, sl[1], sl[2]][None]


def sample_crops(volumes: Sequence[_Volume], n: int, rng: np.random.Generator, *,
                 vessel_fraction: float) -> list[dict[str, np.ndarray]]:
    """``n`` crops: a ``vessel_fraction`` of them centred on pseudo-label vessel voxels, the rest on brain voxels.

    Centres are drawn from the training slices only (never the held-apart ones); no label is involved.
    Each crop is a dict of ``image`` (C, P, P), ``target`` and ``weight`` (1, P, P) float32 arrays.
    """
    out = []
    for _ in range(n):
        vol = volumes[int(rng.integers(len(volumes)))]
        pool = vol.vessel_idx if (rng.random() < vessel_fraction and len(vol.vessel_idx)) else vol.brain_idx
        k, i, j = np.unravel_index(int(pool[rng.integers(len(pool))]), vol.shape)
        img, tgt, wgt = vol.crop(k, i, j)
        out.append({"image": img, "target": tgt, "weight": wgt})
    return out


def _elastic(settings: StudentSettings):
    """MONAI's small 2D elastic deformation on the dict of one crop (``None`` when switched off)."""
    if not settings.augment.elastic:
        return None
    from monai import transforms as T

    keys = ("image", "target", "weight")
    aug = T.Rand2DElasticd(keys, spacing=(16, 16), magnitude_range=(0.5, 1.5), prob=settings.augment.prob,
                           mode=("bilinear", "nearest", "nearest"), padding_mode="zeros")
    aug.set_random_state(seed=settings.training.seed)
    return aug


def augment(image: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, settings: StudentSettings,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random flips and 90-degree rotations (all three tensors), intensity scale / shift, gamma and noise (image).

    Batched equivalents of MONAI's ``RandFlip``, ``RandRotate90``, ``RandScaleIntensity``,
    ``RandShiftIntensity``, ``RandAdjustContrast`` and ``RandGaussianNoise``, drawn per crop: MONAI's dictionary
    transforms applied crop by crop cost about 0.13 s per batch of 16 on 2 CPU cores, 40 % of a training step.

    Parameters
    ----------
    image : (B, C, P, P) float tensor
    target, weight : (B, 1, P, P) float tensors
    settings : StudentSettings
        ``aug_*`` switches and ``aug_prob`` (flips and rotations: probability 0.5 each).
    generator : torch.Generator

    Returns
    -------
    The augmented ``image, target, weight``.
    """
    b = image.shape[0]

    def draw(p: float) -> torch.Tensor:
        return torch.rand(b, generator=generator) < p

    def per(values: torch.Tensor) -> torch.Tensor:
        return values.view(b, 1, 1, 1)

    stack = torch.cat([image, target, weight], 1)
    if settings.augment.flip:
        for dim in (2, 3):
            stack = torch.where(per(draw(0.5)), stack.flip(dim), stack)
    if settings.augment.rot90 and stack.shape[2] == stack.shape[3]:
        k = torch.randint(0, 4, (b,), generator=generator)
        stack = torch.stack([torch.rot90(stack[i], int(k[i]), (1, 2)) for i in range(b)])
    c = image.shape[1]
    image, target, weight = stack[:, :c], stack[:, c:c + 1], stack[:, c + 1:]
    p = settings.augment.prob
    if settings.augment.intensity:
        scale = 1.0 + (torch.rand(b, generator=generator) * 0.2 - 0.1) * draw(p)
        shift = (torch.rand(b, generator=generator) * 0.1 - 0.05) * draw(p)
        image = image * per(scale) + per(shift)
    if settings.augment.gamma:
        gamma = torch.where(draw(p), 0.7 + 0.8 * torch.rand(b, generator=generator), torch.ones(b))
        image = image.clamp_min(0.0) ** per(gamma)
    if settings.augment.noise:
        std = 0.03 * torch.rand(b, generator=generator) * draw(p)
        image = image + per(std) * torch.randn(image.shape, generator=generator)
    return image, target, weight


def _batch(samples: list[dict], elastic) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    items = [elastic(s) for s in samples] if elastic is not None else samples
    stack = [torch.stack([torch.as_tensor(np.asarray(it[key]), dtype=torch.float32) for it in items])
             for key in ("image", "target", "weight")]
    return stack[0], (stack[1] > 0.5).float(), stack[2]


# ----------------------------------------------------------------------------------------------------------
# training and inference

def _slab(volume_t: np.ndarray, ks: np.ndarray, ctx: int) -> np.ndarray:
    """(len(ks), 2 ctx + 1, H, W) stacks of neighbouring slices (edge-clamped) of a slicing-axis-first volume."""
    n = volume_t.shape[0]
    idx = np.clip(ks[:, None] + np.arange(-ctx, ctx + 1)[None], 0, n - 1)
    return volume_t[idx]


def _forward_slices(model: torch.nn.Module, slab: np.ndarray, settings: StudentSettings) -> np.ndarray:
    """Student probabilities of whole slices (padded to the network's multiple), optionally flip-averaged."""
    mult = 2 ** (len(settings.network.channels) - 1)
    h, w = slab.shape[-2:]
    ph, pw = (-h) % mult, (-w) % mult
    x = torch.as_tensor(np.pad(slab, ((0, 0), (0, 0), (0, ph), (0, pw)), mode="edge"), dtype=torch.float32)
    flips = [(), (2,), (3,), (2, 3)] if settings.inference.tta else [()]
    out = 0.0
    with torch.no_grad():
        for dims in flips:
            xi = torch.flip(x, dims) if dims else x
            p = torch.sigmoid(model(xi))
            out = out + (torch.flip(p, dims) if dims else p)
    return (out / len(flips))[:, 0, :h, :w].numpy()


def _agreement(model: torch.nn.Module, volumes: Sequence[_Volume], settings: StudentSettings) -> float:
    """Dice of the student (cut 0.5) with the pseudo-labels on the weighted voxels of the held-apart slices."""
    model.eval()
    inter = total = 0.0
    h = volumes[0].half
    for vol in volumes:
        ks = vol.val_slices + vol.ctx
        for start in range(0, len(ks), settings.inference.batch):
            kk = ks[start:start + settings.inference.batch]
            img = _slab(vol.image, kk, vol.ctx)[..., h:-h, h:-h] if h else _slab(vol.image, kk, vol.ctx)
            pred = _forward_slices(model, img, dataclasses.replace(settings, inference=dataclasses.replace(settings.inference, tta=False))) > 0.5
            tgt = vol.target[kk][:, h:-h, h:-h] > 0.5
            wgt = vol.weight[kk][:, h:-h, h:-h] > 0
            inter += float((pred & tgt & wgt).sum())
            total += float((pred & wgt).sum() + (tgt & wgt).sum())
    model.train()
    return 2.0 * inter / total if total else 1.0


def _as_list(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def train_student(image: np.ndarray | Sequence[np.ndarray], brain_mask: np.ndarray | Sequence[np.ndarray],
                  target: np.ndarray | Sequence[np.ndarray], weight: np.ndarray | Sequence[np.ndarray],
                  settings: StudentSettings = StudentSettings(), *, progress: bool = False,
                  on_step: Callable[[int, dict], None] | None = None) -> torch.nn.Module:
    """Train a student on pseudo-labels of one or several volumes (lists for inductive use).

    Parameters
    ----------
    image : (I, J, K) float32 ndarray in [0, 1], or a list of them
        The student's input (e.g. the preprocessed image).
    brain_mask : (I, J, K) bool ndarray or list
        Where background crops are centred.
    target, weight : (I, J, K) ndarrays or lists
        From :func:`pseudo_labels`.
    settings : StudentSettings
    progress : bool
        Print a line per evaluation.
    on_step : callable, optional
        ``on_step(step, info)`` after every step; ``info`` holds ``loss``, ``seconds`` and, at evaluation steps,
        ``agreement`` (the label-free criterion) and ``best``.

    Returns
    -------
    torch.nn.Module
        The student in eval mode, with the weights of the evaluation step of best agreement with the confident
        pseudo-labels on the held-apart slices (the last weights when ``eval_every`` is 0).
    """
    images, brains, targets, weights = (_as_list(x) for x in (image, brain_mask, target, weight))
    if not len(images) == len(brains) == len(targets) == len(weights):
        raise ValueError("image, brain_mask, target and weight must have the same number of volumes")
    for img, brn, tgt, wgt in zip(images, brains, targets, weights):
        check_ndim(np.asarray(img), 3, "image")
        for other, name in ((brn, "brain_mask"), (tgt, "target"), (wgt, "weight")):
            check_same_shape(np.asarray(img), np.asarray(other), "image", name)
    if settings.training.threads:
        torch.set_num_threads(settings.training.threads)
    volumes = [_Volume(*v, settings) for v in zip(images, brains, targets, weights)]
    rng = np.random.default_rng(settings.training.seed)
    model = build_student(settings)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=settings.training.lr, weight_decay=settings.training.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.training.lr, total_steps=max(settings.training.steps, 1),
                                                pct_start=0.1)
    elastic = _elastic(settings)
    gen = torch.Generator().manual_seed(settings.training.seed)
    best, best_state = -1.0, None
    t0 = time.perf_counter()
    for step in range(1, settings.training.steps + 1):
        x, y, w = _batch(sample_crops(volumes, settings.training.batch, rng, vessel_fraction=settings.training.vessel_fraction),
                         elastic)
        x, y, w = augment(x, y, w, settings, gen)
        loss = masked_loss(model(x), y, w, settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        info = {"loss": float(loss.detach()), "seconds": time.perf_counter() - t0}
        if settings.training.eval_every and (step % settings.training.eval_every == 0 or step == settings.training.steps):
            agree = _agreement(model, volumes, settings)
            if agree > best:
                best, best_state = agree, copy.deepcopy(model.state_dict())
            info.update(agreement=agree, best=best)
            if progress:
                print(f"  step {step:5d}  loss {info['loss']:.4f}  agreement {agree:.4f}  "
                      f"({info['seconds']:.0f} s)", flush=True)
        if on_step is not None:
            on_step(step, info)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return model


def predict_student(model: torch.nn.Module, image: np.ndarray, brain_mask: np.ndarray,
                    settings: StudentSettings = StudentSettings()) -> np.ndarray:
    """The student's vessel probability on every slice of a volume (whole slices, batch-norm statistics).

    Parameters
    ----------
    model : torch.nn.Module
        From :func:`train_student`.
    image : (I, J, K) float32 ndarray in [0, 1]
        Normalised as at training time.
    brain_mask : (I, J, K) bool ndarray
        Probabilities are zero outside it (dilated by ``settings.combine.margin_vox``).
    settings : StudentSettings
        ``axis``, ``dims`` / ``context``, ``tta``, ``infer_batch``, ``margin_vox``.

    Returns
    -------
    (I, J, K) float32 ndarray
        Probabilities in [0, 1].
    """
    image = np.asarray(image, dtype=np.float32)
    check_ndim(image, 3, "image")
    check_same_shape(image, np.asarray(brain_mask), "image", "brain_mask")
    model.eval()
    ax, ctx = settings.axis, settings.network.context if settings.network.dims == "2.5d" else 0
    vol = np.moveaxis(image, ax, 0)
    out = np.zeros(vol.shape, np.float32)
    region = np.asarray(brain_mask, bool)
    if settings.combine.margin_vox:
        region = ndi.binary_dilation(region, iterations=settings.combine.margin_vox)
    region_t = np.moveaxis(region, ax, 0)
    ks = np.flatnonzero(region_t.reshape(len(vol), -1).any(1))
    for start in range(0, len(ks), settings.inference.batch):
        kk = ks[start:start + settings.inference.batch]
        out[kk] = _forward_slices(model, _slab(vol, kk, ctx), settings)
    out *= region_t
    return np.moveaxis(out, 0, ax)


# ----------------------------------------------------------------------------------------------------------
# combination and the whole loop

def _top_n(score: np.ndarray, n: int) -> np.ndarray:
    flat = score.ravel()
    n = int(min(max(n, 0), flat.size))
    mask = np.zeros(flat.size, bool)
    if n:
        mask[np.argpartition(-flat, n - 1)[:n]] = True
    return mask.reshape(score.shape)


def combine(teacher_prob: np.ndarray, teacher_mask: np.ndarray, student_prob: np.ndarray, image: np.ndarray,
            settings: StudentSettings = StudentSettings()) -> np.ndarray:
    """One vessel mask from teacher and student by the label-free rule ``settings.combine.rule``.

    Rules
    -----
    ``student``: ``student_prob > student_cut``. ``teacher``: the teacher's mask.
    ``union``: teacher OR student; ``intersection``: teacher AND student (student cut at ``student_cut``).
    ``union_bright``: teacher OR (``student_prob > union_cut`` AND a bright voxel: intensity at or above the
    ``bright_fraction`` quantile of the image over the teacher's vessel voxels).
    ``topn``: the ``topn_scale * N`` voxels of highest student probability, N = the teacher's voxel count.
    ``topn_mean``: the same on ``(1 - teacher_weight) * student + teacher_weight * teacher_prob`` (the teacher's
    probability zeroed outside its mask with ``mask_teacher_prob``).
    Then, for every rule but ``teacher``, components under ``min_size_vox`` voxels are dropped and, with
    ``keep_trees`` > 0, only the trees of at least that fraction of the largest one are kept.

    Parameters
    ----------
    teacher_prob, student_prob : (I, J, K) float ndarrays in [0, 1]
    teacher_mask : (I, J, K) bool ndarray
    image : (I, J, K) float ndarray
        Intensities (for ``union_bright``).
    settings : StudentSettings

    Returns
    -------
    (I, J, K) bool ndarray

    Examples
    --------
    >>> t = np.array([0.9, 0.1, 0.1, 0.1]).reshape(1, 1, 4); s = np.array([0.2, 0.95, 0.6, 0.1]).reshape(1, 1, 4)
    >>> from stego_core.methods.selftrain.settings import CombineSettings
    >>> combine(t, t > 0.5, s, s, StudentSettings(combine=CombineSettings(rule="topn"))).ravel().tolist()
    [False, True, False, False]
    """
    rule = settings.combine.rule
    check_choice(rule, "student.combine.rule", COMBINE_RULES)
    tmask = np.asarray(teacher_mask).astype(bool)
    if rule == "teacher":
        return tmask
    mask = _rule(rule, teacher_prob, tmask, student_prob, image, settings)
    if settings.combine.min_size_vox or settings.combine.keep_trees:
        from stego_core.engine.postprocess import (
            keep_largest_trees,
            remove_small_components,
        )

        if settings.combine.min_size_vox:
            mask = remove_small_components(mask, min_size_vox=settings.combine.min_size_vox)
        if settings.combine.keep_trees and mask.any():
            mask = keep_largest_trees(mask, min_fraction=settings.combine.keep_trees)
    return mask


def _rule(rule: str, teacher_prob: np.ndarray, tmask: np.ndarray, student_prob: np.ndarray, image: np.ndarray,
          settings: StudentSettings) -> np.ndarray:
    sprob = np.asarray(student_prob, dtype=np.float32)
    check_same_shape(tmask, sprob, "teacher_mask", "student_prob")
    smask = sprob > settings.combine.student_cut
    if rule == "student":
        return smask
    if rule == "union":
        return tmask | smask
    if rule == "intersection":
        return tmask & smask
    if rule == "union_bright":
        img = np.asarray(image, dtype=np.float32)
        bright_cut = float(np.quantile(img[tmask], settings.combine.bright_fraction)) if tmask.any() else np.inf
        return tmask | ((sprob > settings.combine.union_cut) & (img >= bright_cut))
    n = int(round(settings.combine.topn_scale * tmask.sum()))
    score = sprob
    if rule == "topn_mean":
        t_score = np.asarray(teacher_prob, np.float32)
        if settings.combine.mask_teacher_prob:
            t_score = t_score * tmask
        score = (1.0 - settings.combine.teacher_weight) * sprob + settings.combine.teacher_weight * t_score
    return _top_n(score, n)


def self_train(image: np.ndarray, brain_mask: np.ndarray, teacher_prob: np.ndarray, teacher_mask: np.ndarray,
               settings: StudentSettings = StudentSettings(), *, progress: bool = False,
               on_step: Callable[[int, int, int, dict], None] | None = None
               ) -> tuple[np.ndarray, np.ndarray, list[torch.nn.Module]]:
    """Transductive self-training of one volume: pseudo-labels, students, combination, ``settings.rounds`` times.

    Parameters
    ----------
    image : (I, J, K) float32 ndarray in [0, 1]
    brain_mask : (I, J, K) bool ndarray
    teacher_prob : (I, J, K) float ndarray in [0, 1]
    teacher_mask : (I, J, K) bool ndarray
    settings : StudentSettings
    progress : bool
    on_step : callable, optional
        ``on_step(round, axis, step, info)`` (rounds from 1); see :func:`train_student`.

    Returns
    -------
    mask : (I, J, K) bool ndarray
        The combined mask of the last round.
    student_prob : (I, J, K) float32 ndarray
        The last round's student probability (the mean over ``views``).
    models : list of torch.nn.Module
        The last round's students, one per view (predict each with ``settings.for_view(index, rounds)``).
    """
    t_prob, t_mask = np.asarray(teacher_prob, np.float32), np.asarray(teacher_mask, bool)
    views = settings.view_axes
    for r in range(1, settings.rounds + 1):
        target, weight = pseudo_labels(t_prob, t_mask, brain_mask, settings)
        models, s_prob = [], np.zeros(t_prob.shape, np.float32)
        for i, view in enumerate(views):
            s = settings.for_view(i, r)
            cb = None if on_step is None else (lambda step, info, r=r, v=view: on_step(r, v, step, info))
            if progress:
                print(f"round {r}, view {view}", flush=True)
            model = train_student(image, brain_mask, target, weight, s, progress=progress, on_step=cb)
            s_prob += predict_student(model, image, brain_mask, s) / len(views)
            models.append(model)
        mask = combine(teacher_prob, teacher_mask, s_prob, image, settings)
        t_prob, t_mask = s_prob, mask
    return mask, s_prob, models
