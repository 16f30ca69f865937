"""Self-training's settings, defaults stated once here: the teacher, the student in sections, the mode.

``SelfTrainSettings`` (the method's) = ``teacher`` (:class:`TeacherConfig`: any registered method, or a baseline
preset file read when the config is loaded) + ``student`` (:class:`StudentSettings`: pseudo-labels, network,
training, loss, augmentation, inference and the rule that combines student and teacher) + ``mode``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from stego_core._checks import check_choice, check_range
from stego_core.engine.postprocess import PostprocessStep

__all__ = ["COMBINE_RULES", "PseudoLabelSettings", "StudentNetwork", "StudentTraining", "StudentLoss",
           "StudentAugment", "StudentInference", "CombineSettings", "StudentSettings", "TeacherConfig",
           "SelfTrainSettings", "read_teacher_preset"]

#: Label-free rules that combine a student's probability with its teacher
#: (:func:`stego_core.methods.selftrain.student.combine`).
COMBINE_RULES = ("student", "teacher", "union_bright", "topn", "topn_mean", "union", "intersection")


@dataclass(frozen=True)
class PseudoLabelSettings:
    """Targets from the teacher: vessel = teacher mask AND probability >= ``high``; background = probability <
    ``low`` AND more than ``band_vox`` voxels from the teacher mask (0: no band); the rest is ignored."""

    high: float = 0.5
    low: float = 0.5
    band_vox: int = 1

    def __post_init__(self) -> None:
        check_range(self.high, "student.pseudo.high", 0.0, 1.0)
        check_range(self.low, "student.pseudo.low", 0.0, 1.0)
        if self.low > self.high:
            raise ValueError(f"student.pseudo.low={self.low} must not exceed student.pseudo.high={self.high}")
        check_range(self.band_vox, "student.pseudo.band_vox", 0)


@dataclass(frozen=True)
class StudentNetwork:
    """A small MONAI ``UNet`` with batch norm: ``dims`` ``2d`` or ``2.5d`` (``context`` neighbouring slices on each
    side as channels), feature widths ``channels`` per level (``len - 1`` down-samplings by 2), ``res_units``
    residual units per level."""

    dims: str = "2.5d"
    context: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    res_units: int = 1

    def __post_init__(self) -> None:
        check_choice(self.dims, "student.network.dims", ("2d", "2.5d"))
        check_range(self.context, "student.network.context", 0)
        check_range(self.res_units, "student.network.res_units", 0)
        if len(self.channels) < 2 or any(int(c) != c or c < 1 for c in self.channels):
            raise ValueError(f"student.network.channels={list(self.channels)} must list at least two positive widths "
                             "(one per U-Net level)")


@dataclass(frozen=True)
class StudentTraining:
    """Adam on square crops of ``crop`` pixels, ``batch`` per step, ``vessel_fraction`` of them centred on a
    teacher vessel voxel (the rest anywhere in the brain mask). Every ``val_every``-th slice with brain is held
    apart; every ``eval_every`` steps the student's agreement with the confident pseudo-labels there is measured
    and the best weights kept (0: the last). ``threads``: torch CPU threads (0: torch's setting; 1 by default: a
    second thread on two busy cores made a step 10x slower here)."""

    crop: int = 64
    steps: int = 1500
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-5
    vessel_fraction: float = 0.5
    val_every: int = 10
    eval_every: int = 250
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        check_range(self.crop, "student.training.crop", 8)
        check_range(self.steps, "student.training.steps", 0)
        check_range(self.batch, "student.training.batch", 1)
        check_range(self.lr, "student.training.lr", 0.0, low_inclusive=False)
        check_range(self.weight_decay, "student.training.weight_decay", 0.0)
        check_range(self.vessel_fraction, "student.training.vessel_fraction", 0.0, 1.0)
        check_range(self.val_every, "student.training.val_every", 2)
        check_range(self.eval_every, "student.training.eval_every", 0)
        check_range(self.threads, "student.training.threads", 0)


@dataclass(frozen=True)
class StudentLoss:
    """Weights of the masked BCE, masked soft Dice and masked soft-clDice (0 turns a term off);
    ``cldice_iters``: soft-skeleton iterations of MONAI's ``SoftclDiceLoss``."""

    bce_weight: float = 1.0
    dice_weight: float = 1.0
    cldice_weight: float = 0.0
    cldice_iters: int = 3

    def __post_init__(self) -> None:
        for name in ("bce_weight", "dice_weight", "cldice_weight"):
            check_range(getattr(self, name), f"student.loss.{name}", 0.0)
        check_range(self.cldice_iters, "student.loss.cldice_iters", 1)


@dataclass(frozen=True)
class StudentAugment:
    """Augmentations, each with probability ``prob`` per crop: flips, 90-degree rotations, intensity scale (+-10 %)
    and shift (+-0.05), gamma in [0.7, 1.5], Gaussian noise (std <= 0.03), MONAI's small 2D elastic deformation."""

    flip: bool = True
    rot90: bool = True
    intensity: bool = True
    gamma: bool = True
    noise: bool = True
    elastic: bool = False
    prob: float = 0.3

    def __post_init__(self) -> None:
        check_range(self.prob, "student.augment.prob", 0.0, 1.0)


@dataclass(frozen=True)
class StudentInference:
    """``tta``: average over the four flips of each slice; ``batch``: slices per forward pass."""

    tta: bool = False
    batch: int = 8

    def __post_init__(self) -> None:
        check_range(self.batch, "student.inference.batch", 1)


@dataclass(frozen=True)
class CombineSettings:
    """How student and teacher become one mask (:func:`~stego_core.methods.selftrain.student.combine`).

    Attributes
    ----------
    rule : str
        One of :data:`COMBINE_RULES`.
    student_cut : float
        Cut of the student probability for ``student`` and the ``union*`` / ``intersection`` rules.
    union_cut : float
        Student probability above which ``union_bright`` adds a voxel to the teacher's mask.
    bright_fraction : float in [0, 1]
        ``union_bright``: a voxel is bright when its intensity reaches the quantile ``bright_fraction`` of the
        image over the teacher's vessel voxels (0.05: brighter than the dimmest 5 % of the teacher's vessels).
    topn_scale : float
        ``topn`` / ``topn_mean`` keep ``topn_scale * N`` voxels, N = the teacher's vessel voxel count.
    teacher_weight : float
        ``topn_mean``: the score ranked is ``(1 - w) * student + w * teacher probability``.
    mask_teacher_prob : bool
        ``topn_mean``: the teacher's probability counts only inside its mask.
    keep_trees : float
        Then keep only components of at least this fraction of the largest one (0: off).
    min_size_vox : int
        Then drop components under this many voxels (26-connectivity; 0: off).
    margin_vox : int
        Student predictions are kept within the brain mask dilated by this many voxels (0: the mask).
    """

    rule: str = "student"
    student_cut: float = 0.5
    union_cut: float = 0.9
    bright_fraction: float = 0.05
    topn_scale: float = 1.0
    teacher_weight: float = 0.0
    mask_teacher_prob: bool = False
    keep_trees: float = 0.0
    min_size_vox: int = 0
    margin_vox: int = 0

    def __post_init__(self) -> None:
        check_choice(self.rule, "student.combine.rule", COMBINE_RULES)
        for name in ("student_cut", "union_cut", "bright_fraction", "teacher_weight", "keep_trees"):
            check_range(getattr(self, name), f"student.combine.{name}", 0.0, 1.0)
        check_range(self.topn_scale, "student.combine.topn_scale", 0.0, low_inclusive=False)
        check_range(self.min_size_vox, "student.combine.min_size_vox", 0)
        check_range(self.margin_vox, "student.combine.margin_vox", 0)


@dataclass(frozen=True)
class StudentSettings:
    """Every knob of the student (:mod:`stego_core.methods.selftrain.student`), in sections.

    ``axis``: slicing axis of the (I, J, K) volumes; ``views``: one student per listed axis, their probabilities
    averaged (empty: ``axis`` only; each view's student sees its own 2.5D slab, so the average has 3D context);
    ``rounds``: from the second round on, the pseudo-labels come from the previous round's student probability
    and combined mask (noisy student), while the combination is always made with the original teacher, which
    anchors every round.
    """

    axis: int = 2
    views: tuple[int, ...] = ()
    rounds: int = 1
    pseudo: PseudoLabelSettings = field(default_factory=PseudoLabelSettings)
    network: StudentNetwork = field(default_factory=StudentNetwork)
    training: StudentTraining = field(default_factory=StudentTraining)
    loss: StudentLoss = field(default_factory=StudentLoss)
    augment: StudentAugment = field(default_factory=StudentAugment)
    inference: StudentInference = field(default_factory=StudentInference)
    combine: CombineSettings = field(default_factory=CombineSettings)

    def __post_init__(self) -> None:
        check_choice(self.axis, "student.axis", (0, 1, 2))
        for view in self.views:
            check_choice(view, "student.views", (0, 1, 2))
        check_range(self.rounds, "student.rounds", 1)
        levels = len(self.network.channels) - 1
        if self.training.crop % (2 ** levels):
            raise ValueError(f"student.training.crop={self.training.crop} must be divisible by 2**{levels} (the "
                             "U-Net's down-samplings)")

    @property
    def in_channels(self) -> int:
        """Channels of the student's input: ``2 * context + 1`` for 2.5D, else 1."""
        return 2 * self.network.context + 1 if self.network.dims == "2.5d" else 1

    @property
    def view_axes(self) -> tuple[int, ...]:
        """The slicing axes of the students: ``views``, or ``axis`` alone."""
        return tuple(self.views or (self.axis,))

    def for_view(self, index: int, round_: int = 1) -> StudentSettings:
        """The settings of the student of view ``index`` (0-based) in round ``round_`` (1-based): its slicing
        axis and its seed, ``seed + 100 * (round - 1) + index``, the one seeding rule of every student."""
        seed = self.training.seed + 100 * (round_ - 1) + index
        return dataclasses.replace(self, axis=self.view_axes[index],
                                   training=dataclasses.replace(self.training, seed=seed))


_PRESET_KEYS = {"method", "settings", "postprocess", "data", "crf", "engine", "split", "viewer", "analysis", "domain",
                "test_fraction", "split_seed", "test_cases", "output", "experiment", "save_probabilities", "progress",
                "crf_settings"}


def read_teacher_preset(path: str) -> dict[str, Any]:
    """``method``, ``settings``, ``postprocess`` and ``skull_strip`` of a baseline preset file.

    Raises
    ------
    ValueError
        The file is missing, a folder, not YAML, or not a baseline preset (naming ``teacher.preset``).
    """
    from stego_core.config import config_path

    p = config_path(path)
    if not p.exists():
        raise ValueError(f"teacher.preset={path!r}: no such file (a baseline preset such as "
                         "experiments/configs/best_mra.yaml, relative to the working directory or to the config "
                         "file that names it)")
    if p.is_dir():
        raise ValueError(f"teacher.preset={path!r} is a folder, not a preset file")
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"teacher.preset={path!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(tree, dict) or "method" not in tree or set(tree) - _PRESET_KEYS:
        keys = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
        raise ValueError(f"teacher.preset={path!r} is not a baseline preset (it needs 'method' and may hold only "
                         f"baseline keys; found {keys})")
    steps = list(tree.get("postprocess") or [])
    if tree.get("crf") and not any(isinstance(s, dict) and s.get("step") == "crf" for s in steps):
        steps.insert(0, {"step": "crf"})
    return {"method": tree["method"], "settings": dict(tree.get("settings") or {}), "postprocess": steps,
            "skull_strip": (tree.get("data") or {}).get("skull_strip", "auto")}


@dataclass(frozen=True)
class TeacherConfig:
    """The label-free method whose confident voxels a student learns.

    Either ``preset``: a baseline preset file (``experiments/configs/best_mra.yaml``), read once when the config
    is loaded: its ``method``, ``settings``, ``postprocess`` and skull strip are copied here (``--print-config``
    and ``plan.yaml`` show them, ``name`` keeps the preset's name) and the file is never read again; or
    ``method`` (any registered method: a baseline, ``stego`` with ``settings: {model_uri: <train run>}``),
    ``settings`` and ``postprocess`` given here. ``name``: how runs name the teacher (the preset's name, else the
    method with its steps). ``skull_strip``: the mask the teacher was chosen with (a preset's
    ``data.skull_strip``); the run's ``data.skull_strip`` must match it.
    """

    preset: str = ""
    method: str = ""
    settings: Any = field(default_factory=dict)
    postprocess: tuple[PostprocessStep, ...] = ()
    name: str = ""
    skull_strip: str = ""

    def __post_init__(self) -> None:
        from stego_core.methods.registry import resolve_settings

        values: dict[str, Any] = {}
        if self.preset:
            if self.method or self.postprocess or (self.settings and self.settings != {}):
                raise ValueError(f"teacher.preset={self.preset!r} and teacher.method / settings / postprocess are "
                                 "both given: a preset states the whole teacher; drop one")
            read = read_teacher_preset(self.preset)
            from stego_core.config import from_dict

            values = {"preset": "", "method": read["method"],
                      "postprocess": tuple(from_dict(PostprocessStep, s, prefix="teacher.postprocess.")
                                           for s in read["postprocess"]),
                      "name": self.name or Path(self.preset).stem, "skull_strip": read["skull_strip"],
                      "settings": read["settings"]}
        method = values.get("method", self.method) or "gmm"
        settings = values.get("settings", self.settings)
        if method == "selftrain":
            raise ValueError("teacher.method=selftrain: a student cannot teach itself; name a label-free method")
        values["method"] = method
        values["settings"] = resolve_settings(method, settings, prefix="teacher.settings.")
        if not (values.get("name") or self.name):
            steps = values.get("postprocess", self.postprocess)
            values["name"] = method + "".join(f"+{s.step}" for s in steps)
        for key, value in values.items():
            object.__setattr__(self, key, value)


@dataclass(frozen=True)
class SelfTrainSettings:
    """The ``selftrain`` method: a student network trained on a teacher's pseudo-labels.

    ``mode: transductive`` (default) trains one student per evaluated volume on that volume (no label);
    ``inductive`` trains one student on the training volumes (``fit``) and applies it to the evaluated ones.
    ``model_uri``: the students of a ``selftrain`` run, applied without training (with that run's settings).
    """

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentSettings = field(default_factory=StudentSettings)
    mode: str = "transductive"
    model_uri: str = ""

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", ("transductive", "inductive"))

    def check_split(self, split: str) -> None:
        """A teacher fitted on the training volumes answers for its own split rule (a STEGO teacher mapping its
        clusters with labels refuses ``split: all``)."""
        check = getattr(self.teacher.settings, "check_split", None)
        if callable(check) and not self.model_uri:
            try:
                check(split)
            except ValueError as exc:
                raise ValueError(f"teacher: {exc}") from None

    def check_data(self, data: Any) -> None:
        """The run's skull strip must be the one the teacher was chosen with (a preset's)."""
        wanted = self.teacher.skull_strip
        if wanted and data.skull_strip != wanted:
            raise ValueError(f"teacher {self.teacher.name} strips the skull with {wanted!r} but this run's "
                             f"data.skull_strip is {data.skull_strip!r}; set data.skull_strip={wanted}")
