"""Every config of the platform, in one place: frozen dataclasses loaded from YAML with ``section.key=value``
overrides.

A run's config nests the sections below; each entry point's config (``PrepareConfig``, ``TrainConfig``,
``BaselineConfig``, ``ReconstructConfig``, ``MainConfig``) extends :class:`RunSettings` (split, output,
experiment). Defaults are stated once, here: the YAML files in ``experiments/configs/`` state only what
differs. Unknown keys fail listing the valid ones, values are converted to the field's type, and
``__post_init__`` checks ranges. The resolved config is saved with the run and flattened into MLflow params
(:func:`flatten`). The sweep's own settings live beside its search space (``sweeps/space.py``), since they
are validated against Optuna.

>>> cfg = load_config(PrepareConfig, None, ["slicing.patch_size=32", "slicing.axis=1"])
>>> cfg.slicing.patch_size, cfg.slicing.axis
(32, 1)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

from stego_core._checks import check_choice, check_range
from stego_core.engine.crf import CRF_PRESETS, CRFSettings
from stego_core.engine.postprocess import STEPS

T = TypeVar("T")

SKULL_STRIP_MODES = ("auto", "given", "head", "none")
STANDARDIZE_METHODS = ("zscore_minmax", "percentile")
BLEND_MODES = ("constant", "gaussian")
FUSION_MODES = ("mean", "max")
SAMPLING_METHODS = ("none", "bright")
#: Upper bound of ``model.n_clusters`` (vessel tokens are ~1 % of a crop: K of 64-256 isolates them).
MAX_CLUSTERS = 4096
CLUSTER_RULES = ("auto", "hungarian", "majority", "dice", "brightness", "bright_cut")
#: The cluster rules that read no label (allowed on the volumes being evaluated).
LABEL_FREE_RULES = ("brightness", "bright_cut")


# ------------------------------------------------------------------------------------------- shared sections


@dataclass(frozen=True)
class RunSettings:
    """What every entry point shares: the train/test split of the cases (seeded by ``split_seed``, or named by
    ``test_cases``: held-out case ids, e.g. ``test_cases=mra_mni_0640`` for one fold of a leave-one-out
    rotation), where outputs go (one folder per run id below ``output``) and the MLflow experiment."""

    test_fraction: float = 0.34
    split_seed: int = 0
    test_cases: tuple[str, ...] = ()
    output: str = "outputs"
    experiment: str = "stego-vessels"

    def __post_init__(self) -> None:
        check_range(self.test_fraction, "test_fraction", 0.0, 1.0, high_inclusive=False)


# ------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class PhantomConfig:
    """Synthetic TOF-MRA phantoms: how many, their seed, and every generation parameter (:mod:`stego_core.data.phantom`).

    Lengths named ``*_vox`` are in units of the finest voxel spacing (``min(spacing_mm)``), those named
    ``*_mm`` in millimetres. Intensities are on a 0-255 scale like the real 8-bit case.

    Attributes
    ----------
    n_volumes : int
        How many phantoms ``source: phantom`` generates (``phantom_000``, ``phantom_001``, ...).
    seed : int
        Seed of the first phantom; phantom ``i`` uses ``seed + i``.
    shape : (3,) tuple of int
        Grid size (I, J, K); K is the axial (inferior -> superior) axis.
    spacing_mm : (3,) tuple of float
        Voxel size along each axis, in mm.
    n_trees : int
        Number of arterial trees entering from the skull base.
    max_depth : int
        Maximum number of bifurcation generations per tree.
    root_radius_vox : (2,) tuple of float
        Range (low, high) of root radii.
    min_radius_vox : float
        Branches thinner than this are not grown.
    segment_length_radii : (2,) tuple of float
        Range of segment lengths between bifurcations, in radii of the segment.
    bifurcation_angle_deg : (2,) tuple of float
        Range of the angle between the two children of a bifurcation, in degrees.
    murray_jitter : float
        Share of ``r0**3`` given to the first child is drawn from ``0.5 +/- murray_jitter``.
    tortuosity_deg : float
        Standard deviation of the random turn per step along a segment, in degrees.
    sinus : bool
        Draw a superior sagittal sinus (part of the vessel label, as in the real case).
    sinus_radius_vox : float
        Radius of the sinus.
    head_fill : float
        Fraction of the field of view spanned by the head in-plane.
    scalp_mm, skull_mm, csf_rim_mm : float
        Thickness of the scalp/fat shell, of the skull and of the CSF rim around the brain.
    vessel_intensity, brain_intensity, csf_intensity, scalp_intensity, skull_intensity, skin_intensity : float
        Mean intensities of the tissues before bias and noise. The vessel value may exceed 255: the image is
        clipped to [0, 255], so thick vessels saturate as they do in 8-bit TOF data.
    texture : float
        Relative amplitude of the smooth brain and scalp texture.
    noise_sigma : float
        Standard deviation of the Gaussian noise in each of the real and imaginary channels (Rician noise).
    bias_strength : float
        The bias field spans ``1 +/- bias_strength``.
    """

    n_volumes: int = 3
    seed: int = 0
    shape: tuple[int, int, int] = (96, 96, 64)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    n_trees: int = 5
    max_depth: int = 9
    root_radius_vox: tuple[float, float] = (1.3, 2.5)
    min_radius_vox: float = 0.3
    segment_length_radii: tuple[float, float] = (4.0, 10.0)
    bifurcation_angle_deg: tuple[float, float] = (30.0, 75.0)
    murray_jitter: float = 0.15
    tortuosity_deg: float = 15.0
    sinus: bool = True
    sinus_radius_vox: float = 2.2
    head_fill: float = 0.94
    scalp_mm: float = 4.0
    skull_mm: float = 3.5
    csf_rim_mm: float = 1.5
    vessel_intensity: float = 290.0
    brain_intensity: float = 125.0
    csf_intensity: float = 45.0
    scalp_intensity: float = 175.0
    skull_intensity: float = 25.0
    skin_intensity: float = 120.0
    texture: float = 0.08
    noise_sigma: float = 10.0
    bias_strength: float = 0.2

    def __post_init__(self) -> None:
        check_range(self.n_volumes, "phantom.n_volumes", 1)
        if len(self.shape) != 3 or any(int(s) != s for s in self.shape) or min(self.shape) < 24:
            raise ValueError(f"phantom.shape={self.shape!r} must be three sizes >= 24 (integers)")
        if len(self.spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise ValueError(f"phantom.spacing_mm={self.spacing_mm!r} must be 3 positive finite numbers")
        for name in ("root_radius_vox", "segment_length_radii", "bifurcation_angle_deg"):
            pair = getattr(self, name)
            if len(pair) != 2 or not pair[0] <= pair[1]:
                raise ValueError(f"{name}={pair!r} must be a (low, high) pair with low <= high")
        check_range(self.n_trees, "n_trees", 1, 16)
        check_range(self.max_depth, "max_depth", 0, 12)
        check_range(self.root_radius_vox[0], "root_radius_vox", 0.5, None)
        check_range(self.root_radius_vox[1], "root_radius_vox", None, 8.0)
        check_range(self.min_radius_vox, "min_radius_vox", 0.1, self.root_radius_vox[0])
        check_range(self.segment_length_radii[0], "segment_length_radii", 1.0, None)
        check_range(self.segment_length_radii[1], "segment_length_radii", None, 40.0)
        check_range(self.bifurcation_angle_deg[0], "bifurcation_angle_deg", 0.0, None, low_inclusive=False)
        check_range(self.bifurcation_angle_deg[1], "bifurcation_angle_deg", None, 180.0, high_inclusive=False)
        check_range(self.murray_jitter, "murray_jitter", 0.0, 0.45)
        check_range(self.tortuosity_deg, "tortuosity_deg", 0.0, 45.0)
        check_range(self.sinus_radius_vox, "sinus_radius_vox", 0.5, 8.0)
        check_range(self.head_fill, "head_fill", 0.5, 1.0)
        for name in ("scalp_mm", "skull_mm", "csf_rim_mm"):
            check_range(getattr(self, name), name, 0.0, 30.0)
        check_range(self.vessel_intensity, "vessel_intensity", 0.0, 400.0)
        for name in ("brain_intensity", "csf_intensity", "scalp_intensity",
                     "skull_intensity", "skin_intensity"):
            check_range(getattr(self, name), name, 0.0, 255.0)
        check_range(self.texture, "texture", 0.0, 0.5)
        check_range(self.noise_sigma, "noise_sigma", 0.0, 100.0)
        check_range(self.bias_strength, "bias_strength", 0.0, 0.9)
        # the brain must be left with room once the shells are peeled off the head
        half_min_mm = 0.5 * self.head_fill * min(n * s for n, s in zip(self.shape[:2], self.spacing_mm[:2]))
        shells = self.scalp_mm + self.skull_mm + self.csf_rim_mm
        if shells > 0.6 * half_min_mm:
            raise ValueError(f"scalp_mm + skull_mm + csf_rim_mm = {shells:g} mm leaves no room for a brain in a "
                             f"head of in-plane half-width {half_min_mm:g} mm; use a larger shape or thinner shells")


@dataclass(frozen=True)
class DataConfig:
    """Where volumes come from and how they are preprocessed.

    ``source`` is ``phantom`` (generated into ``root``) or ``folder`` (existing case folders under ``root``).
    """

    source: str = "phantom"
    root: str = "data/phantoms"
    skull_strip: str = "auto"
    standardize: str = "zscore_minmax"
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    def __post_init__(self) -> None:
        check_choice(self.source, "data.source", ("phantom", "folder"))
        check_choice(self.skull_strip, "data.skull_strip", SKULL_STRIP_MODES)
        check_choice(self.standardize, "data.standardize", STANDARDIZE_METHODS)


@dataclass(frozen=True)
class SlicingConfig:
    """2D crops cut from slices along ``axis`` (0, 1 or 2; 2 = axial for RAS-like volumes)."""

    axis: int = 2
    patch_size: int = 32
    stride: int = 16
    min_brain_fraction: float = 0.05

    def __post_init__(self) -> None:
        check_choice(self.axis, "slicing.axis", (0, 1, 2))
        check_range(self.patch_size, "slicing.patch_size", 4)
        check_range(self.stride, "slicing.stride", 1, self.patch_size)
        check_range(self.min_brain_fraction, "slicing.min_brain_fraction", 0.0, 1.0)


@dataclass(frozen=True)
class DataSettings:
    """The volumes and their 2D crops: the sections every step that reads data shares."""

    data: DataConfig = field(default_factory=DataConfig)
    slicing: SlicingConfig = field(default_factory=SlicingConfig)


@dataclass(frozen=True)
class PrepareConfig(DataSettings, RunSettings):
    """The ``prepare`` entry point: volumes -> preprocessed 2D crops in the seed's dataset layout."""

    output: str = "outputs/prepare"
    dataset_name: str = "mra"


# ------------------------------------------------------------------------------------ crop sampling

@dataclass(frozen=True)
class SamplingConfig:
    """Label-free crop sampling (:mod:`stego_core.data.sampling`): crops are weighted by the fraction of their pixels
    above the ``quantile``-th percentile of their volume's brain intensities, plus ``floor`` times the mean.

    ``method: none`` draws uniformly. ``max_crops`` (STEGO training) keeps that many crops, drawn by weight
    without replacement, before features are computed; when every crop is kept (0, or no more crops than
    ``max_crops``) the loader draws batches by weight instead.
    """

    method: str = "bright"
    quantile: float = 99.0
    floor: float = 0.05
    max_crops: int = 0

    def __post_init__(self) -> None:
        check_choice(self.method, "sampling.method", SAMPLING_METHODS)
        check_range(self.quantile, "sampling.quantile", 0.0, 100.0, low_inclusive=False, high_inclusive=False)
        check_range(self.floor, "sampling.floor", 0.0)
        check_range(self.max_crops, "sampling.max_crops", 0)



# ----------------------------------------------------------------------------------- model and training


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and head. ``weights``: ``hub``, ``random`` (tests only) or a local weights file.

    ``classical_standardize`` (``crop`` or ``fixed``) is the per-channel normalisation of the ``classical``
    featurizer (ignored by the ViTs). ``cluster_fit``: the centroids that map codes to clusters, either STEGO's
    cluster probe trained alongside the head (``probe``, the paper's) or spherical k-means of the head's codes
    on the mapping crops, re-fitted at every mapping (``kmeans``). ``alpha``: inverse temperature of the
    cluster softmax behind the vessel probability (STEGO evaluates at 2); the 0.5 decision does not depend on
    it, but the dense CRF does: with K = 64 clusters the probabilities stay near 0.5 and the CRF erases the
    thin vessels (demo phantom, Dice 0.69 without CRF: with CRF 0.0 at alpha 2 and 10, 0.35 at 30, 0.51 at 100).
    ``bright_quantile``: the bright-voxel cut of the label-free ``bright_cut`` rule, a percentile of the mapping
    crops' brain intensities (every cluster whose mean intensity reaches it is vessel).
    """

    backbone: str = "vit_small_patch8_dino"
    weights: str = "hub"
    res: int | None = None
    classical_standardize: str = "crop"
    code_dim: int = 70
    dropout: float = 0.1
    n_clusters: int = 2
    cluster_rule: str = "auto"
    cluster_fit: str = "probe"
    threshold: float = 0.5
    alpha: float = 100.0
    bright_quantile: float = 99.0

    def __post_init__(self) -> None:
        check_range(self.code_dim, "model.code_dim", 1)
        check_range(self.dropout, "model.dropout", 0.0, 1.0, high_inclusive=False)
        # the cluster probe holds K centroids and every mapping a (pixels x K) similarity matrix: beyond a few
        # thousand clusters that allocation fails long after the features are cached, so say it here
        check_range(self.n_clusters, "model.n_clusters", 2, MAX_CLUSTERS)
        check_choice(self.cluster_rule, "model.cluster_rule", CLUSTER_RULES)
        check_choice(self.cluster_fit, "model.cluster_fit", ("probe", "kmeans"))
        check_choice(self.classical_standardize, "model.classical_standardize", ("crop", "fixed"))
        check_range(self.threshold, "model.threshold", 0.0, 1.0)
        check_range(self.alpha, "model.alpha", 0.0, low_inclusive=False)
        check_range(self.bright_quantile, "model.bright_quantile", 0.0, 100.0, low_inclusive=False,
                    high_inclusive=False)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and shifts of STEGO's three correspondence terms (defaults: the seed's vessel settings).

    Attributes
    ----------
    pos_intra_weight, pos_intra_shift : float
        The image with itself (0.67, 0.18).
    pos_inter_weight, pos_inter_shift : float
        The image with a kNN neighbour (0.25, 0.12).
    neg_inter_weight, neg_inter_shift : float
        The image with random other images of the batch (0.63, 0.46).
    neg_samples : int
        Derangements of the batch used for the negative term (5).
    n_points : int
        Side of the grid of random sampling points (11 -> 121 points per image).
    knn_k : int
        Neighbours kept per crop in the kNN table of pooled backbone features (30).
    knn_rank_max : int
        Neighbours are drawn uniformly from kNN ranks ``1..knn_rank_max`` (7) by the data side
        (:func:`stego_core.features.cache.draw_knn_partners`).
    intra_same_points : bool
        True (default, as STEGO's reference code does): the self term compares the image's sampled points with
        themselves. False: with a second, independent grid of the same image.
    """

    pos_intra_weight: float = 0.67
    pos_intra_shift: float = 0.18
    pos_inter_weight: float = 0.25
    pos_inter_shift: float = 0.12
    neg_inter_weight: float = 0.63
    neg_inter_shift: float = 0.46
    neg_samples: int = 5
    n_points: int = 11
    knn_k: int = 30
    knn_rank_max: int = 7
    intra_same_points: bool = True

    def __post_init__(self) -> None:
        for name in ("pos_intra_weight", "pos_inter_weight", "neg_inter_weight"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"LossConfig.{name}={v!r} must be a finite number >= 0")
        for name in ("pos_intra_shift", "pos_inter_shift", "neg_inter_shift"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v)):
                raise ValueError(f"LossConfig.{name}={v!r} must be a finite number")
        for name, low in (("neg_samples", 0), ("n_points", 1), ("knn_k", 1), ("knn_rank_max", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"LossConfig.{name}={v!r} must be an integer >= {low}")


#: ``train.features`` values: read a disk cache of the features, or compute them in the training step.
FEATURE_SOURCES = ("cache", "online")


@dataclass(frozen=True)
class TrainSettings:
    """Optimisation and bookkeeping (seed defaults: batch 24, 5000 steps, Adam 5e-4 head / 5e-3 probe)."""

    seed: int = 0
    max_steps: int = 5000
    batch_size: int = 24
    lr_head: float = 5e-4
    lr_cluster: float = 5e-3
    lr_linear: float = 1e-3
    val_every_n_steps: int = 500
    log_every_n_steps: int = 10
    accelerator: str = "auto"
    #: crops per backbone pass when caching features; null: chosen from the backbone and the memory
    #: (``backbones.forward_batch_size``)
    feature_batch_size: int | None = None
    feature_amp: bool = False
    max_val_crops: int = 512
    max_mapping_crops: int = 4096
    cache_dir: str = "outputs/feature_cache"
    #: disk budget of the training crops' feature cache in GB (0: none); above it the crops are subsampled by
    #: their sampling weights to fit (bytes per crop: ``features.feature_bytes_per_crop``)
    cache_max_gb: float = 20.0
    progress: bool = True  # progress bars, on a terminal only (plain log lines otherwise)
    save_top_k: int = 3  # checkpoints kept by validation clDice (plus last.ckpt)
    system_metrics: bool = True  # MLflow system metrics (CPU, memory, GPU) while training
    #: continue from a checkpoint: a Lightning ``.ckpt`` file or the id of a train run (its ``interrupted.ckpt``,
    #: saved on SIGTERM / SIGINT, else its ``last.ckpt``); "" starts afresh
    resume_from: str = ""
    #: where the training step gets the frozen backbone's features: ``cache`` (computed once into
    #: ``cache_dir``, read every step) or ``online`` (computed from the crops inside the training step, no disk;
    #: the kNN partners come from the crops' pooled features, computed once at setup)
    features: str = "cache"

    def __post_init__(self) -> None:
        check_range(self.max_steps, "train.max_steps", 1)
        check_range(self.batch_size, "train.batch_size", 2)
        check_range(self.val_every_n_steps, "train.val_every_n_steps", 1)
        if self.feature_batch_size is not None:
            check_range(self.feature_batch_size, "train.feature_batch_size", 1)
        check_range(self.cache_max_gb, "train.cache_max_gb", 0.0)
        for name in ("lr_head", "lr_cluster", "lr_linear"):
            check_range(getattr(self, name), f"train.{name}", 0.0, low_inclusive=False)
        check_choice(self.accelerator, "train.accelerator", ("auto", "cpu", "cuda", "gpu"))
        check_choice(self.features, "train.features", FEATURE_SOURCES)


#: ``trainer.strategy`` values: ``auto`` is one process for one device and DDP for more.
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")


@dataclass(frozen=True)
class TrainerSettings:
    """How many processes a learned step runs on (Lightning's ``Trainer`` arguments of the same names).

    ``devices`` processes per machine (one per GPU; CPU processes with ``train.accelerator=cpu``) on
    ``num_nodes`` machines. More than one process is launched from outside, one command per machine:
    ``torchrun --nproc_per_node <devices> [--nnodes <num_nodes> ...] -m experiments.<step> ...`` or ``srun``
    (SLURM, one task per device); :mod:`stego_core.runtime.distributed` joins them, rank 0 alone logs to MLflow and
    writes the run's files. ``strategy: auto`` is a single process for one device and DDP (gradients averaged
    over ranks, the batch size per process) for more. ``precision: auto`` is each step's own default (STEGO:
    ``32-true``; DINO: bf16 autocast on a GPU, float32 on CPU).
    """

    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_range(self.devices, "trainer.devices", 1)
        check_range(self.num_nodes, "trainer.num_nodes", 1)
        check_choice(self.strategy, "trainer.strategy", STRATEGIES)
        check_choice(self.precision, "trainer.precision", PRECISIONS)

    @property
    def world_size(self) -> int:
        """Processes in all: ``devices * num_nodes``."""
        return self.devices * self.num_nodes

    def lightning_strategy(self) -> str:
        """The Lightning strategy: ``ddp`` for more than one process under ``auto``, else as given."""
        return "ddp" if self.strategy == "auto" and self.world_size > 1 else self.strategy


@dataclass(frozen=True)
class StegoSettings:
    """STEGO's sections, declared once for the ``train`` step and the pipeline (``main``) that runs it.

    ``val_stride``: sliding-window stride of the training run's validation reconstructions (null: half a crop).
    ``register``: register the logged model as a new version of ``model_name`` (model registry).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    val_stride: int | None = None
    log_model: bool = True
    register: bool = False
    model_name: str = "stego-segmenter"


@dataclass(frozen=True)
class TrainConfig(StegoSettings, DataSettings, RunSettings):
    """The ``train`` entry point: STEGO on the crops of ``data`` (:class:`StegoSettings`)."""

    output: str = "outputs/train"

# ------------------------------------------------------------------------ reconstruction and evaluation


@dataclass(frozen=True)
class EngineConfig:
    """Sliding-window settings, one default for every method.

    ``patch_size: null`` (default) is the method's own window: whole slices for the classical methods, the
    training crop size for a learned model. ``stride`` defaults to half a patch. ``blend`` weights overlapping
    crops (``constant`` or ``gaussian``); whole slices do not overlap and are taken as they are. ``batch_size``
    is the number of slices or crops cut and blended at once.

    Tri-planar fusion: ``axes: [0, 1, 2]`` runs the same sliding window along each listed axis (``axis`` is then
    ignored) and fuses the probabilities voxel by voxel, ``fusion: mean`` (the average: a voxel needs support
    from the views on average, which suppresses one-view streaks) or ``max`` (any one view suffices: more
    recall, more false positives). ``axes: null`` (default) slices along ``axis`` only. Volume-level
    segmenters (``frangi3d``, ``sato3d``) ignore the axes.
    """

    axis: int = 2
    patch_size: int | None = None
    stride: int | None = None
    batch_size: int = 64
    blend: str = "gaussian"
    axes: tuple[int, ...] | None = None
    fusion: str = "mean"

    def __post_init__(self) -> None:
        check_choice(self.axis, "engine.axis", (0, 1, 2))
        check_choice(self.fusion, "engine.fusion", FUSION_MODES)
        if self.axes is not None:
            if not self.axes or len(set(self.axes)) != len(self.axes):
                raise ValueError(f"engine.axes={self.axes!r} must list distinct axes among 0, 1, 2")
            for a in self.axes:
                check_choice(a, "engine.axes", (0, 1, 2))
        check_choice(self.blend, "engine.blend", BLEND_MODES)
        check_range(self.batch_size, "engine.batch_size", 1)
        if self.patch_size is not None:
            check_range(self.patch_size, "engine.patch_size", 4)
        if self.stride is not None:
            check_range(self.stride, "engine.stride", 1, self.patch_size)


@dataclass(frozen=True)
class PostprocessStep:
    """One label-free post-processing step (:data:`stego_core.engine.postprocess.STEPS`), parameters fixed a priori.
    The fields are the union of the registered steps' parameters; each step accepts its own (checked here).

    ``step`` is one of

    - ``smooth``: Gaussian smoothing of the probability, ``sigma_vox`` or ``sigma_mm``;
    - ``crf``: the dense CRF on every slice along ``engine.axis`` (``crf_settings``, or a named ``preset`` of
      :data:`stego_core.engine.crf.CRF_PRESETS`: ``thin`` keeps one-to-three-pixel vessels);
    - ``cc``: drop connected components (26-connectivity unless ``connectivity``) smaller than
      ``min_size_vox`` voxels or ``min_size_mm3`` mm^3;
    - ``largest``: keep components of at least ``min_fraction`` times the largest one's size;
    - ``fill_holes``: fill enclosed cavities of at most ``max_size_vox`` voxels or ``max_size_mm3`` mm^3.

    Probability steps (``smooth``, ``crf``) must come before mask steps. In YAML:
    ``postprocess: [{step: cc, min_size_mm3: 10}, {step: fill_holes, max_size_vox: 8}]``.
    """

    step: str = "cc"
    min_size_vox: int | None = None
    min_size_mm3: float | None = None
    min_fraction: float | None = None
    max_size_vox: int | None = None
    max_size_mm3: float | None = None
    sigma_vox: float | None = None
    sigma_mm: float | None = None
    connectivity: int | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        check_choice(self.step, "postprocess.step", tuple(STEPS))
        spec = STEPS[self.step]
        given = {f.name for f in dataclasses.fields(self) if f.name != "step" and getattr(self, f.name) is not None}
        extra = given - set(spec.params)
        if extra:
            raise ValueError(f"postprocess step {self.step!r} takes {sorted(spec.params) or 'no parameters'}; "
                             f"got {sorted(extra)}")
        if spec.one_of and len(given & set(spec.one_of)) != 1:
            raise ValueError(f"postprocess step {self.step!r} needs exactly one of {list(spec.one_of)}")
        if self.connectivity is not None:
            check_choice(self.connectivity, "postprocess.connectivity", (6, 18, 26))
        if self.preset is not None:
            check_choice(self.preset, "postprocess.preset", tuple(CRF_PRESETS))
        if self.min_fraction is not None:
            check_range(self.min_fraction, "postprocess.min_fraction", 0.0, 1.0, low_inclusive=False)
        for name in ("min_size_vox", "min_size_mm3", "max_size_vox", "max_size_mm3", "sigma_vox", "sigma_mm"):
            if getattr(self, name) is not None:
                check_range(getattr(self, name), f"postprocess.{name}", 0.0)


@dataclass(frozen=True)
class EvaluateConfig(RunSettings):
    """Which volumes to evaluate and how to reconstruct them.

    ``split: test`` evaluates the held-out volumes of the same seeded split that training uses
    (``test_fraction``, ``split_seed``); ``all`` evaluates every case. ``analysis`` adds the Betti-number errors,
    recall per vessel radius and (voxel size in mm known) HD95 / ASSD per case. ``crf: true`` refines every slice's
    probabilities with a dense CRF (``crf_settings``; needs ``pydensecrf2``) and adds ``+crf`` to the method.
    ``viewer`` logs ``viewer/<case>.html`` per volume (:mod:`stego_core.report.viewer`; about 2 MB and a few seconds for
    a 320 x 320 x 247 volume).
    """

    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    split: str = "test"
    output: str = "outputs/evaluate"
    save_probabilities: bool = False
    progress: bool = True
    analysis: bool = True
    viewer: bool = True
    crf: bool = False
    crf_settings: CRFSettings = field(default_factory=CRFSettings)
    postprocess: tuple[PostprocessStep, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.split, "split", ("test", "all"))
        seen_mask = False
        for st in self.postprocess:
            if STEPS[st.step].kind == "mask":
                seen_mask = True
            elif seen_mask:
                raise ValueError(f"postprocess: probability step {st.step!r} after a mask step; list smooth/crf "
                                 "first")

    def postprocess_steps(self) -> tuple[PostprocessStep, ...]:
        """The steps run after the segmenter: ``crf: true`` is a ``crf`` step in front of ``postprocess``."""
        crf = () if not self.crf or any(s.step == "crf" for s in self.postprocess) else (PostprocessStep("crf"),)
        return crf + tuple(self.postprocess)


@dataclass(frozen=True)
class BaselineConfig(EvaluateConfig):
    """The ``baseline`` entry point: a classical method by name with its settings (e.g. ``{q: 99.5}``)."""

    method: str = "frangi"
    settings: dict = field(default_factory=dict)
    output: str = "outputs/baseline"


@dataclass(frozen=True)
class ReconstructConfig(EvaluateConfig):
    """The ``reconstruct`` entry point: a trained STEGO model (a training run id, ``runs:/<id>/model``,
    ``models:/...`` or a local MLflow model folder) evaluated on held-out volumes. ``engine.patch_size: null``
    means the model's own training crop size. ``amp``: bf16 autocast on a GPU; ``compile``: ``torch.compile``
    the model first (about a minute of compilation; pays off on whole volumes)."""

    model_uri: str = ""
    device: str = "auto"
    amp: bool = False
    compile: bool = False
    output: str = "outputs/reconstruct"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.device, "device", ("auto", "cpu", "cuda"))

# ------------------------------------------------------------------------------------- self-training


#: Label-free rules that combine a student's probability with its teacher (:func:`stego_core.methods.selftrain.combine`).
COMBINE_RULES = ("student", "teacher", "union_bright", "topn", "topn_mean", "union", "intersection")


@dataclass(frozen=True)
class SelfTrainSettings:
    """All knobs of self-training (:mod:`stego_core.methods.selftrain`), each with its default stated once here.

    Attributes
    ----------
    high, low : float
        Pseudo-label cuts on the teacher probability: vessel = teacher mask AND probability >= ``high``;
        background = probability < ``low`` AND outside the band around the teacher mask; the rest is ignored.
    band_vox : int
        Width in voxels of the ignored ring around the teacher's vessels (0: no band).
    axis : int
        Slicing axis of the (I, J, K) volumes.
    views : tuple of int
        Tri-planar self-training: one student per listed axis, their probabilities averaged (empty: ``axis``
        only). Each view's student sees its own 2.5D slab, so the average has 3D context.
    dims : {"2d", "2.5d"}
    context : int
        Neighbouring slices on each side fed as channels for ``2.5d`` (channels = 2 * context + 1).
    channels : tuple of int
        Feature widths of the U-Net levels (``len - 1`` down-samplings by 2).
    res_units : int
        Residual units per level of MONAI's ``UNet``.
    crop : int
        Training crop size in pixels (square).
    steps, batch, lr, weight_decay : int, int, float, float
        Adam steps, crops per step, learning rate, weight decay.
    vessel_fraction : float
        Fraction of crops centred on a teacher vessel voxel; the rest are centred anywhere in the brain mask.
    bce_weight, dice_weight, cldice_weight : float
        Weights of the masked BCE, masked soft Dice and masked soft-clDice (0 turns a term off).
    cldice_iters : int
        Soft-skeleton iterations of MONAI's ``SoftclDiceLoss``.
    aug_flip, aug_rot90, aug_intensity, aug_gamma, aug_noise, aug_elastic : bool
        Augmentations (:func:`augment`): random flips, 90-degree rotations, intensity scale (+-10 %) and shift
        (+-0.05), gamma in [0.7, 1.5], Gaussian noise (std <= 0.03); MONAI's small 2D elastic deformation.
    aug_prob : float
        Probability of each augmentation per crop.
    val_every : int
        Every ``val_every``-th slice containing brain is held apart from training (for the stopping criterion).
    eval_every : int
        Steps between evaluations of the criterion (0: keep the last weights).
    tta : bool
        Average the predictions over the four flips of each slice at inference.
    infer_batch : int
        Slices per forward pass at inference.
    combine : str
        One of :data:`COMBINE_RULES` (see :func:`combine`).
    student_cut : float
        Cut of the student probability for ``student`` and the ``union*`` / ``intersection`` rules.
    union_cut : float
        Student probability above which ``union_bright`` adds a voxel to the teacher's mask.
    bright_quantile : float
        ``union_bright``: a voxel is bright when its intensity is at or above this quantile of the image over
        the teacher's vessel voxels.
    topn_scale : float
        ``topn`` / ``topn_mean`` keep ``topn_scale * N`` voxels, N = the teacher's vessel voxel count.
    teacher_weight : float
        ``topn_mean``: the score ranked is ``(1 - w) * student + w * teacher probability``.
    mask_teacher_prob : bool
        ``topn_mean``: the teacher's probability counts only inside its mask (0 outside), so a voxel outside
        the teacher's mask enters on the student's confidence alone.
    keep_trees : float
        After the rule, keep only the components of at least this fraction of the largest one
        (:func:`~stego_core.engine.postprocess.keep_largest_trees`; 0: off). The lumen teacher ``best_mra``'s own step.
    min_size_vox : int
        After the rule, drop components under this many voxels (26-connectivity; 0: off). The tree teacher
        ``best_mra_tree``'s own step.
    margin_vox : int
        Student predictions are kept within the brain mask dilated by this many voxels (0: the mask).
    rounds : int
        Self-training rounds; from the second on, the previous round's student probability and combined mask
        are the teacher.
    seed : int
        Seed of the network initialisation, crop sampling and augmentation.
    threads : int
        Torch CPU threads (0: leave torch's setting); 1 by default: a second thread on two busy cores made a
        step 10x slower here.
    """

    high: float = 0.5
    low: float = 0.5
    band_vox: int = 1
    axis: int = 2
    views: tuple[int, ...] = ()
    dims: str = "2.5d"
    context: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    res_units: int = 1
    crop: int = 64
    steps: int = 1500
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-5
    vessel_fraction: float = 0.5
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    cldice_weight: float = 0.0
    cldice_iters: int = 3
    aug_flip: bool = True
    aug_rot90: bool = True
    aug_intensity: bool = True
    aug_gamma: bool = True
    aug_noise: bool = True
    aug_elastic: bool = False
    aug_prob: float = 0.3
    val_every: int = 10
    eval_every: int = 250
    tta: bool = False
    infer_batch: int = 8
    combine: str = "student"
    student_cut: float = 0.5
    union_cut: float = 0.9
    bright_quantile: float = 0.05
    topn_scale: float = 1.0
    teacher_weight: float = 0.0
    mask_teacher_prob: bool = False
    keep_trees: float = 0.0
    min_size_vox: int = 0
    margin_vox: int = 0
    rounds: int = 1
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        check_range(self.high, "student.high", 0.0, 1.0)
        check_range(self.low, "student.low", 0.0, 1.0)
        if self.low > self.high:
            raise ValueError(f"low={self.low} must not exceed high={self.high}")
        check_choice(self.dims, "student.dims", ("2d", "2.5d"))
        check_choice(self.combine, "student.combine", COMBINE_RULES)
        check_choice(self.axis, "student.axis", (0, 1, 2))
        for view in self.views:
            check_choice(view, "student.views", (0, 1, 2))
        if self.crop % (2 ** (len(self.channels) - 1)):
            raise ValueError(f"crop={self.crop} must be divisible by 2**{len(self.channels) - 1}")
        for name in ("band_vox", "context", "steps", "batch", "val_every", "eval_every", "rounds",
                     "margin_vox", "res_units"):
            if getattr(self, name) < 0:
                raise ValueError(f"student.{name}={getattr(self, name)} must be >= 0")
        if self.rounds < 1 or self.batch < 1 or self.val_every < 2:
            raise ValueError("rounds and batch must be >= 1 and val_every >= 2")

    @property
    def in_channels(self) -> int:
        """Channels of the student's input: ``2 * context + 1`` for 2.5D, else 1."""
        return 2 * self.context + 1 if self.dims == "2.5d" else 1

    def replace(self, **changes) -> SelfTrainSettings:
        """A copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TeacherConfig:
    """The label-free method whose confident voxels a student learns.

    ``config``: a baseline preset file (``experiments/configs/best_mra.yaml``) whose ``method``, ``settings``
    and ``postprocess`` are the teacher's (its ``data.skull_strip`` must equal this run's); otherwise
    ``method`` (any registered method: a baseline, ``stego`` with ``settings: {model_uri: <train run>}``),
    ``settings`` and ``postprocess`` name it here.
    """

    config: str = ""
    method: str = "gmm"
    settings: dict = field(default_factory=dict)
    postprocess: tuple[PostprocessStep, ...] = ()

    def resolved(self, skull_strip: str | None = None) -> TeacherConfig:
        """The teacher with a preset ``config`` read in (its skull strip checked against ``skull_strip``)."""
        if not self.config:
            return self
        preset = load_config(BaselineConfig, self.config)
        if skull_strip is not None and preset.data.skull_strip != skull_strip:
            raise ValueError(f"teacher.config={self.config} strips the skull with {preset.data.skull_strip!r} but "
                             f"this run's data.skull_strip is {skull_strip!r}; set data.skull_strip="
                             f"{preset.data.skull_strip}")
        return TeacherConfig(config=self.config, method=preset.method, settings=dict(preset.settings),
                             postprocess=preset.postprocess_steps())

    @property
    def label(self) -> str:
        """How runs name the teacher: the preset's file stem or the method with its steps."""
        if self.config:
            return Path(self.config).stem
        return self.method + "".join(f"+{s.step}" for s in self.postprocess)


@dataclass(frozen=True)
class SelfTrainPlan:
    """Self-training's sections, declared once for the ``selftrain`` step and the pipeline's ``selftrain``.

    ``mode: transductive`` (default) trains one student per evaluated volume on that volume (no label);
    ``inductive`` trains one student on the training volumes of the split and applies it to the evaluated
    ones. ``student``: every knob of :class:`~stego_core.methods.selftrain.SelfTrainSettings`.
    """

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: SelfTrainSettings = field(default_factory=SelfTrainSettings)
    mode: str = "transductive"

    def __post_init__(self) -> None:
        check_choice(self.mode, "mode", ("transductive", "inductive"))


@dataclass(frozen=True)
class SelfTrainConfig(SelfTrainPlan, EvaluateConfig):
    """The ``selftrain`` entry point: a student network trained on a teacher's pseudo-labels
    (:class:`SelfTrainPlan`), evaluated on the ``split`` volumes beside its teacher. ``model_uri`` (a selftrain
    run id) applies that run's logged students instead of training (what ``reconstruct`` does with them)."""

    model_uri: str = ""
    log_model: bool = True
    output: str = "outputs/selftrain"

    def __post_init__(self) -> None:
        EvaluateConfig.__post_init__(self)
        SelfTrainPlan.__post_init__(self)


# ------------------------------------------------------------------------------- DINO pretraining


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


# ----------------------------------------------------------------------------------- the whole pipeline


@dataclass(frozen=True)
class AblationMethod:
    """One row family of the ablation: a registered method by name with its settings, the skull-strip modes to
    run it with, and optionally tri-planar fusion (``axes``, ``fusion``; slice-based methods only). ``alias``
    names the row instead of the method and its settings (e.g. a self-training variant)."""

    name: str = "gmm"
    settings: dict = field(default_factory=dict)
    skull_strip: tuple[str, ...] = ("auto",)
    axes: tuple[int, ...] | None = None
    fusion: str = "mean"
    alias: str = ""

    def __post_init__(self) -> None:
        for mode in self.skull_strip:
            check_choice(mode, "ablation.methods.skull_strip", SKULL_STRIP_MODES)
        check_choice(self.fusion, "ablation.methods.fusion", FUSION_MODES)

    @property
    def label(self) -> str:
        """The row's name: ``alias``, or :attr:`full_label`."""
        return self.alias or self.full_label

    @property
    def full_label(self) -> str:
        """``name``, its settings and the fusion, e.g. ``gmm{n_components=4}`` or ``frangi@012mean``."""
        out = self.name
        if self.settings:
            out += "{" + ",".join(f"{k}={v}" for k, v in sorted(self.settings.items())) + "}"
        if self.axes is not None:
            out += "@" + "".join(str(a) for a in self.axes) + self.fusion
        return out.replace(" ", "")


@dataclass(frozen=True)
class AblationVariant:
    """A named post-processing list applied to every method of the ablation (``none``: no step)."""

    name: str = "none"
    postprocess: tuple[PostprocessStep, ...] = ()


def _default_ablation_methods() -> tuple[AblationMethod, ...]:
    both = ("auto", "head")
    return (AblationMethod("percentile", skull_strip=both), AblationMethod("otsu"), AblationMethod("multiotsu"),
            AblationMethod("kmeans"), AblationMethod("gmm", skull_strip=both),
            AblationMethod("gmm", {"n_components": 4}, skull_strip=both), AblationMethod("frangi"),
            AblationMethod("sato"), AblationMethod("frangi3d", skull_strip=both))


def _default_ablation_variants() -> tuple[AblationVariant, ...]:
    return (AblationVariant("none"), AblationVariant("cc", (PostprocessStep("cc", min_size_vox=10),)),
            AblationVariant("largest", (PostprocessStep("largest", min_fraction=0.05),)),
            AblationVariant("fill_holes", (PostprocessStep("fill_holes", max_size_vox=64),)),
            AblationVariant("smooth+largest", (PostprocessStep("smooth", sigma_vox=0.5),
                                               PostprocessStep("largest", min_fraction=0.05))))


@dataclass(frozen=True)
class AblationConfig(RunSettings):
    """The ``ablation`` step: every method x skull-strip mode x post-processing variant on every case of every
    data set, one MLflow parent run with one nested run per (method, skull strip, variant).

    Each method's probabilities are computed once per case and mode (and kept in ``cache`` when set, keyed by
    case, mode and method label, so reruns and new variants are cheap); the variants then post-process them.
    ``datasets`` are :class:`DataConfig` sections (phantoms, folders of real cases); ``split: test`` keeps only
    the held-out cases of each.
    """

    datasets: tuple[DataConfig, ...] = (DataConfig(),)
    split: str = "all"
    engine: EngineConfig = field(default_factory=EngineConfig)
    methods: tuple[AblationMethod, ...] = field(default_factory=_default_ablation_methods)
    variants: tuple[AblationVariant, ...] = field(default_factory=_default_ablation_variants)
    crf_settings: CRFSettings = field(default_factory=CRFSettings)
    cache: str = ""
    progress: bool = True
    output: str = "outputs/ablation"
    experiment: str = "stego-vessels-ablation"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.split, "split", ("test", "all"))
        if not self.datasets or not self.methods or not self.variants:
            raise ValueError("ablation needs at least one dataset, method and variant")


#: Learned methods the pipeline can fit and evaluate (``MainConfig.learned``).
LEARNED_STEPS = ("stego", "selftrain")


@dataclass(frozen=True)
class MainConfig(StegoSettings, DataSettings, RunSettings):
    """What the demo (``make demo``, ``mlflow run . -e main``) runs, read top to bottom: the data and crops
    every step shares, the volumes scored (``split``), the classical ``baselines``, then the ``learned``
    methods in order: ``stego`` with its sections (:class:`StegoSettings`, the same as the ``train`` step's),
    and ``selftrain`` (:class:`SelfTrainPlan`, the ``selftrain`` step's). ``stego_crf`` also evaluates the
    STEGO model with dense-CRF refinement (when pydensecrf2 is installed). ``pretrain`` (a
    :class:`PretrainConfig` mapping; its ``data``, ``slicing``, ``experiment`` and ``output`` are taken from
    this config) first pretrains ``pretrain.backbone`` with DINO on the same volumes without labels, and STEGO
    then trains on that backbone (``model.weights=runs:/<id>``). ``engine``: the sliding window every method
    reconstructs with (:class:`EngineConfig`; its ``axis`` is ``slicing.axis``), e.g. ``stride: 16`` for
    16-pixel crops without overlap."""

    split: str = "test"
    baselines: tuple[str, ...] = ("percentile", "otsu", "multiotsu", "kmeans", "gmm", "frangi", "sato")
    learned: tuple[str, ...] = ("stego",)
    pretrain: PretrainConfig | None = None
    stego_crf: bool = True
    selftrain: SelfTrainPlan = field(default_factory=SelfTrainPlan)
    engine: EngineConfig = field(default_factory=EngineConfig)
    output: str = "outputs"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.split, "split", ("test", "all"))
        for name in self.learned:
            check_choice(name, "learned", LEARNED_STEPS)


# --------------------------------------------------------------------------------------------------- loading


def derive(cls: type[T], source: Any, **changes: Any) -> T:
    """A step's config ``cls`` built from the sections ``source`` shares with it (same field names), with
    ``changes`` on top: how the pipeline hands its plan to each step without copying fields by hand.

    >>> derive(PrepareConfig, TrainConfig(split_seed=3), output="o").split_seed
    3
    """
    shared = {f.name for f in dataclasses.fields(cls)} & {f.name for f in dataclasses.fields(source)}
    return cls(**{name: getattr(source, name) for name in shared if name not in changes}, **changes)


def _convert(value: Any, tp: Any, name: str) -> Any:
    """Convert a YAML/CLI value to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{name}.")
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        return _convert(value, args[0], name)
    if origin is tuple:
        args = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value if value.startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{name} needs {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_convert(v, a, name) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return bool(value)
    if tp in (int, float, str):
        try:
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {tp.__name__}, got {value!r}") from None
    return value


def from_dict(cls: type[T], values: dict, *, prefix: str = "") -> T:
    """Build dataclass ``cls`` from a (nested) dict; unknown keys raise listing the valid ones."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
        raise ValueError(f"unknown config key {prefix}{key}{hint}; valid keys: {', '.join(prefix + n for n in names)}")
    kwargs = {k: _convert(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def to_dict(config: Any) -> dict:
    """The config as plain nested dicts and lists (YAML-safe)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(config))


def flatten(config: Any) -> dict[str, Any]:
    """Flatten a config to ``{"section.key": value}`` for MLflow params."""
    out: dict[str, Any] = {}

    def walk(d: dict, prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                out[f"{prefix}{k}"] = len(v)  # a list of sections (post-processing steps): one key per field
                for i, item in enumerate(v):
                    walk({key: x for key, x in item.items() if x is not None}, f"{prefix}{k}.{i}.")
            else:
                out[f"{prefix}{k}"] = v

    walk(to_dict(config), "")
    return out


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if not isinstance(child, dict):
            child = {}
            node[p] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """Parse ``key=value`` strings; values are read as YAML scalars (``3``, ``0.1``, ``true``, ``[1,2]``)."""
    parsed = []
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | dict | None = None) -> T:
    """Load ``cls`` from a YAML file (or defaults when ``path`` is None) and apply overrides.

    Overrides are ``["section.key=value", ...]`` or a dict ``{"section.key": value}``.
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping at the top level")
        tree = loaded
    items = list(overrides.items()) if isinstance(overrides, dict) else parse_overrides(overrides)
    for key, value in items:
        _set_dotted(tree, key, value)
    return from_dict(cls, tree)


def plan_yaml(config: Any) -> str:
    """The resolved plan as YAML: what ``--print-config`` prints and every run logs as ``plan.yaml``.
    ``--config`` of that text resolves to the same config (:func:`load_config`)."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (:func:`plan_yaml`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(plan_yaml(config))
    return path
