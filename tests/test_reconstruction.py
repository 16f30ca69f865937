"""Tests for stego_core.engine.reconstruction: the sliding-window engine around any segmenter."""

from __future__ import annotations

import numpy as np
from conftest import segment_volume
import pytest

from stego_core.engine.reconstruction import (
    EngineConfig,
    binarize,
    predict_volume,
    window,
)
from stego_core.engine.segmenter import Segmenter


class IdentitySegmenter:
    """Returns the crop intensities as probabilities; records every call."""

    name = "identity"
    threshold = 0.5

    def __init__(self) -> None:
        self.fit_calls: list[tuple[np.ndarray, np.ndarray | None]] = []
        self.inputs: list[np.ndarray] = []

    def fit_volume(self, image, brain_mask):
        self.fit_calls.append((image, brain_mask))

    def predict_slices(self, slices):
        self.inputs.append(np.array(slices, copy=True))
        return slices


class WrongShapeSegmenter(IdentitySegmenter):
    name = "wrong_shape_method"

    def predict_slices(self, slices):
        return slices[:, :-1, :]


def _volume(shape=(20, 12, 9), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.uniform(0.05, 1.0, shape).astype(np.float32)  # all values distinct, none 0
    mask = np.zeros(shape, bool)
    mask[3:17, 2:10, 1:8] = True
    label = np.zeros(shape, bool)
    label[8:11, 5:7, :] = True
    return image, mask, label


def test_identity_segmenter_is_a_segmenter():
    assert isinstance(IdentitySegmenter(), Segmenter)


@pytest.mark.parametrize("axis, patch, stride, blend", [
    (2, 8, 4, "constant"), (2, 8, 4, "gaussian"), (0, 6, 3, "gaussian"), (1, 5, 2, "constant"),
    (2, 16, 8, "gaussian"),   # patch larger than one slice side (12): padded, then cropped back
    (0, 4, 4, "constant"),    # no overlap
    (2, None, None, "constant"), (0, None, None, "gaussian"),   # whole slices
])
def test_identity_reproduces_image_inside_mask(axis, patch, stride, blend):
    image, mask, _ = _volume()
    seg = IdentitySegmenter()
    prob = predict_volume(seg, image, mask, EngineConfig(axis=axis, patch_size=patch, stride=stride, batch_size=7,
                                                         blend=blend), progress=False)
    assert prob.shape == image.shape and prob.dtype == np.float32
    np.testing.assert_allclose(prob[mask], image[mask], rtol=0, atol=1e-5)
    assert np.all(prob[~mask] == 0.0)
    # fit_volume exactly once, with the image and mask themselves
    assert len(seg.fit_calls) == 1
    fit_image, fit_mask = seg.fit_calls[0]
    np.testing.assert_array_equal(fit_image, image)
    np.testing.assert_array_equal(fit_mask, mask)
    # batches of at most batch_size crops of the engine's window
    p, _ = window(image.shape, EngineConfig(axis=axis, patch_size=patch, stride=stride))
    assert all(x.ndim == 3 and x.shape[1:] == (p, p) and 1 <= len(x) <= 7 for x in seg.inputs)


def test_segmenter_sees_only_image_crops():
    image, mask, label = _volume()
    seg = IdentitySegmenter()
    predict_volume(seg, image, mask, EngineConfig(axis=2, patch_size=8, stride=4, batch_size=5), progress=False)
    crops = np.concatenate(seg.inputs)
    # Image values lie in [0.05, 1): a label or mask crop (0s and 1s) would show up here.
    assert crops.dtype == np.float32 and crops.min() >= 0.05 and crops.max() < 1.0
    assert set(np.unique(crops).tolist()) <= set(np.unique(image).tolist())
    # Every crop is the image window at some (slice, row, col): locate each by brute force.
    slices = np.moveaxis(image, 2, 0)
    for crop in crops:
        found = any(np.array_equal(crop, slices[s, r:r + 8, c:c + 8])
                    for s in range(slices.shape[0]) for r in range(slices.shape[1] - 7)
                    for c in range(slices.shape[2] - 7))
        assert found
    # Crops with no brain are never predicted
    assert all(crop.shape == (8, 8) for crop in crops)
    n_brain_windows = sum(mask[r:r + 8, c:c + 8, s].any() for s in range(9) for r in (0, 4, 8, 12)
                          for c in (0, 4))
    assert len(crops) == n_brain_windows


def test_segment_volume_thresholds_at_segmenter_threshold():
    image, mask, _ = _volume()
    prob, pred = segment_volume(IdentitySegmenter(), image, mask, EngineConfig(patch_size=8, stride=4),
                                progress=False)
    assert pred.dtype == bool
    np.testing.assert_array_equal(pred, (image > 0.5) & mask)
    np.testing.assert_allclose(prob[mask], image[mask], atol=1e-5)


def test_shape_mismatch_and_bad_input():
    image, mask, _ = _volume()
    with pytest.raises(ValueError, match="brain_mask"):
        predict_volume(IdentitySegmenter(), image, mask[:, :, :-1], EngineConfig(), progress=False)
    with pytest.raises(ValueError, match="image"):
        predict_volume(IdentitySegmenter(), image[..., 0], mask[..., 0], EngineConfig(), progress=False)


def test_wrong_output_shape_names_the_segmenter():
    image, mask, _ = _volume()
    with pytest.raises(ValueError, match="wrong_shape_method"):
        predict_volume(WrongShapeSegmenter(), image, mask, EngineConfig(patch_size=8, stride=4), progress=False)


def test_engine_config_validation():
    with pytest.raises(ValueError, match="engine.axis"):
        EngineConfig(axis=3)
    with pytest.raises(ValueError, match="engine.blend"):
        EngineConfig(blend="median")
    with pytest.raises(ValueError, match="engine.stride"):
        EngineConfig(patch_size=8, stride=9)
    with pytest.raises(ValueError, match="engine.batch_size"):
        EngineConfig(batch_size=0)
    assert window((20, 12, 9), EngineConfig(axis=2, patch_size=None)) == (20, 20)
    assert window((20, 12, 9), EngineConfig(axis=0, patch_size=None)) == (12, 12)
    assert window((20, 12, 9), EngineConfig(axis=2, patch_size=8)) == (8, 4)
    assert window((20, 12, 9), EngineConfig(axis=2, patch_size=8, stride=3)) == (8, 3)


def test_binarize():
    prob = np.array([[[0.2, 0.5, 0.51, 0.9]]], dtype=np.float32)
    np.testing.assert_array_equal(binarize(prob, 0.5), [[[False, False, True, True]]])
    mask = np.array([[[True, True, True, False]]])
    np.testing.assert_array_equal(binarize(prob, 0.5, mask), [[[False, False, True, False]]])
    np.testing.assert_array_equal(binarize(prob, 0.1), [[[True, True, True, True]]])
    with pytest.raises(ValueError, match="threshold"):
        binarize(prob, 1.5)


@pytest.mark.slow
def test_compiled_segmenter_equals_the_plain_one():
    """The fast path (torch.compile + inference mode) predicts what the plain module predicts."""
    import torch

    from stego_core.features.backbones import build_backbone
    from stego_core.methods.stego.inference import StegoSegmenterModel, TorchSegmenter
    from stego_core.methods.stego.model import ClusterProbe, StegoHead

    torch.manual_seed(0)
    backbone = build_backbone("classical", res=4)
    model = StegoSegmenterModel(backbone, StegoHead(backbone.feature_dim, 8), ClusterProbe(8, 3),
                                torch.tensor([False, True, False]), patch_size=8, alpha=100.0)
    crops = np.random.default_rng(0).random((5, 8, 8)).astype(np.float32)
    plain = TorchSegmenter(model, batch_size=5).predict_slices(crops)
    fast = TorchSegmenter(model, compile=True, batch_size=2).predict_slices(crops)  # passes of 2, 2, 1 (padded)
    print(f"max |compiled - plain| = {np.abs(fast - plain).max():.1e}")
    assert fast.shape == plain.shape == crops.shape
    assert np.abs(fast - plain).max() < 1e-5


def test_segmenter_forward_passes_of_its_batch_size_equal_one_pass():
    """Crops run through the model in passes of ``batch_size`` (chosen from the model by default); the
    probabilities do not depend on how the engine's batch is split."""
    import torch

    from stego_core.features.backbones import build_backbone
    from stego_core.features.base import forward_batch_size
    from stego_core.methods.stego.inference import StegoSegmenterModel, TorchSegmenter
    from stego_core.methods.stego.model import ClusterProbe, StegoHead

    torch.manual_seed(0)
    backbone = build_backbone("mra_vit_t4_p4", weights="random", res=16)
    model = StegoSegmenterModel(backbone, StegoHead(backbone.feature_dim, 8), ClusterProbe(8, 3),
                                torch.tensor([False, True, False]), patch_size=16, alpha=100.0)
    crops = np.random.default_rng(0).random((7, 16, 16)).astype(np.float32)
    whole = TorchSegmenter(model, batch_size=7).predict_slices(crops)
    split = TorchSegmenter(model, batch_size=3).predict_slices(crops)
    chosen = TorchSegmenter(model)
    assert chosen.batch_size == forward_batch_size(backbone.spec, "cpu")
    np.testing.assert_allclose(split, whole, atol=1e-5)  # float32 matmuls of other batch shapes differ by ~3e-6
    np.testing.assert_allclose(chosen.predict_slices(crops), whole, atol=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        TorchSegmenter(model, batch_size=0)
