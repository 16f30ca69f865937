"""Tests for stego_core.data.slicing: crop positions, crop extraction and blending back into a volume."""

from __future__ import annotations

import numpy as np
from conftest import blend_crops, extract_crops
import pytest

from stego_core.data.slicing import (
    CropBlender,
    blend_weights,
    crop_index,
    crop_origins,
    take_crops,
    to_slices,
)


@pytest.mark.parametrize("length, patch, stride, expected", [
    (10, 4, 4, [0, 4, 6]),
    (10, 4, 3, [0, 3, 6]),
    (8, 4, 4, [0, 4]),
    (8, 4, 2, [0, 2, 4]),
    (9, 4, 8, [0, 5]),
    (4, 4, 1, [0]),
    (3, 4, 2, [0]),  # shorter than the patch: one window, the caller pads
])
def test_crop_origins_by_hand(length, patch, stride, expected):
    out = crop_origins(length, patch, stride)
    assert out.dtype == np.int64
    assert out.tolist() == expected


@pytest.mark.parametrize("length", range(8, 40, 3))
@pytest.mark.parametrize("patch, stride", [(4, 1), (4, 3), (8, 5), (8, 8)])
def test_crop_origins_cover_the_end(length, patch, stride):
    out = crop_origins(length, patch, stride)
    assert out[0] == 0
    assert out[-1] + patch == length  # last window ends exactly at the end
    assert np.all(np.diff(out) >= 1) and np.all(np.diff(out) <= stride)  # no gaps, strictly increasing
    covered = np.zeros(length, bool)
    for o in out:
        covered[o:o + patch] = True
    assert covered.all()


def test_to_slices_moves_axis_first():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    assert to_slices(vol, 0).shape == (2, 3, 4)
    assert to_slices(vol, 1).shape == (3, 2, 4)
    assert to_slices(vol, 2).shape == (4, 2, 3)
    np.testing.assert_array_equal(to_slices(vol, 2)[1], vol[:, :, 1])


def test_index_is_slice_row_col():
    crops, index = extract_crops(np.zeros((6, 4, 3), np.float32), axis=0, patch_size=4, stride=2)
    # slices along axis 0 are 4 x 3, padded to 4 x 4: one window per slice
    assert index.tolist() == [[s, 0, 0] for s in range(6)]
    assert crops.shape == (6, 4, 4)


def test_crops_hold_the_right_pixels():
    vol = np.arange(10 * 12 * 3, dtype=np.float32).reshape(10, 12, 3)
    crops, index = extract_crops(vol, axis=2, patch_size=4, stride=4)
    assert len(index) == 3 * len(crop_origins(10, 4, 4)) * len(crop_origins(12, 4, 4))  # 3 * 3 * 3
    for crop, (s, r, c) in zip(crops, index):
        np.testing.assert_array_equal(crop, vol[r:r + 4, c:c + 4, s])
    assert crops.dtype == np.float32


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("patch, stride", [(8, 8), (8, 3), (6, 1)])
def test_extract_blend_round_trip_constant(axis, patch, stride):
    vol = np.random.default_rng(axis * 100 + stride).random((13, 17, 9)).astype(np.float32)
    crops, index = extract_crops(vol, axis=axis, patch_size=patch, stride=stride)
    out = blend_crops(crops, index, vol.shape, axis=axis, patch_size=patch, blend="constant")
    assert out.shape == vol.shape and out.dtype == np.float32
    # Overlaps are averaged in float32, so equal values summed n times may be off by an ulp or so.
    np.testing.assert_allclose(out, vol, rtol=2e-6, atol=0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_extract_blend_round_trip_is_exact_without_overlap(axis):
    vol = np.random.default_rng(7 + axis).random((16, 24, 8)).astype(np.float32)
    crops, index = extract_crops(vol, axis=axis, patch_size=8, stride=8)  # windows tile every slice exactly
    out = blend_crops(crops, index, vol.shape, axis=axis, patch_size=8)
    np.testing.assert_array_equal(out, vol)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_extract_blend_round_trip_gaussian(axis):
    vol = np.random.default_rng(axis).random((12, 15, 10)).astype(np.float32)
    crops, index = extract_crops(vol, axis=axis, patch_size=8, stride=3)
    out = blend_crops(crops, index, vol.shape, axis=axis, patch_size=8, blend="gaussian")
    np.testing.assert_allclose(out, vol, rtol=1e-5, atol=1e-6)


def test_gaussian_blend_of_constant_prediction_is_constant():
    shape = (20, 14, 5)
    index = crop_index(shape, axis=2, patch_size=8, stride=5)
    preds = np.full((len(index), 8, 8), 3.5, np.float32)
    out = blend_crops(preds, index, shape, axis=2, patch_size=8, blend="gaussian")
    np.testing.assert_allclose(out, 3.5, rtol=1e-6)


def test_overlap_is_averaged():
    # Two crops of width 4 at columns 0 and 2 on a 4 x 6 slice: columns 2-3 see both (mean of 1 and 3 = 2).
    index = np.array([[0, 0, 0], [0, 0, 2]])
    preds = np.stack([np.full((4, 4), 1.0), np.full((4, 4), 3.0)]).astype(np.float32)
    out = blend_crops(preds, index, (4, 6, 1), axis=2, patch_size=4)
    np.testing.assert_array_equal(out[:, :, 0], np.array([[1, 1, 2, 2, 3, 3]] * 4, np.float32))


def test_small_slices_are_padded_and_cropped_back():
    vol = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32) + 1.0  # min > 1
    crops, index = extract_crops(vol, axis=2, patch_size=8, stride=4)
    assert crops.shape == (7, 8, 8)
    assert index.tolist() == [[s, 0, 0] for s in range(7)]
    np.testing.assert_array_equal(crops[2, :5, :6], vol[:, :, 2])
    # padding uses the volume minimum by default
    assert np.all(crops[:, 5:, :] == vol.min()) and np.all(crops[:, :, 6:] == vol.min())
    np.testing.assert_array_equal(blend_crops(crops, index, vol.shape, axis=2, patch_size=8), vol)


def test_partially_small_slices():
    # axis 0 slices are 6 x 20: rows padded to 8, columns cut every 4.
    vol = np.random.default_rng(1).random((3, 6, 20)).astype(np.float32)
    crops, index = extract_crops(vol, axis=0, patch_size=8, stride=4)
    assert sorted(set(index[:, 1].tolist())) == [0]
    assert sorted(set(index[:, 2].tolist())) == [0, 4, 8, 12]
    np.testing.assert_array_equal(blend_crops(crops, index, vol.shape, axis=0, patch_size=8), vol)


def test_take_crops_pad_value():
    vol = np.ones((3, 3, 2), np.float32)
    crops = take_crops(vol, np.array([[1, 0, 0]]), axis=2, patch_size=4, pad_value=-5.0)
    expected = np.full((4, 4), -5.0, np.float32)
    expected[:3, :3] = 1.0
    np.testing.assert_array_equal(crops[0], expected)


def _quadrant_mask() -> np.ndarray:
    """A 16 x 16 x 2 mask: 16 voxels (fraction 0.25) in crop (0, 0, 0), 3 voxels in crop (0, 8, 8), none elsewhere."""
    mask = np.zeros((16, 16, 2), bool)
    mask[0:4, 0:4, 0] = True
    mask[8, 8:11, 0] = True
    return mask


def test_brain_mask_skips_crops_without_brain():
    vol = np.random.default_rng(2).random((16, 16, 2)).astype(np.float32)
    full_crops, full_index = extract_crops(vol, axis=2, patch_size=8, stride=8)
    assert len(full_index) == 8  # 2 slices x 2 x 2
    crops, index = extract_crops(vol, axis=2, patch_size=8, stride=8, brain_mask=_quadrant_mask())
    assert index.tolist() == [[0, 0, 0], [0, 8, 8]]
    np.testing.assert_array_equal(crops[1], vol[8:16, 8:16, 0])


@pytest.mark.parametrize("min_fraction, expected", [
    (0.0, [[0, 0, 0], [0, 8, 8]]),
    (3 / 64 - 1e-6, [[0, 0, 0], [0, 8, 8]]),
    (3 / 64, [[0, 0, 0]]),  # strictly above the threshold is kept
    (0.1, [[0, 0, 0]]),
    (0.25, []),
    (1.0, []),
])
def test_min_brain_fraction(min_fraction, expected):
    index = crop_index((16, 16, 2), axis=2, patch_size=8, stride=8, brain_mask=_quadrant_mask(),
                       min_brain_fraction=min_fraction)
    assert index.tolist() == expected
    assert index.shape == (len(expected), 3)


def test_brain_mask_along_other_axis():
    mask = np.zeros((2, 16, 16), bool)
    mask[1, 12, 12] = True
    index = crop_index(mask.shape, axis=0, patch_size=8, stride=8, brain_mask=mask)
    assert index.tolist() == [[1, 8, 8]]


def test_uncovered_voxels_are_zero():
    blender = CropBlender((8, 8, 2), axis=2, patch_size=4)
    blender.add(np.full((1, 4, 4), 5.0, np.float32), np.array([[1, 4, 0]]))
    out = blender.result()
    expected = np.zeros((8, 8, 2), np.float32)
    expected[4:8, 0:4, 1] = 5.0
    np.testing.assert_array_equal(out, expected)


def test_blender_batches_equal_one_call():
    vol = np.random.default_rng(3).random((10, 11, 4)).astype(np.float32)
    crops, index = extract_crops(vol, axis=1, patch_size=6, stride=2)
    blender = CropBlender(vol.shape, axis=1, patch_size=6, blend="gaussian")
    for start in range(0, len(index), 7):
        blender.add(crops[start:start + 7] * 2, index[start:start + 7])
    one = blend_crops(crops * 2, index, vol.shape, axis=1, patch_size=6, blend="gaussian")
    np.testing.assert_allclose(blender.result(), one, rtol=1e-6)
    np.testing.assert_allclose(one, vol * 2, rtol=1e-5)


def test_blend_weights():
    np.testing.assert_array_equal(blend_weights(4), np.ones((4, 4), np.float32))
    w = blend_weights(32, "gaussian")
    assert w.shape == (32, 32) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0)
    assert w[15, 15] == w[16, 16] == w.max()  # centred
    np.testing.assert_array_equal(w, w.T)
    np.testing.assert_array_equal(w, w[::-1, ::-1])
    assert w.min() == pytest.approx(1e-3)  # corners floored
    # sigma = 0.125 * 8 = 1: one pixel step from the centre pair follows exp(-0.5 * (x / sigma)^2)
    w8 = blend_weights(8, "gaussian")
    assert w8[3, 4] / w8[3, 3] == pytest.approx(1.0)
    assert w8[3, 2] / w8[3, 3] == pytest.approx(np.exp(-0.5 * (1.5 ** 2 - 0.5 ** 2)), rel=1e-5)
    with pytest.raises(ValueError, match=r"blend mode 'median' is not valid"):
        blend_weights(8, "median")


@pytest.mark.parametrize("axis", [3, -1, 1.5, True])
def test_bad_axis(axis):
    with pytest.raises(ValueError, match=r"axis=.* must be 0, 1 or 2"):
        extract_crops(np.zeros((8, 8, 8), np.float32), axis=axis, patch_size=4, stride=4)
    with pytest.raises(ValueError, match=r"axis=.* must be 0, 1 or 2"):
        CropBlender((8, 8, 8), axis=axis, patch_size=4)


@pytest.mark.parametrize("stride", [0, -2, 5])
def test_bad_stride(stride):
    with pytest.raises(ValueError, match=rf"stride={stride} is out of range"):
        extract_crops(np.zeros((8, 8, 8), np.float32), axis=2, patch_size=4, stride=stride)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"volume must be 3D; got shape \(8, 8\)"):
        extract_crops(np.zeros((8, 8)), axis=0, patch_size=4, stride=4)
    with pytest.raises(ValueError, match=r"brain_mask has shape \(8, 8, 7\)"):
        extract_crops(np.zeros((8, 8, 8)), axis=2, patch_size=4, stride=4, brain_mask=np.ones((8, 8, 7), bool))
    with pytest.raises(ValueError, match=r"min_brain_fraction=1.5 is out of range"):
        crop_index((8, 8, 8), axis=2, patch_size=4, stride=4, min_brain_fraction=1.5)
    with pytest.raises(ValueError, match=r"crop_origins|patch_size=0 is out of range"):
        crop_origins(8, 0, 1)
    blender = CropBlender((8, 8, 8), axis=2, patch_size=4)
    with pytest.raises(ValueError, match=r"predictions of shape \(2, 3, 3\) do not match 2 crops of size 4"):
        blender.add(np.zeros((2, 3, 3), np.float32), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match=r"do not match 1 crops"):
        blender.add(np.zeros((2, 4, 4), np.float32), np.zeros((1, 3), int))
