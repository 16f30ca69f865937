"""Topology, vessel-size and surface metrics against hand-computed tiny volumes.

Betti numbers of cubes, shells, rings and blobs; radius bins of straight tubes whose discretised cross-sections
have known distance-transform radii; HD95 and ASSD of offset cubes worked out voxel by voxel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import euler_number

from stego_core.evaluation.metrics import (
    betti_errors,
    betti_numbers,
    radius_recall,
    surface_distances,
)

# ------------------------------------------------------------------------------------------------ shapes


def cube(shape=(7, 7, 7), lo=1, hi=6) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return mask


def shell() -> np.ndarray:
    """A 5^3 cube with its 3^3 interior removed: one piece enclosing one cavity."""
    mask = cube()
    mask[2:5, 2:5, 2:5] = False
    return mask


def square_ring() -> np.ndarray:
    """A 5x5 square tube along axis 2, open at both ends: one loop (a torus, topologically)."""
    mask = cube()
    mask[2:5, 2:5, :] = False
    return mask


def two_blobs() -> np.ndarray:
    mask = np.zeros((10, 6, 6), bool)
    mask[1:3, 1:3, 1:3] = True
    mask[6:9, 2:5, 2:5] = True
    return mask


def topcow_reference(mask: np.ndarray) -> tuple[int, int, int]:
    """TopCoW's evaluation code, transcribed: pad the whole array, label, Euler characteristic."""
    padded = np.pad(mask, 1)
    b0 = ndimage.label(padded, structure=np.ones((3, 3, 3)))[1]
    b2 = ndimage.label(~padded, structure=ndimage.generate_binary_structure(3, 1))[1] - 1
    chi = euler_number(padded, connectivity=3)
    return int(b0), int(b0 + b2 - chi), int(b2)


# ----------------------------------------------------------------------------------------- Betti numbers


@pytest.mark.parametrize(
    ("mask", "expected"),
    [
        (cube(), (1, 0, 0)),
        (shell(), (1, 0, 1)),
        (square_ring(), (1, 1, 0)),
        (two_blobs(), (2, 0, 0)),
        (np.zeros((5, 5, 5), bool), (0, 0, 0)),
        (np.ones((1, 1, 1), bool), (1, 0, 0)),
    ],
    ids=["solid cube", "hollow shell", "square ring", "two blobs", "empty", "one voxel"],
)
def test_betti_numbers_of_hand_computed_shapes(mask, expected):
    assert betti_numbers(mask) == expected
    assert betti_numbers(mask.astype(np.uint8) * 255) == expected  # {0, 255} masks too


def test_betti_two_loops_and_two_cavities():
    # a 5x9 slab pierced by two square holes: a two-holed torus
    slab = np.zeros((7, 11, 5), bool)
    slab[1:6, 1:10, 1:4] = True
    slab[2:5, 2:4, :] = False
    slab[2:5, 6:8, :] = False
    assert betti_numbers(slab) == (1, 2, 0)
    # two shells side by side, not touching
    two = np.concatenate([shell(), shell()], axis=0)
    assert betti_numbers(two) == (2, 0, 2)


def test_betti_connectivity_26_foreground_6_background():
    # a diamond ring in one slice, closed only through diagonal (edge) contacts
    ring = np.zeros((7, 7, 3), bool)
    for i, j in [(1, 3), (2, 2), (2, 4), (3, 1), (3, 5), (4, 2), (4, 4), (5, 3)]:
        ring[i, j, 1] = True
    # 26-connected: one piece and one loop; the 6-connected background cannot leak through the diagonals
    assert betti_numbers(ring) == (1, 1, 0)
    # two voxels touching at a corner are one component
    corner = np.zeros((4, 4, 4), bool)
    corner[1, 1, 1] = corner[2, 2, 2] = True
    assert betti_numbers(corner) == (1, 0, 0)
    # a cavity sealed only at a corner still counts: the background is 6-connected
    sealed = shell()
    sealed[1, 1, 1] = False  # remove a corner voxel of the shell: the cavity touches the outside at a vertex
    assert betti_numbers(sealed)[2] == 1


def test_betti_padding_closes_masks_cut_by_the_array_border():
    # a shell that fills the whole array: padding keeps its cavity enclosed
    full_shell = shell()[1:6, 1:6, 1:6]
    assert full_shell.shape == (5, 5, 5) and full_shell[0].all()
    assert betti_numbers(full_shell) == (1, 0, 1)
    # open one face at the array border: the cavity joins the padded outside, no cavity, no loop
    cup = full_shell.copy()
    cup[0, 1:4, 1:4] = False
    assert betti_numbers(cup) == (1, 0, 0)
    # a ring cut by the array on both ends is still a loop
    assert betti_numbers(square_ring()[1:6, 1:6, :]) == (1, 1, 0)


def test_betti_independent_of_placement_and_array_size():
    small = square_ring()
    big = np.zeros((30, 25, 40), bool)
    big[10:17, 3:10, 20:27] = small
    assert betti_numbers(big) == betti_numbers(small) == (1, 1, 0)


def test_betti_matches_topcow_reference_on_random_volumes():
    rng = np.random.default_rng(7)
    for _ in range(60):
        shape = tuple(int(n) for n in rng.integers(2, 10, size=3))
        mask = rng.random(shape) < rng.uniform(0.1, 0.8)
        assert betti_numbers(mask) == topcow_reference(mask)


def test_betti_refuses_2d_and_non_binary():
    with pytest.raises(ValueError, match="3D"):
        betti_numbers(np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="values"):
        betti_numbers(np.full((3, 3, 3), 2))


def test_betti_errors():
    ring = square_ring()
    cut = ring.copy()
    cut[3, :, :] = False  # cut along the tube's axis: two U-shaped pieces, no loop
    assert betti_numbers(cut) == (2, 0, 0)
    assert betti_errors(cut, ring) == {"betti0_error": 1.0, "betti1_error": 1.0}
    assert betti_errors(ring, cut) == {"betti0_error": 1.0, "betti1_error": 1.0}  # absolute, symmetric
    assert betti_errors(ring, ring) == {"betti0_error": 0.0, "betti1_error": 0.0}
    empty = np.zeros_like(ring)
    assert betti_errors(empty, empty) == {"betti0_error": 0.0, "betti1_error": 0.0}
    assert betti_errors(np.zeros((10, 6, 6), bool), two_blobs()) == {"betti0_error": 2.0, "betti1_error": 0.0}
    with pytest.raises(ValueError, match="shape"):
        betti_errors(ring, two_blobs())


# ------------------------------------------------------------------------------------------- radius bins

#: Disc radii R (voxel centres with i^2 + j^2 <= R^2) and their distance-transform radius at the centre, the
#: distance to the nearest background voxel: the smallest sqrt(i^2 + j^2) > R.
DISCS = {"thin": (1.0, math.sqrt(2)), "medium": (2.0, math.sqrt(5)), "thick": (4.5, 5.0)}
TUBE_CENTRES = {"thin": 6, "medium": 26, "thick": 46}
TUBE_LENGTH = 16


def tubes(which=("thin", "medium", "thick")) -> tuple[np.ndarray, dict[str, int]]:
    """Straight tubes along axis 2 spanning the whole array (no end caps), 20 voxels apart.

    The skeleton stops short of the array's ends, so a tube's end voxels take the radius of their own tube's
    skeleton end; the spacing keeps every other tube's skeleton farther, also in mm with 2 mm slices.
    """
    ii, jj = np.mgrid[:53, :13]
    mask = np.zeros((53, 13, TUBE_LENGTH), bool)
    sizes = {}
    for name in which:
        radius, _ = DISCS[name]
        disc = (ii - TUBE_CENTRES[name]) ** 2 + (jj - 6) ** 2 <= radius**2
        mask[disc] = True
        sizes[name] = int(disc.sum()) * TUBE_LENGTH
    return mask, sizes


def test_tube_radii_are_what_the_bins_assume():
    mask, sizes = tubes()
    edt = ndimage.distance_transform_edt(mask)
    for name, (_, radius) in DISCS.items():
        assert edt[TUBE_CENTRES[name], 6, 5] == pytest.approx(radius)
    assert sizes == {"thin": 5 * TUBE_LENGTH, "medium": 13 * TUBE_LENGTH, "thick": 69 * TUBE_LENGTH}


def test_radius_recall_exact_bins_on_tubes():
    target, sizes = tubes()
    result = radius_recall(target, target)
    for name in ("thin", "medium", "thick"):
        assert result[f"n_{name}"] == sizes[name]  # every voxel of a tube in its tube's bin, ends included
        assert result[f"recall_{name}"] == 1.0
    assert result["bound_low_vox"] == 1.5 and result["bound_high_vox"] == 3.0
    assert "bound_low_mm" not in result

    medium_only, _ = tubes(("medium",))
    result = radius_recall(medium_only, target)
    assert (result["recall_thin"], result["recall_medium"], result["recall_thick"]) == (0.0, 1.0, 0.0)

    half_thick = target.copy()
    half_thick[36:, :, TUBE_LENGTH // 2 :] = False  # half of the thick tube's length missed
    half_thick[:16, :, :] = False  # the thin tube missed
    result = radius_recall(half_thick, target)
    assert (result["recall_thin"], result["recall_medium"], result["recall_thick"]) == (0.0, 1.0, 0.5)


def test_radius_recall_empty_bins_are_nan_and_empty_masks():
    target, sizes = tubes(("thin",))
    result = radius_recall(target, target)
    assert result["recall_thin"] == 1.0 and result["n_thin"] == sizes["thin"]
    assert math.isnan(result["recall_medium"]) and math.isnan(result["recall_thick"])
    assert result["n_medium"] == result["n_thick"] == 0.0

    empty = np.zeros_like(target)
    result = radius_recall(target, empty)  # no label: nothing to recall anywhere
    assert all(math.isnan(result[f"recall_{b}"]) for b in ("thin", "medium", "thick"))
    assert all(result[f"n_{b}"] == 0.0 for b in ("thin", "medium", "thick"))
    result = radius_recall(empty, target)  # nothing predicted: 0 where there is something to find
    assert result["recall_thin"] == 0.0 and math.isnan(result["recall_medium"])


def test_radius_recall_bins_are_half_open():
    bar = np.zeros((9, 9, 10), bool)
    bar[3:6, 3:6, :] = True  # a 3x3 bar: radius exactly 2 everywhere
    assert radius_recall(bar, bar, bounds_vox=(2.0, 3.0))["n_medium"] == bar.sum()  # low <= r
    assert radius_recall(bar, bar, bounds_vox=(1.0, 2.0))["n_thick"] == bar.sum()  # r >= high is thick
    assert radius_recall(bar, bar, bounds_vox=(2.5, 3.0))["n_thin"] == bar.sum()


def test_radius_recall_in_mm():
    target, sizes = tubes()
    # isotropic 0.5 mm: radii and bounds both halve, bins unchanged
    result = radius_recall(target, target, spacing=(0.5, 0.5, 0.5))
    assert (result["bound_low_mm"], result["bound_high_mm"]) == (0.75, 1.5)
    assert (result["bound_low_vox"], result["bound_high_vox"]) == (1.5, 3.0)
    assert all(result[f"n_{b}"] == sizes[b] for b in sizes)
    # anisotropic (0.5, 0.5, 2): the tubes' radii (in-plane) are sqrt(2)/2, sqrt(5)/2, 5/2 mm; the default
    # bounds scale by the geometric-mean edge 2 ** (-1/3) = 0.794 mm: 1.19 and 2.38 mm
    result = radius_recall(target, target, spacing=(0.5, 0.5, 2.0))
    edge = 2 ** (-1 / 3)
    assert result["bound_low_mm"] == pytest.approx(1.5 * edge) and result["bound_high_mm"] == pytest.approx(3 * edge)
    assert result["n_thin"] == sizes["thin"] + sizes["medium"]  # 1.118 mm < 1.19 mm
    assert result["n_medium"] == 0.0 and math.isnan(result["recall_medium"])
    assert result["n_thick"] == sizes["thick"]  # 2.5 mm >= 2.38 mm
    # explicit mm bounds
    result = radius_recall(target, target, spacing=(0.5, 0.5, 2.0), bounds_mm=(1.0, 2.0))
    assert [result[f"n_{b}"] for b in ("thin", "medium", "thick")] == [
        sizes["thin"], sizes["medium"], sizes["thick"]]


def test_radius_recall_validation():
    target, _ = tubes(("thin",))
    with pytest.raises(ValueError, match="bounds_vox"):
        radius_recall(target, target, bounds_vox=(3.0, 1.5))
    with pytest.raises(ValueError, match="spacing"):
        radius_recall(target, target, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        radius_recall(target, target, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="bounds_mm applies only with spacing"):
        radius_recall(target, target, bounds_mm=(1.0, 2.0))


def test_radius_recall_label_filling_the_array():
    full = np.ones((3, 3, 8), bool)  # no background voxel at all: the array's border becomes the wall
    embedded = np.zeros((7, 7, 12), bool)
    embedded[2:5, 2:5, 2:10] = True
    assert radius_recall(full, full) == radius_recall(embedded, embedded)
    assert sum(radius_recall(full, full)[f"n_{b}"] for b in ("thin", "medium", "thick")) == full.sum()


# ------------------------------------------------------------------------------------- surface distances


def offset_cubes(shift: int, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros((14, 14, 14), bool)
    a[2:6, 2:6, 2:6] = True
    return a, np.roll(a, shift, axis=axis)


def test_hd95_assd_of_offset_cubes():
    # 4^3 cubes shifted by 3 voxels: 56 surface voxels each, at distances 3 (16 voxels of the far face),
    # 2 (12 of the next ring), 1 (12) and 0 (16 on the shared plane) from the other cube's surface
    a, b = offset_cubes(3)
    assert surface_distances(a, b, (1.0, 1.0, 1.0)) == {"hd95_mm": 3.0, "assd_mm": 84 / 56}
    assert surface_distances(a, b, (0.5, 2.0, 2.0)) == {"hd95_mm": 1.5, "assd_mm": 0.5 * 84 / 56}
    assert surface_distances(b, a, (0.5, 2.0, 2.0)) == surface_distances(a, b, (0.5, 2.0, 2.0))
    a, b = offset_cubes(3, axis=1)
    assert surface_distances(a, b, (0.5, 2.0, 1.0))["hd95_mm"] == 6.0


def test_hd95_ignores_a_few_outliers_assd_does_not():
    a, _ = offset_cubes(0)
    pred = a.copy()
    pred[12, 3, 3] = True  # one stray voxel 7 voxels beyond the cube's face at row 5
    result = surface_distances(pred, a, (1.0, 1.0, 1.0))
    assert result["hd95_mm"] == 0.0  # 1 of 57 distances, beyond the 95th percentile
    assert result["assd_mm"] == pytest.approx(7 / (57 + 56))


def test_surface_distances_array_border_is_background():
    full = np.ones((4, 4, 4), bool)  # its surface is the outer layer
    inner = np.zeros((4, 4, 4), bool)
    inner[1:3, 1:3, 1:3] = True  # all 8 voxels are surface, each 1 from the outer layer
    # outer layer -> inner cube: 8 corners at sqrt(3), 24 edge voxels at sqrt(2), 24 face voxels at 1
    result = surface_distances(full, inner, (1.0, 1.0, 1.0))
    assert result["hd95_mm"] == pytest.approx(math.sqrt(3))
    assert result["assd_mm"] == pytest.approx((8 * math.sqrt(3) + 24 * math.sqrt(2) + 24 + 8) / 64)
    assert surface_distances(full, full, (1.0, 1.0, 1.0)) == {"hd95_mm": 0.0, "assd_mm": 0.0}


def test_surface_distances_empty_cases_and_missing_spacing():
    a, _ = offset_cubes(0)
    empty = np.zeros_like(a)
    assert surface_distances(empty, empty, (1, 1, 1)) == {"hd95_mm": 0.0, "assd_mm": 0.0}
    # one empty: the field of view's diagonal, sqrt((14 * 0.5)^2 + 14^2 + (14 * 2)^2) = 32.07 mm
    worst = math.sqrt(7.0**2 + 14.0**2 + 28.0**2)
    assert surface_distances(empty, a, (0.5, 1, 2)) == {"hd95_mm": worst, "assd_mm": worst}
    assert surface_distances(a, empty, (0.5, 1, 2)) == {"hd95_mm": worst, "assd_mm": worst}
    brats = np.zeros((240, 240, 155), bool)
    brats[0, 0, 0] = True
    assert surface_distances(brats, np.zeros_like(brats), (1, 1, 1))["hd95_mm"] == pytest.approx(373.13, abs=0.01)
    corner, opposite = np.zeros_like(a), np.zeros_like(a)
    corner[0, 0, 0] = opposite[13, 13, 13] = True  # the farthest two voxels of the array stay below it
    farthest = math.sqrt(6.5**2 + 13.0**2 + 26.0**2)
    assert surface_distances(corner, opposite, (0.5, 1, 2)) == {"hd95_mm": farthest, "assd_mm": farthest}
    assert farthest < worst
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, None)
    with pytest.raises(ValueError, match="spacing"):
        surface_distances(a, a, (1.0, 1.0))


def test_surface_distances_2d():
    a = np.zeros((10, 10), bool)
    a[2:5, 2:5] = True
    b = np.roll(a, 2, axis=1)
    # 8 surface pixels each: distances 2 (3 pixels of the far side), 1 (2), 0 (3)
    assert surface_distances(a, b, (1.0, 1.0)) == {"hd95_mm": 2.0, "assd_mm": 8 / 8}
