"""Classical baselines: accuracy on a tiny synthetic volume, the segmenter contract, registry errors."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from stego_core.engine.reconstruction import EngineConfig
from conftest import segment_volume as engine_segment_volume
from stego_core.engine.segmenter import Segmenter
from stego_core.evaluation.metrics import dice
from stego_core.methods.classical import (
    SEGMENTERS,
    available_segmenters,
    build_segmenter,
)


def segment_volume(segmenter, image, brain_mask):
    """Whole axial slices through the engine (no labels, no crops); ``None`` mask = everything."""
    mask = np.ones(image.shape, dtype=bool) if brain_mask is None else brain_mask
    engine = EngineConfig(axis=2, patch_size=None, batch_size=16, blend="constant")
    return engine_segment_volume(segmenter, image, mask, engine, progress=False)

SHAPE = (48, 48, 24)
# phantom design (not read from its label): about 3 % of brain voxels are vessel, so percentile uses q = 97
SETTINGS = {"percentile": {"q": 97.0}, "frangi3d": {"bright_percentile": 97.0}, "sato3d": {"bright_percentile": 97.0}}


def _capsule_cover(shape, p0, p1, radius) -> np.ndarray:
    """Fraction-of-voxel coverage (linear partial-volume ramp) of a tube of ``radius`` around segment p0-p1."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    t = np.clip((grid - p0) @ d / (d @ d), 0.0, 1.0)
    dist = np.linalg.norm(grid - (p0 + t[..., None] * d), axis=-1)
    return np.clip(radius + 0.5 - dist, 0.0, 1.0)


@pytest.fixture(scope="module")
def phantom():
    """Bright tubes (mostly in the axial plane, one crossing it) on noisy tissue; returns image, label, brain."""
    rng = np.random.default_rng(0)
    tubes = [((4, 10, 8), (43, 14, 10), 2.0), ((8, 40, 15), (40, 20, 14), 1.6), ((24, 4, 6), (28, 44, 18), 1.8)]
    cover = np.zeros(SHAPE)
    for p0, p1, radius in tubes:
        cover = np.maximum(cover, _capsule_cover(SHAPE, p0, p1, radius))
    image = np.clip(0.35 + 0.5 * cover + rng.normal(0.0, 0.05, SHAPE), 0.0, 1.0).astype(np.float32)
    brain = np.zeros(SHAPE, bool)
    brain[2:-2, 2:-2, 1:-1] = True
    image[~brain] = 0.0  # skull-stripped: outside set to the minimum
    label = (cover >= 0.5) & brain
    return image, label, brain


# ------------------------------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_segments_synthetic_tubes(phantom, name):
    image, label, brain = phantom
    segmenter = build_segmenter(name, **SETTINGS.get(name, {}))
    prob, binary = segment_volume(segmenter, image, brain)
    assert prob.shape == SHAPE and prob.dtype == np.float32
    assert 0.0 <= prob.min() and prob.max() <= 1.0
    assert np.array_equal(binary, (prob > 0.5) & brain)
    assert not prob[~brain].any()
    assert dice(binary, label) > 0.7


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_deterministic(phantom, name):
    image, _, brain = phantom
    first = segment_volume(build_segmenter(name), image, brain)[0]
    second = segment_volume(build_segmenter(name), image, brain)[0]
    assert np.array_equal(first, second)


# ------------------------------------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", list(SEGMENTERS))
def test_interface_takes_images_only(name):
    segmenter = build_segmenter(name)
    assert isinstance(segmenter, Segmenter)
    assert segmenter.name == name and segmenter.threshold == 0.5
    assert list(inspect.signature(segmenter.fit_volume).parameters) == ["image", "brain_mask"]
    assert list(inspect.signature(segmenter.predict_slices).parameters) == ["slices"]
    if getattr(segmenter, "volume_level", False):  # 3D filters: the engine calls predict_volume instead
        assert list(inspect.signature(segmenter.predict_volume).parameters) == ["image", "brain_mask", "spacing"]
        with pytest.raises(TypeError, match="volume-level"):
            segmenter.predict_slices(np.zeros((1, 8, 8), np.float32))
        return
    with pytest.raises(RuntimeError, match="call fit_volume"):
        segmenter.predict_slices(np.zeros((1, 8, 8), np.float32))


@pytest.mark.parametrize("name", ["percentile", "otsu", "multiotsu", "kmeans", "gmm"])
def test_intensity_methods_score_crops_like_slices(phantom, name):
    image, _, brain = phantom
    segmenter = build_segmenter(name)
    segmenter.fit_volume(image, brain)
    slices = np.moveaxis(image, 2, 0)[5:9]
    whole = segmenter.predict_slices(slices)
    crop = segmenter.predict_slices(slices[:, 10:26, 20:36])
    assert np.array_equal(crop, whole[:, 10:26, 20:36])


def test_frangi_crops_match_slices_away_from_borders(phantom):
    # gamma is fixed per volume in fit_volume, so only the filter support near crop borders differs
    image, _, brain = phantom
    segmenter = build_segmenter("frangi", sigmas_vox=(1.0,))
    segmenter.fit_volume(image, brain)
    slices = np.moveaxis(image, 2, 0)[8:11]
    whole = segmenter.predict_slices(slices)
    crop = segmenter.predict_slices(slices[:, 4:36, 6:38])
    margin = 6  # > Gaussian-derivative radius int(4 * sigma + 0.5) = 4
    np.testing.assert_allclose(crop[:, margin:-margin, margin:-margin],
                               whole[:, 4 + margin:36 - margin, 6 + margin:38 - margin], atol=1e-5)
    assert segmenter.fitted_statistics()["gamma"] > 0


def test_percentile_scores_by_hand():
    image = (np.arange(1000, dtype=np.float64) / 999).reshape(10, 10, 10).astype(np.float32)
    segmenter = build_segmenter("percentile", q=90.0)
    segmenter.fit_volume(image, None)
    assert segmenter.intensity_threshold_ == pytest.approx(0.9, abs=1e-6)
    scores = segmenter.predict_slices(np.array([[[0.0, 0.45, 0.9, 0.95, 1.0]]], np.float32))
    # [0, t] -> [0, 0.5] and [t, 1] -> [0.5, 1], linearly
    np.testing.assert_allclose(scores[0, 0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-5)


def test_statistics_use_brain_voxels_only():
    image = np.full((10, 10, 10), 0.9, np.float32)
    image[:5] = np.linspace(0.0, 0.5, 500, dtype=np.float32).reshape(5, 10, 10)
    brain = np.zeros(image.shape, bool)
    brain[:5] = True  # the bright half is outside the brain
    segmenter = build_segmenter("percentile", q=50.0)
    segmenter.fit_volume(image, brain)
    assert segmenter.intensity_threshold_ == pytest.approx(0.25, abs=1e-3)
    with pytest.raises(ValueError, match="brain_mask is empty"):
        segmenter.fit_volume(image, np.zeros(image.shape, bool))
    with pytest.raises(ValueError, match=r"brain_mask has shape \(10, 10, 9\) but image has shape"):
        segmenter.fit_volume(image, np.ones((10, 10, 9), bool))


def test_two_level_volume_thresholds():
    image = np.full((8, 8, 8), 0.2, np.float32)
    image[2:4, 2:4, :] = 0.8
    for name in ("otsu", "multiotsu", "kmeans", "gmm"):
        segmenter = build_segmenter(name, **({"classes": 2} if name == "multiotsu" else {}))
        _, binary = segment_volume(segmenter, image, None)
        assert np.array_equal(binary, image > 0.5), name


def test_gmm_posterior_is_monotone(phantom):
    image, _, brain = phantom
    segmenter = build_segmenter("gmm")
    segmenter.fit_volume(image, brain)
    ramp = np.linspace(0.0, 1.0, 501, dtype=np.float32)[None, None, :]
    posterior = segmenter.predict_slices(ramp)[0, 0]
    assert np.all(np.diff(posterior) >= 0)
    assert posterior[0] < 0.01 and posterior[-1] > 0.99
    stats = segmenter.fitted_statistics()
    assert 0.6 < stats["vessel_mean"] < 0.95  # tubes sit at 0.85 with partial-volume edges
    assert 0.35 < stats["intensity_threshold"] < 0.75


def test_kmeans_seed_is_used(phantom):
    image, _, brain = phantom
    thresholds = set()
    for seed in (0, 1):
        segmenter = build_segmenter("kmeans", seed=seed, max_samples=2000, n_init=1)
        segmenter.fit_volume(image, brain)
        thresholds.add(segmenter.intensity_threshold_)
        assert 0.45 < segmenter.intensity_threshold_ < 0.75
    assert len(thresholds) == 2  # different subsamples, different (but both sensible) thresholds


def test_vesselness_rules_and_brightness_gate(phantom):
    image, label, brain = phantom
    otsu_rule = build_segmenter("sato")
    strict = build_segmenter("sato", rule="mean_std", k_std=6.0)
    otsu_rule.fit_volume(image, brain)
    strict.fit_volume(image, brain)
    assert strict.response_threshold_ > otsu_rule.response_threshold_
    assert otsu_rule.intensity_threshold_ == pytest.approx(float(np.median(image[brain])))
    # a dim ridge (tissue between darker CSF, below the brain median) is a ridge but not bright enough
    dim = np.full((1, 32, 32), 0.05, np.float32)
    dim[0, :, 14:18] = 0.3
    ungated = build_segmenter("sato", require_bright=False)
    ungated.fit_volume(image, brain)
    assert (ungated.predict_slices(dim)[0, 16, 15:17] > 0.5).all()
    assert (otsu_rule.predict_slices(dim)[0] <= 0.5).all()


# ------------------------------------------------------------------------------------------------ registry


def test_registry_lists_methods():
    assert available_segmenters() == ("percentile", "otsu", "multiotsu", "kmeans", "gmm", "frangi", "sato",
                                      "frangi3d", "sato3d")
    with pytest.raises(TypeError):
        SEGMENTERS["mine"] = object  # read-only table


def test_unknown_name_lists_choices_and_close_matches():
    with pytest.raises(ValueError, match=r"unknown segmenter 'fangi' \(did you mean 'frangi'( or 'frangi3d')?\?\); "
                                         r"valid names: percentile, otsu"):
        build_segmenter("fangi")
    with pytest.raises(ValueError, match=r"unknown segmenter 'unet'; valid names"):
        build_segmenter("unet")


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError,
                       match=r"unknown setting 'sigma' for segmenter 'frangi' \(did you mean 'sigmas_(vox|mm)'\?\)"):
        build_segmenter("frangi", sigma=2)
    with pytest.raises(ValueError, match=r"q=150"):
        build_segmenter("percentile", q=150)
    with pytest.raises(ValueError, match=r"classes=7"):
        build_segmenter("multiotsu", classes=7)
    with pytest.raises(ValueError, match="sigmas_vox"):
        build_segmenter("sato", sigmas_vox=[])
    with pytest.raises(ValueError, match=r"rule='hysteresis' is not valid"):
        build_segmenter("frangi", rule="hysteresis")


def test_settings_round_trip():
    segmenter = build_segmenter("frangi", sigmas_vox=[1, 2])
    settings = segmenter.settings()
    assert settings["sigmas_vox"] == (1.0, 2.0) and settings["rule"] == "otsu"
    assert build_segmenter("frangi", **settings).settings() == settings


def test_predict_validates_slices(phantom):
    image, _, brain = phantom
    segmenter = build_segmenter("otsu")
    segmenter.fit_volume(image, brain)
    with pytest.raises(ValueError, match=r"slices must be 3D"):
        segmenter.predict_slices(np.zeros((8, 8), np.float32))
    with pytest.raises(ValueError, match="slices contains 1 NaN"):
        segmenter.predict_slices(np.array([[[np.nan, 0.0]]], np.float32))


def test_percentile_on_saturated_image_keeps_the_saturated_voxels():
    # 3 % of the brain at the maximum (as clipped 8-bit vessel lumen): the 99th percentile is the maximum itself,
    # which nothing exceeds; the saturated voxels must still come out as vessel.
    image = np.full((20, 20, 10), 0.4, dtype=np.float32)
    image[::7, ::5, :] = 1.0
    image += np.linspace(0, 0.1, image.size, dtype=np.float32).reshape(image.shape) * (image < 1.0)
    mask = np.ones(image.shape, dtype=bool)
    seg = build_segmenter("percentile", q=99.0)
    seg.fit_volume(image, mask)
    pred = seg.predict_slices(np.moveaxis(image, 2, 0)) > 0.5
    assert np.array_equal(np.moveaxis(pred, 0, 2), image == 1.0)


def test_batched_frangi_equals_skimage_per_slice():
    """The fast path (all slices in one filter call, kernels cut at 8 sigma) equals skimage's per-slice Frangi."""
    from skimage.filters import frangi

    from stego_core.methods.vesselness import frangi_slices

    rng = np.random.default_rng(0)
    slices = rng.random((3, 40, 48)).astype(np.float32)
    slices[:, 18:22, :] += 2.0  # a bright horizontal tube
    fast = frangi_slices(slices, (1.0, 2.0), gamma=0.5)
    plain = np.stack([frangi(s, sigmas=(1.0, 2.0), gamma=0.5, black_ridges=False, mode="reflect")
                      for s in slices])
    diff = float(np.abs(fast - plain).max())
    print(f"max |fast - skimage| = {diff:.2e}")
    assert fast.shape == slices.shape and fast.dtype == np.float32
    assert diff < 1e-5
    assert fast[:, 20, 10:38].mean() > 10 * fast[:, 5, 10:38].mean()  # it does respond to the tube


def test_batched_sato_equals_skimage_per_slice():
    from skimage.filters import sato

    from stego_core.methods.vesselness import sato_slices

    rng = np.random.default_rng(1)
    slices = rng.random((2, 36, 30)).astype(np.float32)
    fast = sato_slices(slices, (1.0, 2.0))
    plain = np.stack([sato(s, sigmas=(1.0, 2.0), black_ridges=False, mode="reflect") for s in slices])
    assert fast.shape == slices.shape and float(np.abs(fast - plain).max()) < 1e-5
