"""The whole pipeline on one config (``make demo`` / ``mlflow run . -e main``).

prepare -> every classical baseline -> STEGO training -> STEGO reconstruction, all on the same volumes and
split. Each step is its own MLflow run, nested under one ``pipeline`` run that holds the comparison table and
bar chart.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path

from stego_core import tracking
from stego_core.config import DataConfig, PrepareConfig, SlicingConfig, flatten, load_config
from stego_core.evaluation import BaselineConfig, ReconstructConfig, run_baseline, run_reconstruct
from stego_core.reconstruction import EngineConfig
from stego_core.training import TrainConfig, run_train

TABLE_KEYS = ("dice", "cldice", "precision", "recall")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MainConfig:
    """What the demo runs. ``train_config`` is a YAML path (relative paths are tried from the working folder,
    then from ``experiments/configs``); its data, slicing and split are replaced by this config's.
    ``stego_crf`` also evaluates the STEGO model with dense-CRF refinement (when pydensecrf2 is installed)."""

    data: DataConfig = field(default_factory=DataConfig)
    slicing: SlicingConfig = field(default_factory=SlicingConfig)
    baselines: tuple[str, ...] = ("percentile", "otsu", "multiotsu", "kmeans", "gmm", "frangi", "sato")
    train_config: str = "train_cpu.yaml"
    train_overrides: tuple[str, ...] = ()
    stego_crf: bool = True
    test_fraction: float = 0.34
    split_seed: int = 0
    output: str = "outputs"
    experiment: str = "stego-vessels"


def _config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    fallback = Path(__file__).resolve().parents[1] / "experiments" / "configs" / name
    if fallback.is_file():
        return fallback
    raise FileNotFoundError(f"train_config {name} not found (also looked in {fallback.parent})")


def crf_available() -> bool:
    """Whether the optional dense-CRF package is installed (``pip install 'stego-vessels[crf]'``)."""
    import importlib.util

    if importlib.util.find_spec("pydensecrf") is None:
        log.warning("pydensecrf2 is not installed: skipping the stego+crf evaluation")
        return False
    return True


def format_table(table: dict[str, dict[str, float]], keys: tuple[str, ...] = TABLE_KEYS) -> str:
    """A plain-text comparison table: one row per method, mean ± std of each key."""
    head = f"{'method':<12}" + "".join(f"{k:>18}" for k in keys)
    rows = [head, "-" * len(head)]
    for method, s in table.items():
        rows.append(f"{method:<12}" + "".join(
            f"{s.get(f'{k}_mean', float('nan')):>10.3f} ± {s.get(f'{k}_std', float('nan')):<5.3f}" for k in keys))
    return "\n".join(rows)


def run_main(cfg: MainConfig) -> str:
    """Run every step as a run nested under one ``pipeline`` run; returns the comparison table.

    The pipeline run (under ``mlflow run -e main``: the project's own run) logs the table and the bar chart.
    """
    common = dict(test_fraction=cfg.test_fraction, split_seed=cfg.split_seed, experiment=cfg.experiment)
    from stego_core.prepare import run_prepare
    from stego_core.visualize import comparison_bar_figure

    with tracking.start_run(cfg.experiment, run_name="pipeline", output_root=f"{cfg.output}/pipeline",
                            tags={"step": "pipeline", "method": "pipeline"}):
        tracking.log_params(flatten(cfg))
        run_prepare(PrepareConfig(data=cfg.data, slicing=cfg.slicing, output=f"{cfg.output}/prepare", **common),
                    nested=True)
        table: dict[str, dict[str, float]] = {}
        runs: dict[str, str] = {}
        whole_slices = EngineConfig(axis=cfg.slicing.axis, patch_size=None, batch_size=16, blend="constant")
        for method in cfg.baselines:
            result = run_baseline(BaselineConfig(data=cfg.data, engine=whole_slices, method=method,
                                                 output=f"{cfg.output}/baseline", **common), nested=True)
            table[method], runs[method] = result.summary, result.run_id

        train_cfg = load_config(TrainConfig, _config_path(cfg.train_config), list(cfg.train_overrides))
        train_cfg = dataclasses.replace(train_cfg, data=cfg.data, slicing=cfg.slicing,
                                        output=f"{cfg.output}/train", **common)
        trained = run_train(train_cfg, nested=True)
        stego = run_reconstruct(ReconstructConfig(
            data=cfg.data, engine=EngineConfig(axis=cfg.slicing.axis, patch_size=None),
            model_uri=trained.model_uri or "", output=f"{cfg.output}/reconstruct", **common), nested=True)
        table["stego"], runs["stego"] = stego.summary, stego.run_id
        if cfg.stego_crf and crf_available():
            refined = run_reconstruct(ReconstructConfig(
                data=cfg.data, engine=EngineConfig(axis=cfg.slicing.axis, patch_size=None), crf=True,
                model_uri=trained.model_uri or "", output=f"{cfg.output}/reconstruct", **common), nested=True)
            table["stego+crf"], runs["stego+crf"] = refined.summary, refined.run_id

        text = format_table(table)
        key = {m: m.replace("+", "_") for m in table}  # MLflow keys allow no '+'
        tracking.set_tags({"training_run_id": trained.run_id, **{f"run.{key[m]}": r for m, r in runs.items()}})
        tracking.log_text(text + "\n", "comparison.txt")
        means = {m: {k: s.get(f"{k}_mean", float("nan")) for k in TABLE_KEYS} for m, s in table.items()}
        tracking.log_metrics({f"{key[m]}/{k}": v for m, row in means.items() for k, v in row.items()})
        tracking.log_figure(comparison_bar_figure(means, keys=("dice", "cldice")), "comparison.png")
    return text
