"""Label-free crop sampling: weights come from images only."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stego_core.data.cases import DataConfig, make_crop_set, preprocess_case
from stego_core.data.io import make_case
from stego_core.data.sampling import (
    SamplingConfig,
    bright_threshold,
    crop_weights,
    draw_crops,
    select_crops,
)
from stego_core.data.slicing import SlicingConfig


def test_bright_crops_get_more_weight():
    crops = np.zeros((3, 4, 4), np.float32)
    crops[1, 0, 0] = 1.0
    crops[2, :2, :2] = 1.0
    w = crop_weights(crops, 0.5, method="bright", floor=0.0)
    assert w[0] == 0 and w[2] == pytest.approx(4 * w[1]) and w.sum() == pytest.approx(1.0)
    assert np.allclose(crop_weights(crops, 0.5, method="none"), 1 / 3)
    assert (crop_weights(crops, 0.5, method="bright", floor=0.1) > 0).all()


def test_bright_threshold_is_a_brain_percentile():
    img = np.arange(100, dtype=np.float32).reshape(10, 10, 1)
    mask = np.zeros_like(img, bool)
    mask[:5] = True
    assert bright_threshold(img, mask, 50.0) == pytest.approx(np.percentile(np.arange(50), 50))
    saturated = np.concatenate([np.linspace(0, 0.5, 90), np.ones(10)]).astype(np.float32).reshape(10, 10, 1)
    t = bright_threshold(saturated, None, 99.0)
    assert t == pytest.approx(0.5) and (saturated > t).sum() == 10  # the saturated voxels count as bright
    with pytest.raises(ValueError, match="empty"):
        bright_threshold(img, np.zeros_like(mask), 99.0)


def test_draw_crops_is_seeded_and_distinct():
    w = np.array([0.0, 0.1, 0.2, 0.3, 0.4])
    a, b = draw_crops(w, 3, seed=1), draw_crops(w, 3, seed=1)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 3
    assert np.array_equal(draw_crops(w, 10), np.arange(5))
    fill = draw_crops(np.array([0.0, 1.0, 0.0]), 2)  # fills from zero-weight crops when needed
    assert 1 in fill and len(set(fill.tolist())) == 2


def test_sampling_never_reads_labels(tiny_case):
    """Labels of all ones and of all zeros give the same weights and the same crops."""
    folder = tiny_case("case_000")
    case = make_case(folder)
    prepared = preprocess_case(case, DataConfig(source="folder", root=str(folder.parent)))
    slicing = SlicingConfig(patch_size=8, stride=4)
    sampling = SamplingConfig(method="bright", max_crops=5)
    picks = []
    for value in (True, False):
        p = dataclasses.replace(prepared, label=np.full(prepared.image.shape, value))
        crop_set = make_crop_set([p], slicing)
        assert crop_set.labels is not None and crop_set.labels.any() == value
        weights, pick = select_crops(crop_set.crops, crop_set.case_ids, {p.case.case_id: (p.image, p.brain_mask)},
                                     sampling, seed=0)
        picks.append((weights, pick))
    assert np.array_equal(picks[0][0], picks[1][0]) and np.array_equal(picks[0][1], picks[1][1])
    assert len(picks[0][1]) == 5


def test_cache_budget_subsamples_training_crops(tiny_case, tmp_path):
    """train.cache_max_gb caps the training crops' feature cache: the crops kept fit the budget."""
    from stego_core.config import load_config
    from stego_core.features.backbones import build_backbone
    from stego_core.features.cache import feature_bytes_per_crop
    from stego_core.data.cases import ensure_cases, preprocess_case, split_cases
    from stego_core.methods.stego.datamodule import StegoDataModule
    from stego_core.steps.training import TrainConfig

    folder = tiny_case("case_000")
    tiny_case("case_001")
    over = {"data.source": "folder", "data.root": str(folder.parent), "slicing.patch_size": 16, "slicing.stride": 4,
            "model.backbone": "classical", "model.res": 8, "train.batch_size": 4, "train.progress": False,
            "train.cache_dir": str(tmp_path / "cache"), "test_fraction": 0.5, "sampling.method": "bright"}
    backbone = build_backbone("classical", weights="random", res=8)
    per_crop = feature_bytes_per_crop(backbone, 16)
    assert per_crop == int(np.prod(backbone.output_shape(16))) * 2
    def module(budget: float) -> StegoDataModule:
        cfg = load_config(TrainConfig, None, {**over, "train.cache_max_gb": budget})
        train, held = split_cases(ensure_cases(cfg.data), cfg.test_fraction, seed=cfg.split_seed)
        return StegoDataModule(cfg.stego_settings(), backbone, [preprocess_case(c, cfg.data) for c in train],
                               [preprocess_case(c, cfg.data) for c in held])

    full = module(0)
    full.setup()
    n_all = len(full.train_set)
    budget = 10 * per_crop / 1e9
    capped = module(budget)
    capped.setup()
    assert n_all > 10 and len(capped.train_set) == len(capped.features) == 10
    assert capped.sample_weights.shape == (10,) and np.isclose(capped.sample_weights.sum(), 1.0)
    too_small = module(per_crop / 1e9)
    with pytest.raises(ValueError, match="train.cache_max_gb"):
        too_small.setup()
