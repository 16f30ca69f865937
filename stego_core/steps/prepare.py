"""The ``prepare`` step: volumes -> preprocessed 2D crops in the seed's dataset layout, tracked in MLflow."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from stego_core.data.cases import (
    CropSet,
    PreparedCase,
    ensure_cases,
    make_crop_set,
    preprocess_case,
    split_cases,
)
from stego_core.data.io import write_manifest
from stego_core.data.seed_layout import write_seed_dataset
from stego_core.platform import tracking
from stego_core.steps.base import DataSettings, RunSettings


@dataclass(frozen=True)
class PrepareConfig(DataSettings, RunSettings):
    """The ``prepare`` entry point: volumes -> preprocessed 2D crops in the seed's dataset layout."""

    output: str = "outputs/prepare"
    dataset_name: str = "mra"




@dataclass
class PrepareResult:
    run_id: str
    dataset_dir: Path
    n_train_crops: int
    n_test_crops: int
    train_ids: list[str]
    test_ids: list[str]


def crop_names(crop_set: CropSet) -> list[str]:
    """Stable crop ids ``<case>_s<slice>_r<row>_c<col>``."""
    return [f"{cid}_s{s:03d}_r{r:03d}_c{c:03d}" for cid, (s, r, c) in zip(crop_set.case_ids, crop_set.index)]


def save_crop_set(crop_set: CropSet, path: Path) -> Path:
    """Save a crop set as one ``.npz`` (what training reads back with :func:`load_crop_set`)."""
    arrays = dict(crops=crop_set.crops, index=crop_set.index, case_ids=crop_set.case_ids)
    if crop_set.labels is not None:
        arrays["labels"] = crop_set.labels
    np.savez_compressed(path, **arrays)
    return path


def load_crop_set(path: str | Path) -> CropSet:
    with np.load(path, allow_pickle=False) as z:
        return CropSet(crops=z["crops"], labels=z["labels"] if "labels" in z else None, index=z["index"],
                       case_ids=z["case_ids"])


def _preview_figures(prepared: list[PreparedCase], crop_set: CropSet) -> dict:
    from stego_core.report.visualize import mask_outline_figure, slice_panel_figure

    figures = {}
    for p in prepared:
        figures[f"preview/{p.case.case_id}_brain_mask.png"] = mask_outline_figure(
            p.image, p.brain_mask, p.label, title=f"{p.case.case_id}: preprocessed MIP, brain mask outline")
    pick = np.linspace(0, len(crop_set) - 1, num=min(8, len(crop_set))).astype(int)
    labels = crop_set.labels[pick] if crop_set.labels is not None else None
    figures["preview/train_crops.png"] = slice_panel_figure(crop_set.crops[pick], labels, None, None)
    return figures


def run_prepare(cfg: PrepareConfig, *, nested: bool = False) -> PrepareResult:
    """Generate or read the volumes, preprocess them, cut crops, write the seed layout, and log it all.

    Outputs go to ``<cfg.output>/<run_id>/`` (``dataset/<name>/`` in the seed layout, ``train_crops.npz``,
    ``test_crops.npz``, ``manifest.json``, ``plan.yaml``), and are logged as artifacts of the run.
    """
    with tracking.start_run(cfg.experiment, run_name="prepare", output_root=cfg.output, nested=nested,
                            tags={"step": "prepare", "method": "data"},
                            description=f"Data preparation: {cfg.data.source} volumes of {Path(cfg.data.root).name} "
                                        f"-> preprocessed {cfg.slicing.patch_size}px crops; previews in preview/.") \
            as run:
        tracking.log_plan(cfg, run.output_dir)
        cases = ensure_cases(cfg.data)
        tracking.log_dataset(cases, name=Path(cfg.data.root).name, context="prepare", source=cfg.data.root)
        train, test = split_cases(cases, cfg.test_fraction, seed=cfg.split_seed,
                                  test_ids=cfg.test_cases)
        prepared = {c.case_id: preprocess_case(c, cfg.data)  # a bar on a terminal only (disable=None)
                    for c in tqdm(cases, desc="preprocess", unit="vol", disable=None)}
        for cid, p in prepared.items():
            metrics = {f"brain_fraction/{cid}": float(p.brain_mask.mean())}
            if p.label_retention is not None:
                metrics[f"label_retention/{cid}"] = p.label_retention
            tracking.log_metrics(metrics)
        train_set = make_crop_set([prepared[c.case_id] for c in train], cfg.slicing)
        test_set = make_crop_set([prepared[c.case_id] for c in test], cfg.slicing)
        out = run.output_dir
        save_crop_set(train_set, out / "train_crops.npz")
        save_crop_set(test_set, out / "test_crops.npz")
        write_manifest(cases, out / "manifest.json")

        train_names, test_names = crop_names(train_set), crop_names(test_set)
        # The seed layout holds each crop once: a volume used for both training and testing appears once.
        names = list(dict.fromkeys(train_names + test_names))
        position = {n: i for i, n in enumerate(train_names)}
        position.update({n: len(train_names) + i for i, n in enumerate(test_names) if n not in position})
        images = np.concatenate([train_set.crops, test_set.crops])[[position[n] for n in names]]
        labels = None
        if train_set.labels is not None and test_set.labels is not None:
            labels = np.concatenate([train_set.labels, test_set.labels])[[position[n] for n in names]]
        labelled_train = train_names if train_set.labels is not None else []
        dataset_dir = write_seed_dataset(out / "dataset", cfg.dataset_name, names, images, labels, splits={
            "unlabelled_train": train_names, "labelled_train": labelled_train, "labelled_test": test_names})
        archive = shutil.make_archive(str(out / "dataset"), "zip", root_dir=out / "dataset")

        tracking.log_metrics({"n_train_crops": len(train_set), "n_test_crops": len(test_set),
                              "n_volumes": len(cases)})
        tracking.set_tags({"train_cases": ",".join(c.case_id for c in train),
                           "test_cases": ",".join(c.case_id for c in test)})
        for name in ("train_crops.npz", "test_crops.npz", "manifest.json"):
            tracking.log_artifact(out / name)
        tracking.log_artifact(Path(archive))
        for artifact, fig in _preview_figures(list(prepared.values()), train_set).items():
            tracking.log_figure(fig, artifact)
        return PrepareResult(run_id=run.run_id, dataset_dir=dataset_dir, n_train_crops=len(train_set),
                             n_test_crops=len(test_set), train_ids=[c.case_id for c in train],
                             test_ids=[c.case_id for c in test])
