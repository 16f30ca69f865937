"""methods.stego.settings"""

from __future__ import annotations

from dataclasses import dataclass, field

from stego_core._checks import check_choice, check_range
from stego_core.data.sampling import SamplingConfig
from stego_core.data.slicing import SlicingConfig
from stego_core.methods.stego.mapping import CLUSTER_RULES, LABEL_FREE_RULES
from stego_core.methods.stego.model import LossConfig
from stego_core.runtime.distributed import TrainerSettings

#: Upper bound of ``model.n_clusters`` (vessel tokens are ~1 % of a crop: K of 64-256 isolates them).
MAX_CLUSTERS = 4096


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
    #: (``base.forward_batch_size``)
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


@dataclass(frozen=True)
class StegoSettings:
    """Every setting of the ``stego`` method, defaults stated here: backbone and head (``model``), the
    correspondence loss, optimisation (``train``), processes (``trainer``), label-free crop sampling, the crops it
    trains on (``slicing``: their side, stride and slicing axis; it predicts with crops of that side along that
    axis) and ``val_stride``, the sliding-window stride of the validation reconstructions (null: half a crop).

    ``model_uri`` names a trained STEGO model (a ``train`` run, ``runs:/<id>/model``, ``models:/<name>/<version>``):
    the method is then that model, with the settings it was trained with, and fits nothing.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainSettings = field(default_factory=TrainSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    slicing: SlicingConfig = field(default_factory=SlicingConfig)
    val_stride: int | None = None
    model_uri: str = ""

    def check_split(self, split: str) -> None:
        """``split: all`` evaluates the very volumes STEGO is fitted on, so its clusters must then be mapped
        without their labels (a label-free ``model.cluster_rule``): labels only score the volumes evaluated."""
        if split == "all" and not self.model_uri and self.model.cluster_rule not in LABEL_FREE_RULES:
            raise ValueError(f"model.cluster_rule={self.model.cluster_rule!r} may map the clusters with the labels "
                             "of the training volumes, and split: all evaluates those same volumes; use a "
                             f"label-free rule ({', '.join(LABEL_FREE_RULES)}) or split: test (test_cases=[...] "
                             "names the volumes to segment)")
