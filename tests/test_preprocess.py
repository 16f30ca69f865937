"""Tests of masks, skull stripping and standardisation (stego_core.data.preprocess)."""

from __future__ import annotations

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from stego_core.data.phantom import Phantom, PhantomConfig, make_phantom
from stego_core.data.preprocess import (
    apply_brain_mask,
    brain_mask_for,
    head_mask,
    label_retention,
    skull_strip,
    standardize,
)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(PhantomConfig(), seed=1)


@pytest.fixture(scope="module")
def stripped(phantom) -> np.ndarray:
    return skull_strip(phantom.image)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


# ---------------------------------------------------------------------------------------------------------------
# apply_brain_mask


def test_apply_brain_mask_sets_volume_minimum_and_zeroes_labels():
    image = np.arange(8, dtype=np.int16).reshape(2, 2, 2) + 3  # 3..10, minimum 3 inside the mask
    mask = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=np.uint8).reshape(2, 2, 2)
    label = np.array([0, 255, 255, 0, 255, 0, 0, 255], dtype=np.uint8).reshape(2, 2, 2)
    out, lab = apply_brain_mask(image, mask, label)
    assert out.dtype == np.int16
    assert out.ravel().tolist() == [3, 4, 3, 3, 7, 3, 9, 3]
    assert lab.dtype == bool
    assert lab.ravel().tolist() == [False, True, False, False, True, False, False, False]
    assert image.ravel().tolist() == list(range(3, 11))  # input untouched
    out2, none = apply_brain_mask(image.astype(np.float32) - 20, mask)
    assert none is None and out2.ravel().tolist() == [-17, -16, -17, -17, -13, -17, -11, -17]


def test_apply_brain_mask_errors():
    image = np.zeros((2, 2, 2))
    with pytest.raises(ValueError, match="mask has shape"):
        apply_brain_mask(image, np.ones((2, 2, 3)))
    with pytest.raises(ValueError, match="mask has values"):
        apply_brain_mask(image, np.full((2, 2, 2), 2))
    with pytest.raises(ValueError, match="image must be 3D"):
        apply_brain_mask(np.zeros((2, 2)), np.ones((2, 2)))


# ---------------------------------------------------------------------------------------------------------------
# standardize


def test_standardize_zscore_minmax_by_hand():
    image = np.array([2.0, 4.0, 6.0, 10.0]).reshape(1, 2, 2)
    np.testing.assert_allclose(standardize(image).ravel(), [0.0, 0.25, 0.5, 1.0])
    # statistics from the mask voxels only (4 and 6): the others are clipped
    mask = np.array([0, 1, 1, 0]).reshape(1, 2, 2)
    out = standardize(image, mask)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out.ravel(), [0.0, 0.0, 1.0, 1.0])
    image3 = np.array([0.0, 4.0, 5.0, 6.0]).reshape(1, 2, 2)
    np.testing.assert_allclose(standardize(image3, np.array([0, 1, 1, 1]).reshape(1, 2, 2)).ravel(),
                               [0.0, 0.0, 0.5, 1.0])


def test_standardize_percentile_is_robust_to_outliers():
    values = np.r_[np.arange(100.0), 10000.0].reshape(1, 1, 101)
    plain = standardize(values)
    robust = standardize(values, method="percentile", percentiles=(0.0, 99.0))
    # min-max is crushed by the outlier; percentile clips it (99th percentile of 0..99,10000 is 99)
    assert plain[0, 0, 99] == pytest.approx(99 / 10000, abs=1e-6)
    assert robust[0, 0, 99] == pytest.approx(1.0) and robust[0, 0, 100] == pytest.approx(1.0)
    assert robust[0, 0, 50] == pytest.approx(50 / 99, abs=1e-6)
    assert 0.0 <= robust.min() and robust.max() <= 1.0


def test_standardize_constant_image_gives_zeros_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method in ("zscore_minmax", "percentile"):
            out = standardize(np.full((3, 3, 3), 7.0), method=method)
            assert out.dtype == np.float32 and not out.any()


def test_standardize_errors():
    image = np.zeros((2, 2, 2))
    with pytest.raises(ValueError, match="zscore_minmax, percentile"):
        standardize(image, method="minmax")
    with pytest.raises(ValueError, match="percentiles"):
        standardize(image, method="percentile", percentiles=(90.0, 10.0))
    with pytest.raises(ValueError, match="mask is empty"):
        standardize(image, np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        standardize(np.full((2, 2, 2), np.nan))


# ---------------------------------------------------------------------------------------------------------------
# label_retention, brain_mask_for


def test_label_retention():
    mask = np.array([1, 1, 0, 0, 1, 1]).reshape(1, 2, 3)
    label = np.array([0, 1, 1, 1, 1, 0]).reshape(1, 2, 3)
    assert label_retention(mask, label) == pytest.approx(0.5)
    assert label_retention(mask, np.zeros_like(label)) == 1.0
    assert np.isnan(label_retention(mask, np.zeros_like(label), empty=np.nan))
    with pytest.raises(ValueError, match="label has shape"):
        label_retention(mask, np.ones((1, 2, 2)))


def test_brain_mask_for_modes(phantom, stripped):
    image = phantom.image
    none = brain_mask_for(image, "none")
    assert none.dtype == bool and none.all()
    given = brain_mask_for(image, "given", phantom.brain_mask * 255)
    np.testing.assert_array_equal(given, phantom.brain_mask > 0)
    np.testing.assert_array_equal(brain_mask_for(image, "head"), head_mask(image))
    np.testing.assert_array_equal(brain_mask_for(image, "auto"), stripped)


def test_brain_mask_for_errors(phantom):
    with pytest.raises(ValueError, match="'given' requires a brain mask"):
        brain_mask_for(phantom.image, "given")
    with pytest.raises(ValueError, match="none, given, head, auto"):
        brain_mask_for(phantom.image, "skull")
    with pytest.raises(ValueError, match="brain mask has shape"):
        brain_mask_for(phantom.image, "given", np.ones((4, 4, 4)))


# ---------------------------------------------------------------------------------------------------------------
# head_mask, skull_strip on a phantom


def test_head_mask_matches_phantom_head(phantom):
    head = head_mask(phantom.image)
    truth = phantom.head_mask > 0
    assert (truth & ~head).sum() <= 0.01 * truth.sum()
    assert (head & ~truth).sum() <= 0.10 * truth.sum()  # smoothing widens the edge by about a voxel
    assert label_retention(head, phantom.label) == 1.0
    assert not head[:3, :3, :].any()  # air corner


def test_skull_strip_phantom_keeps_vessels_drops_scalp(phantom, stripped):
    cfg = phantom.config
    assert stripped.dtype == bool and stripped.shape == phantom.image.shape
    assert label_retention(stripped, phantom.label) >= 0.98
    depth = ndi.distance_transform_edt(phantom.head_mask)
    scalp = (phantom.head_mask > 0) & (depth < cfg.scalp_mm)
    assert (stripped & scalp).sum() <= 0.05 * scalp.sum()
    assert _dice(stripped, phantom.brain_mask > 0) > 0.9


def test_skull_strip_anisotropic_phantom():
    cfg = PhantomConfig(shape=(80, 80, 32), spacing_mm=(1.0, 1.0, 2.0))
    ph = make_phantom(cfg, seed=2)
    mask = skull_strip(ph.image, spacing_mm=cfg.spacing_mm)
    assert label_retention(mask, ph.label) >= 0.98
    depth = ndi.distance_transform_edt(ph.head_mask, sampling=cfg.spacing_mm)
    scalp = (ph.head_mask > 0) & (depth < cfg.scalp_mm)
    assert (mask & scalp).sum() <= 0.05 * scalp.sum()


def test_skull_strip_degenerate_and_bad_input():
    assert not skull_strip(np.full((32, 32, 32), 5.0)).any()
    assert not head_mask(np.zeros((32, 32, 32))).any()
    with pytest.raises(ValueError, match="image must be 3D"):
        skull_strip(np.zeros((32, 32)))
    with pytest.raises(ValueError, match="margin_vox"):
        skull_strip(np.zeros((32, 32, 32)), margin_vox=-1.0)
    with pytest.raises(ValueError, match="spacing_mm"):
        skull_strip(np.zeros((32, 32, 32)), spacing_mm=(1.0, 0.0, 1.0))


# ---------------------------------------------------------------------------------------------------------------
# the real case (skipped when absent)


@pytest.mark.slow
def test_skull_strip_real_case_keeps_labelled_vessels(real_case_dir: Path):
    # real_case_dir (conftest): STEGO_REAL_CASE or ../shared/data/mra_mni_0656; skips when absent
    image = np.asanyarray(nib.load(str(real_case_dir / "image.nii.gz")).dataobj)
    label = np.asanyarray(nib.load(str(real_case_dir / "label.nii.gz")).dataobj) > 0
    mask = skull_strip(image)
    assert label_retention(mask, label) >= 0.98
    assert 0.15 <= mask.mean() <= 0.40
    head = head_mask(image)
    assert label_retention(head, label) >= 0.999
    assert 0.35 <= head.mean() <= 0.65 and mask.sum() < 0.7 * head.sum()
    # the bright scalp: bright voxels within 12 voxels of the head surface, outside the label
    depth = ndi.distance_transform_edt(head[::2, ::2, ::2])  # half resolution, for speed
    near_surface = np.repeat(np.repeat(np.repeat(depth <= 6, 2, 0), 2, 1), 2, 2)
    near_surface = near_surface[tuple(slice(0, n) for n in image.shape)]
    shell = (image > 150) & ~label & head & near_surface
    assert (shell & ~mask).sum() >= 0.95 * shell.sum()
