"""Tests of the synthetic TOF-MRA phantom (stego_core.data.phantom)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.morphology import skeletonize

from stego_core.data.io import discover_cases, load_case
from stego_core.data.phantom import (
    Phantom,
    PhantomConfig,
    VesselField,
    grow_tree,
    make_phantom,
    write_phantom_cases,
)

SMALL = PhantomConfig(shape=(48, 48, 32), n_trees=2, max_depth=4)


@pytest.fixture(scope="module")
def phantom() -> Phantom:
    return make_phantom(PhantomConfig(), seed=0)


@pytest.fixture(scope="module")
def clean() -> Phantom:
    """Default geometry without bias or noise, so tissue intensities can be read off exactly."""
    return make_phantom(PhantomConfig(noise_sigma=0.0, bias_strength=0.0, texture=0.0), seed=0)


def test_same_seed_same_bytes_other_seed_differs():
    a = make_phantom(SMALL, seed=7)
    b = make_phantom(SMALL, seed=7)
    c = make_phantom(SMALL, seed=8)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert a.occupancy.tobytes() == b.occupancy.tobytes()
    assert a.image.tobytes() != c.image.tobytes()
    assert a.label.tobytes() != c.label.tobytes()


def test_types_ranges_and_geometry(phantom):
    assert phantom.image.shape == (96, 96, 64)
    assert phantom.image.dtype == np.float32
    assert phantom.label.dtype == np.uint8 and phantom.brain_mask.dtype == np.uint8
    assert set(np.unique(phantom.label).tolist()) == {0, 1}
    assert 0.0 <= phantom.image.min() and phantom.image.max() <= 255.0
    assert 0.0 <= phantom.occupancy.min() and phantom.occupancy.max() <= 1.0
    np.testing.assert_array_equal(phantom.affine, np.eye(4))
    # label = occupancy >= 0.5, inside the brain mask, which is inside the head
    np.testing.assert_array_equal(phantom.label, phantom.occupancy >= 0.5)
    assert not (phantom.label > phantom.brain_mask).any()
    assert not (phantom.brain_mask > phantom.head_mask).any()


def test_vessel_fraction_and_connectivity(phantom):
    label = phantom.label > 0
    fraction = label.mean()
    assert 0.002 <= fraction <= 0.02, fraction
    # mostly connected trees: a handful of components hold almost all vessel voxels
    labels, n = ndi.label(label, structure=np.ones((3, 3, 3)))
    sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
    assert sizes[:10].sum() >= 0.95 * label.sum()
    # partial volume: fractional occupancies exist at the vessel edges
    edge = (phantom.occupancy > 0.05) & (phantom.occupancy < 0.95)
    assert edge.sum() > 0.3 * label.sum()


def test_radius_range_thick_and_thin(phantom):
    label = phantom.label > 0
    dist = ndi.distance_transform_edt(label)
    skeleton = skeletonize(label)
    radii = dist[skeleton]
    assert dist.max() >= 2.0  # thick trunks (and the sinus)
    assert np.percentile(radii, 25) <= 1.0  # many thin branches
    # thin vessels are faint (sub-voxel radii do not reach occupancy 1)
    assert ((phantom.occupancy > 0.1) & (phantom.occupancy < 0.5)).sum() > 0


def test_tissue_intensities(clean):
    cfg = clean.config
    image, head, brain = clean.image, clean.head_mask > 0, clean.brain_mask > 0
    depth = ndi.distance_transform_edt(head)
    air = ndi.distance_transform_edt(~head) > 3.5  # beyond the one-voxel partial-volume blur
    assert np.all(image[air] == 0.0)
    scalp = head & (depth > 1.5) & (depth < cfg.scalp_mm - 0.5)
    skull = head & (depth > cfg.scalp_mm + 1.0) & (depth < cfg.scalp_mm + cfg.skull_mm - 1.0)
    tissue = brain & ~ndi.binary_dilation(clean.occupancy > 0, iterations=2)
    scalp_v, skull_v = np.median(image[scalp]), np.median(image[skull])
    brain_v, vessel_v = np.median(image[tissue]), np.median(image[clean.occupancy > 0.9])
    assert scalp_v == pytest.approx(cfg.scalp_intensity, rel=0.05)
    assert skull_v == pytest.approx(cfg.skull_intensity, rel=0.05)
    assert brain_v == pytest.approx(cfg.brain_intensity, rel=0.05)
    assert vessel_v >= 250.0  # bright, saturated TOF signal
    # darker CSF exists inside the brain mask (ventricles, sulci, rim)
    assert (image[brain] < 0.5 * (cfg.brain_intensity + cfg.csf_intensity)).mean() > 0.05


def test_noise_and_bias(phantom, clean):
    corner = phantom.image[:6, :6, :]
    # Rician noise on air: mean sigma * sqrt(pi / 2)
    assert corner.mean() == pytest.approx(phantom.config.noise_sigma * np.sqrt(np.pi / 2), rel=0.1)
    assert not np.array_equal(phantom.image, clean.image)


def test_anisotropic_spacing_is_drawn_in_mm(tmp_path):
    iso = make_phantom(PhantomConfig(shape=(64, 64, 48), spacing_mm=(1.0, 1.0, 1.0), n_trees=2), seed=1)
    aniso = make_phantom(PhantomConfig(shape=(64, 64, 24), spacing_mm=(1.0, 1.0, 2.0), n_trees=2), seed=1)
    np.testing.assert_allclose(np.diag(aniso.affine), [1.0, 1.0, 2.0, 1.0])
    # same physical head: half the voxels along z, the same volume in mm^3
    vol_iso = iso.head_mask.sum() * 1.0
    vol_aniso = aniso.head_mask.sum() * 2.0
    assert vol_aniso == pytest.approx(vol_iso, rel=0.05)
    folders = write_phantom_cases(tmp_path, 1, PhantomConfig(shape=(48, 48, 24), spacing_mm=(1.0, 1.0, 2.0),
                                                             n_trees=1, max_depth=3), seed=3)
    loaded = load_case(discover_cases(folders[0])[0])
    assert loaded.image.spacing_mm == pytest.approx((1.0, 1.0, 2.0))
    assert loaded.image.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(np.diag(loaded.image.affine), [1.0, 1.0, 2.0, 1.0])


def test_write_cases_and_refuse_overwrite(tmp_path):
    folders = write_phantom_cases(tmp_path / "ph", 2, SMALL, seed=10)
    assert [f.name for f in folders] == ["phantom_000", "phantom_001"]
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["brain_mask.nii.gz", "image.nii.gz", "label.nii.gz"]
    cases = discover_cases(tmp_path / "ph", require_labels=True)
    second = load_case(cases[1])
    expected = make_phantom(SMALL, seed=11)  # case seeds are seed + i
    np.testing.assert_array_equal(second.image.data, expected.image)
    np.testing.assert_array_equal(second.label, expected.label > 0)
    np.testing.assert_array_equal(second.mask, expected.brain_mask > 0)
    with pytest.raises(FileExistsError, match="phantom_000"):
        write_phantom_cases(tmp_path / "ph", 2, SMALL, seed=99)
    # nothing was overwritten by the refused call
    np.testing.assert_array_equal(load_case(cases[1]).image.data, expected.image)
    write_phantom_cases(tmp_path / "ph", 1, SMALL, seed=99, overwrite=True)
    np.testing.assert_array_equal(load_case(cases[0]).image.data, make_phantom(SMALL, seed=99).image)


def test_murray_law_angles_and_lengths():
    cfg = PhantomConfig()
    # a large sphere of room so that every branch grows to full depth
    n = 80
    grid = np.indices((n, n, n)).astype(np.float64)
    depth = (38.0 - np.sqrt(((grid - n / 2) ** 2).sum(axis=0))).astype(np.float32)
    capsules, splits = [], []
    grow_tree(np.array([40.0, 40.0, 20.0]), np.array([0.0, 0.0, 1.0]), 2.5, cfg, VesselField(depth, np.ones(3)),
               np.random.default_rng(0), 1.0, capsules, splits)
    assert len(splits) >= 10
    s = np.asarray(splits)
    r0, r1, r2, angle, length = s.T
    np.testing.assert_allclose(r1 ** 3 + r2 ** 3, r0 ** 3, rtol=1e-9)
    ratio = np.r_[r1, r2] / np.r_[r0, r0]
    lo, hi = (0.5 - cfg.murray_jitter) ** (1 / 3), (0.5 + cfg.murray_jitter) ** (1 / 3)
    assert ratio.min() >= lo - 1e-9 and ratio.max() <= hi + 1e-9
    assert abs(np.median(ratio) - 2 ** (-1 / 3)) < 0.05
    assert angle.min() >= 30.0 and angle.max() <= 75.0
    assert length.min() >= 4.0 and length.max() <= 10.0
    radii = np.array([c[2] for c in capsules])
    assert radii.max() == pytest.approx(2.5) and radii.min() < 1.0


@pytest.mark.parametrize("kwargs, name", [
    ({"n_trees": 0}, "n_trees"),
    ({"spacing_mm": (1.0, -1.0, 1.0)}, "spacing_mm"),
    ({"root_radius_vox": (3.0, 1.0)}, "root_radius_vox"),
    ({"shape": (10, 10, 10)}, "shape"),
    ({"noise_sigma": -1.0}, "noise_sigma"),
    ({"bias_strength": 1.5}, "bias_strength"),
    ({"bifurcation_angle_deg": (30.0, 190.0)}, "bifurcation_angle_deg"),
    ({"scalp_mm": 20.0, "skull_mm": 20.0}, "scalp_mm"),
])
def test_bad_config_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PhantomConfig(**kwargs)


def test_bad_arguments():
    with pytest.raises(TypeError, match="PhantomConfig"):
        make_phantom({"shape": (48, 48, 32)}, seed=0)
    with pytest.raises(ValueError, match="n_volumes"):
        write_phantom_cases("unused", 0, SMALL, seed=0)
