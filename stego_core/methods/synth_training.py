"""Training of ``synth``'s network on generated patches only (pure torch; the tracked step around it is
:mod:`stego_core.steps.pretrain_synth`).

Data: every step generates ``gen_per_step`` fresh patches (:func:`stego_core.data.synth.generate`, seeds
``seed * 10**6 + k``) into a ring buffer of the ``buffer`` most recent ones and draws ``batch`` patches from it
with random flips and in-plane transposes, so each generated patch is used a few times; generation counts in the
time budget. Loss: MONAI ``DiceLoss(sigmoid, batch)`` + ``cldice_weight`` x ``SoftclDiceLoss`` on the
probabilities + ``bce_weight`` x BCE (without BCE, Dice + soft-clDice has a degenerate minimum at "vessel
everywhere": MONAI's soft skeleton of an all-ones map is empty and soft-clDice scores it perfect). Adam, linear
warm-up over the first 3 % of the budget, cosine decay to 2 % at its end; the budget is ``max_steps`` or
``max_minutes`` of training time, whichever ends first (the schedule follows the larger fraction).
Validation needs no real label: Dice at 0.5 on held-out generator seeds ``10**7 + i`` of the full generator, and
``mass_fp``, the share of a mid-grey block around bright tubes marked vessel (:func:`mass_probe`): the failure that
the synthetic Dice does not see and real MRA shows (brain parenchyma marked vessel).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stego_core._checks import check_range
from stego_core.data import synth
from stego_core.methods.synth import NetworkSettings, build_network, save_weights

__all__ = ["SynthTrainSettings", "SynthTrainer", "VAL_SEED0", "make_loss", "validation_set", "validate",
           "validation_figure", "mass_probe", "mass_false_positives"]

#: First seed of the held-out validation patches (training seeds are ``seed * 10**6 + k``, far below).
VAL_SEED0 = 10 ** 7


@dataclass(frozen=True)
class SynthTrainSettings:
    """How ``synth``'s network is trained (defaults: the shipped weights' recipe and budget, 6 minutes: longer runs
    of this generator lowered the real-data Dice on every modality, docs/synth.md).

    Attributes
    ----------
    network : NetworkSettings
    generator : stego_core.data.synth.SynthSettings
        The domain randomization (patch size = ``generator.shape``).
    batch : int
        Patches per step.
    lr, weight_decay : float
        Adam.
    cldice_weight, bce_weight : float
        Weights of soft-clDice and BCE beside Dice.
    cldice_iters : int
        Soft-skeleton iterations of soft-clDice.
    max_steps : int
        Step budget (0: none).
    max_minutes : float
        Training-time budget, generation included, validation excluded (0: none). One of the budgets must be set.
    gen_per_step : float
        New patches generated per step (fractions accumulate).
    buffer : int
        Ring buffer of recent patches the batches are drawn from.
    seed : int
        Torch seed of the initial weights and base of the generator seeds.
    n_val : int
        Held-out generator patches of the validation.
    eval_every : int
        Steps between validations (and stepped images); also at the end.
    checkpoint_every : int
        Steps between checkpoints (and at the end).
    threads : int
        ``torch.set_num_threads`` (1 on a shared CPU: OpenMP threads spin-wait for each other).
    """

    network: NetworkSettings = field(default_factory=NetworkSettings)
    generator: synth.SynthSettings = field(default_factory=synth.SynthSettings)
    batch: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-5
    cldice_weight: float = 0.5
    bce_weight: float = 0.5
    cldice_iters: int = 3
    max_steps: int = 0
    max_minutes: float = 6.0
    gen_per_step: float = 1.0
    buffer: int = 48
    seed: int = 0
    n_val: int = 16
    eval_every: int = 100
    checkpoint_every: int = 500
    threads: int = 1

    def __post_init__(self) -> None:
        check_range(self.batch, "train.batch", 1)
        check_range(self.lr, "train.lr", 0.0, low_inclusive=False)
        check_range(self.weight_decay, "train.weight_decay", 0.0)
        check_range(self.cldice_weight, "train.cldice_weight", 0.0)
        check_range(self.bce_weight, "train.bce_weight", 0.0)
        check_range(self.cldice_iters, "train.cldice_iters", 1, 20)
        check_range(self.max_steps, "train.max_steps", 0)
        check_range(self.max_minutes, "train.max_minutes", 0.0)
        if not self.max_steps and not self.max_minutes:
            raise ValueError("train.max_steps and train.max_minutes are both 0: set a budget")
        check_range(self.gen_per_step, "train.gen_per_step", 0.0, low_inclusive=False)
        check_range(self.buffer, "train.buffer", 1)
        check_range(self.n_val, "train.n_val", 1)
        check_range(self.eval_every, "train.eval_every", 1)
        check_range(self.checkpoint_every, "train.checkpoint_every", 1)
        check_range(self.threads, "train.threads", 1)


def make_loss(t: SynthTrainSettings) -> Callable[[Any, Any], Any]:
    """``(logits, target) -> loss``: Dice + ``cldice_weight`` soft-clDice + ``bce_weight`` BCE."""
    import torch
    from monai.losses import DiceLoss, SoftclDiceLoss

    dice = DiceLoss(sigmoid=True, batch=True)
    cl = SoftclDiceLoss(iter_=t.cldice_iters)

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = dice(logits, y)
        if t.bce_weight:
            out = out + t.bce_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
        if t.cldice_weight:
            out = out + t.cldice_weight * cl(torch.sigmoid(logits), y)
        return out

    return loss


def _augment(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips along each axis and an in-plane transpose (z stays the slice axis)."""
    for ax in (0, 1, 2):
        if rng.random() < 0.5:
            img, lab = np.flip(img, ax), np.flip(lab, ax)
    if rng.random() < 0.5:
        img, lab = img.transpose(1, 0, 2), lab.transpose(1, 0, 2)
    return np.ascontiguousarray(img), np.ascontiguousarray(lab)


class _Stream:
    """Fresh generated patches into a ring buffer, batches out of it."""

    def __init__(self, t: SynthTrainSettings) -> None:
        self.t = t
        self.buf: collections.deque = collections.deque(maxlen=t.buffer)
        self.k = 0
        self.owed = 0.0
        self.rng = np.random.default_rng(t.seed + 12345)
        self.gen_seconds = 0.0
        self.fractions: list[float] = []

    def _new(self) -> None:
        t0 = time.perf_counter()
        img, lab, info = synth.generate(self.t.seed * 10 ** 6 + self.k, self.t.generator)
        self.gen_seconds += time.perf_counter() - t0
        self.k += 1
        self.fractions.append(float(info["fraction"]))
        self.buf.append((img, lab))

    def batch(self) -> tuple[Any, Any]:
        import torch

        self.owed += self.t.gen_per_step
        while self.owed >= 1.0 or len(self.buf) < min(2, self.t.buffer):
            self._new()
            self.owed = max(self.owed - 1.0, 0.0)
        xs, ys = [], []
        for _ in range(self.t.batch):
            img, lab = _augment(*self.buf[int(self.rng.integers(len(self.buf)))], self.rng)
            xs.append(img[None])
            ys.append(lab[None])
        return torch.as_tensor(np.stack(xs)), torch.as_tensor(np.stack(ys).astype(np.float32))


def validation_set(t: SynthTrainSettings) -> list[tuple[np.ndarray, np.ndarray]]:
    """Held-out patches of the full generator (default settings at ``t``'s patch size), never trained on: an
    ablated generator is validated on the full one too."""
    full = synth.SynthSettings(shape=t.generator.shape)
    return [synth.generate(VAL_SEED0 + i, full)[:2] for i in range(t.n_val)]


def _predict(model: Any, img: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return torch.sigmoid(model(torch.as_tensor(img[None, None])))[0, 0].numpy()


def validate(model: Any, val: list[tuple[np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``val_dice`` (voxels of all patches pooled) and ``val_dice_mean`` (mean per patch) at 0.5."""
    was = model.training
    model.eval()
    inter = tot = 0.0
    per = []
    for img, lab in val:
        p = _predict(model, img) > 0.5
        g = lab > 0
        i, s = float((p & g).sum()), float(p.sum() + g.sum())
        inter, tot = inter + i, tot + s
        per.append(2 * i / s if s else 1.0)
    model.train(was)
    return {"val_dice": 2 * inter / tot if tot else 1.0, "val_dice_mean": float(np.mean(per))}


def mass_probe(shape: tuple[int, int, int] = (64, 64, 64), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A label-free probe of the failure seen on MRA: a mid-grey block (0.5, "parenchyma") in air (0.1) crossed by
    two bright thin tubes (1.0, radii 2 and 1.2 voxels), light noise, robustly normalised.

    Returns
    -------
    image : (X, Y, Z) float32 ndarray
    mass : (X, Y, Z) bool ndarray
        The block's voxels that are not tube: a network that marks them has learnt "bright mass = vessel".
    """
    x, y, z = shape
    vol = np.full(shape, 0.1, np.float32)
    block = np.zeros(shape, bool)
    block[x // 6: x - x // 6, y // 6: y - y // 6, z // 6: z - z // 6] = True
    vol[block] = 0.5
    caps = [(np.array([0.3 * x, 0.4 * y, 0.0]), np.array([0.6 * x, 0.55 * y, float(z)]), 2.0),
            (np.array([0.0, 0.7 * y, 0.5 * z]), np.array([float(x), 0.3 * y, 0.4 * z]), 1.2)]
    occ = synth.draw_tubes(caps, shape)
    vol = vol * (1 - occ[0]) + occ[0]
    vol += np.random.default_rng(seed).normal(0.0, 0.03, shape).astype(np.float32)
    return synth.robust_normalize(vol), block & (occ[1] < 0.5)


def mass_false_positives(model: Any, probe: tuple[np.ndarray, np.ndarray] | None = None) -> float:
    """Fraction of :func:`mass_probe`'s non-vessel block marked vessel (> 0.5): 0 is right. At 64^3: the
    60-minute research model 0.75, the same recipe after 6 minutes 0.61, with large non-vessel ellipsoids
    (``p_organ`` 0.5) 0.58 (docs/synth.md)."""
    img, mass = probe if probe is not None else mass_probe()
    was = model.training
    model.eval()
    frac = float((_predict(model, img) > 0.5)[mass].mean())
    model.train(was)
    return frac


def validation_figure(model: Any, val: list[tuple[np.ndarray, np.ndarray]], n: int = 4) -> Any:
    """A figure of ``n`` held-out patches: middle slice, label, prediction (probability) per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    was = model.training
    model.eval()
    rows = val[:n]
    fig, axes = plt.subplots(len(rows), 3, figsize=(5.4, 1.8 * len(rows)), squeeze=False)
    for r, (img, lab) in enumerate(rows):
        z = img.shape[2] // 2
        prob = _predict(model, img)
        for c, (pic, title) in enumerate(((img, "image"), (lab, "label"), (prob, "prediction"))):
            axes[r, c].imshow(np.asarray(pic)[:, :, z].T, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axes[r, c].axis("off")
            if r == 0:
                axes[r, c].set_title(title, fontsize=8)
    model.train(was)
    fig.tight_layout(pad=0.2)
    return fig


class SynthTrainer:
    """One network, its optimiser, its data stream and its clock.

    Parameters
    ----------
    t : SynthTrainSettings
    on_eval : callable, optional
        ``(step, metrics, model, val) -> None`` after each validation (curves, pictures).
    on_checkpoint : callable, optional
        ``(step, path) -> None`` after each checkpoint written under ``checkpoint_dir``.
    checkpoint_dir : Path, optional
        Where ``last.pt`` (a :func:`~stego_core.methods.synth.save_weights` file with ``step``) is written.
    """

    def __init__(self, t: SynthTrainSettings, *, on_eval: Callable[..., None] | None = None,
                 on_checkpoint: Callable[[int, Path], None] | None = None,
                 checkpoint_dir: Path | None = None) -> None:
        import torch

        self.t = t
        torch.set_num_threads(t.threads)
        self.model = build_network(t.network, seed=t.seed)
        self.model.train()
        self.opt = torch.optim.Adam(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.stream = _Stream(t)
        self.loss = make_loss(t)
        self.seconds = 0.0
        self.step = 0
        self.losses: list[float] = []
        self.on_eval, self.on_checkpoint = on_eval, on_checkpoint
        self.checkpoint_dir = checkpoint_dir
        self.history: list[dict[str, float]] = []

    def fraction(self) -> float:
        """Share of the budget spent (the larger of steps and minutes)."""
        f = 0.0
        if self.t.max_steps:
            f = max(f, self.step / self.t.max_steps)
        if self.t.max_minutes:
            f = max(f, self.seconds / (60.0 * self.t.max_minutes))
        return f

    def lr_at(self, frac: float) -> float:
        warm = 0.03
        if frac < warm:
            return self.t.lr * max(frac / warm, 0.05)
        return self.t.lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min((frac - warm) / (1 - warm), 1.0))))

    def train_step(self) -> float:
        t0 = time.perf_counter()
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(self.fraction())
        x, y = self.stream.batch()
        loss = self.loss(self.model(x), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.step += 1
        self.seconds += time.perf_counter() - t0
        self.losses.append(float(loss.detach()))
        return self.losses[-1]

    def checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None:
            return None
        path = save_weights(self.model, Path(self.checkpoint_dir) / "last.pt", self.t.network,
                            extra={"step": self.step})
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.step, path)
        return path

    def run(self) -> dict[str, float]:
        """Train until the budget is spent; returns the last validation and the run's totals."""
        val = validation_set(self.t)
        probe = mass_probe(self.t.generator.shape)
        last_loss = 0
        metrics: dict[str, float] = {}
        while self.fraction() < 1.0:
            self.train_step()
            end = self.fraction() >= 1.0
            if self.step % self.t.eval_every == 0 or end:
                metrics = {**validate(self.model, val), "mass_fp": mass_false_positives(self.model, probe),
                           "loss": float(np.mean(self.losses[last_loss:])), "lr": self.lr_at(self.fraction()),
                           "train_minutes": self.seconds / 60.0, "generation_minutes": self.stream.gen_seconds / 60,
                           "volumes": float(self.stream.k)}
                last_loss = len(self.losses)
                self.history.append({"step": float(self.step), **metrics})
                if self.on_eval is not None:
                    self.on_eval(self.step, metrics, self.model, val)
            if self.step % self.t.checkpoint_every == 0 or end:
                self.checkpoint()
        self.model.eval()
        return {**metrics, "steps": float(self.step),
                "mean_label_fraction": float(np.mean(self.stream.fractions)) if self.stream.fractions else 0.0}


def plain_history(history: list[Mapping[str, float]]) -> list[dict[str, float]]:
    """The validation history as plain dicts (for a JSON artifact)."""
    return [dict(h) for h in history]
