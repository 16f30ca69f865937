"""Metrics against hand-computed cases: straight tubes, a Y bifurcation, empty masks, 2D, components."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from stego_core.evaluation import metrics
from stego_core.evaluation.metrics import (
    METRIC_KEYS,
    cldice,
    dice,
    evaluate_segmentation,
    n_components,
    precision,
    recall,
    skeleton,
    summarize,
    topology_precision_sensitivity,
    write_results,
)

REAL_CASE = Path(os.environ.get("STEGO_REAL_CASE", Path(__file__).resolve().parents[2] / "shared/data/mra_mni_0656"))


def square_tube(*, dx: int = 0, z0: int = 4, z1: int = 28) -> np.ndarray:
    """32^3 volume with a 5x5-voxel square tube along axis 2, centred at (16 + dx, 16), k in [z0, z1)."""
    volume = np.zeros((32, 32, 32), dtype=bool)
    volume[14 + dx:19 + dx, 14:19, z0:z1] = True
    return volume


def capsule(shape, p0, p1, radius) -> np.ndarray:
    """Voxels within ``radius`` of the segment p0-p1."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    t = np.clip((grid - p0) @ d / (d @ d), 0.0, 1.0)
    return np.linalg.norm(grid - (p0 + t[..., None] * d), axis=-1) <= radius


# ------------------------------------------------------------------------------------------- straight tube


def test_identical_tube_scores_one():
    tube = square_tube()
    result = evaluate_segmentation(tube, tube)
    assert list(result) == list(METRIC_KEYS)
    assert result == {"dice": 1.0, "cldice": 1.0, "tprec": 1.0, "tsens": 1.0, "precision": 1.0, "recall": 1.0,
                      "n_components_pred": 1.0, "n_components_gt": 1.0}


def test_tube_skeleton_is_its_axis():
    # the hand computations below rest on this: Lee thinning of a 5x5 square tube is its central line
    skel = skeleton(square_tube())
    idx = np.argwhere(skel)
    assert set(map(tuple, idx[:, :2])) == {(16, 16)}
    assert np.array_equal(idx[:, 2], np.arange(idx[0, 2], idx[-1, 2] + 1))  # contiguous
    assert idx[0, 2] - 4 == 27 - idx[-1, 2]  # symmetric about the tube's middle


def test_half_tube():
    # P = lower half (k in [4, 16)), G = whole tube (k in [4, 28)): P inside G.
    # dice = 2 * 300 / (300 + 600) = 2/3; tprec = 1 (S(P) lies in P, inside G);
    # tsens = 1/2 (S(G) is symmetric about k = 15.5, half of it in P); cldice = 2 * 1 * 0.5 / 1.5 = 2/3.
    pred, target = square_tube(z1=16), square_tube()
    result = evaluate_segmentation(pred, target)
    assert result["dice"] == pytest.approx(2 / 3)
    assert result["tprec"] == 1.0
    assert result["tsens"] == pytest.approx(0.5)
    assert result["cldice"] == pytest.approx(2 / 3)
    assert result["precision"] == 1.0
    assert result["recall"] == pytest.approx(0.5)


def test_tube_shifted_by_one_voxel_keeps_centreline():
    # overlap 4x5 of 5x5 per slice: dice = 2 * 20 / 50 = 0.8; each axis lies inside the other tube: cldice 1.
    result = evaluate_segmentation(square_tube(dx=1), square_tube())
    assert result["dice"] == pytest.approx(0.8)
    assert result["precision"] == pytest.approx(0.8)
    assert (result["tprec"], result["tsens"], result["cldice"]) == (1.0, 1.0, 1.0)


def test_tube_shifted_by_three_voxels_loses_centreline():
    # overlap 2x5 of 5x5: dice = 0.4; each axis (x = 19 or 16) lies outside the other tube: cldice 0.
    pred, target = square_tube(dx=3), square_tube()
    assert dice(pred, target) == pytest.approx(0.4)
    assert topology_precision_sensitivity(pred, target) == (0.0, 0.0)
    assert cldice(pred, target) == 0.0


def test_y_bifurcation_missing_branch():
    shape = (40, 40, 40)
    trunk = capsule(shape, (20, 20, 4), (20, 20, 20), 2.5)
    left = capsule(shape, (20, 20, 20), (10, 20, 34), 2.0)
    right = capsule(shape, (20, 20, 20), (30, 20, 34), 2.0)
    target = trunk | left | right
    pred = trunk | left  # the right branch is missed
    tprec, tsens = topology_precision_sensitivity(pred, target)
    assert tprec == 1.0  # pred is inside target, so is its skeleton
    # S(G): trunk (~16 voxels) + two branches (~14 voxels each); pred covers trunk + one branch, about 2/3
    assert 0.55 < tsens < 0.8
    assert cldice(pred, target) == pytest.approx(2 * tsens / (1 + tsens))
    assert recall(pred, target) < 1.0 and precision(pred, target) == 1.0
    assert n_components(target) == 1 and n_components(pred) == 1


# ------------------------------------------------------------------------------------------------ empty


@pytest.mark.parametrize("func", [dice, cldice, precision, recall])
def test_both_empty_gives_empty_score(func):
    empty = np.zeros((8, 8, 8), bool)
    assert func(empty, empty) == 1.0
    assert func(empty, empty, empty_score=0.0) == 0.0


@pytest.mark.parametrize("func", [dice, cldice, precision, recall])
def test_one_empty_gives_zero(func):
    empty, tube = np.zeros((32, 32, 32), bool), square_tube()
    assert func(empty, tube) == 0.0
    assert func(tube, empty) == 0.0


def test_empty_evaluation():
    empty = np.zeros((6, 6, 6), bool)
    both = evaluate_segmentation(empty, empty, empty_score=0.5)
    assert {k: both[k] for k in ("dice", "cldice", "tprec", "tsens", "precision", "recall")} == dict.fromkeys(
        ("dice", "cldice", "tprec", "tsens", "precision", "recall"), 0.5)
    assert both["n_components_pred"] == 0.0 and both["n_components_gt"] == 0.0
    one = np.zeros((6, 6, 6), bool)
    one[2, 2, 2] = True
    missed = evaluate_segmentation(empty, one)
    assert missed["dice"] == missed["cldice"] == missed["tprec"] == missed["tsens"] == 0.0
    assert missed["n_components_gt"] == 1.0


def test_single_voxel_is_its_own_skeleton():
    voxel = np.zeros((5, 5, 5), bool)
    voxel[2, 2, 2] = True
    assert np.array_equal(skeleton(voxel), voxel)
    assert cldice(voxel, voxel) == 1.0


def test_empty_skeleton_falls_back_to_mask(monkeypatch):
    monkeypatch.setattr(metrics, "skeletonize", lambda image: np.zeros_like(image))
    tube = square_tube()
    assert np.array_equal(skeleton(tube), tube)
    assert cldice(tube, tube) == 1.0
    assert topology_precision_sensitivity(square_tube(z1=16), tube) == (1.0, pytest.approx(0.5))


def test_skeleton_of_crop_matches_full_volume():
    # bounding-box cropping must not change the skeleton (it sits away from the array border here)
    from skimage.morphology import skeletonize

    target = capsule((40, 40, 40), (8, 10, 6), (30, 28, 33), 3.0)
    assert np.array_equal(skeleton(target), skeletonize(target) > 0)


# ---------------------------------------------------------------------------------------------------- 2D


def test_2d_cases():
    a = np.zeros((10, 20), bool)
    a[4:7, 2:18] = True  # 3 x 16 bar
    b = np.zeros_like(a)
    b[4:7, 2:10] = True  # its left half
    assert dice(a, b) == pytest.approx(2 * 24 / (48 + 24))
    assert precision(b, a) == 1.0 and recall(b, a) == 0.5
    tprec, tsens = topology_precision_sensitivity(b, a)
    assert tprec == 1.0 and 0.3 < tsens < 0.7
    assert cldice(a, a) == 1.0
    assert n_components(a | np.eye(10, 20, k=0, dtype=bool)) == 1


def test_accepts_0_255_and_01_arrays():
    tube = square_tube()
    assert dice(tube.astype(np.uint8) * 255, tube.astype(np.float32)) == 1.0


# ---------------------------------------------------------------------------------------------- components


def test_component_connectivity_3d():
    corner = np.zeros((3, 3, 3), bool)
    corner[0, 0, 0] = corner[1, 1, 1] = True  # touch at a vertex only
    assert n_components(corner) == 1
    assert n_components(corner, connectivity=26) == 1
    assert n_components(corner, connectivity=18) == 2
    assert n_components(corner, connectivity=6) == 2
    edge = np.zeros((3, 3, 3), bool)
    edge[0, 0, 0] = edge[1, 1, 0] = True  # touch along an edge
    assert n_components(edge, connectivity=18) == 1
    assert n_components(edge, connectivity=6) == 2


def test_component_connectivity_2d_and_errors():
    diagonal = np.eye(4, dtype=bool)
    assert n_components(diagonal) == 1
    assert n_components(diagonal, connectivity=4) == 4
    assert n_components(np.zeros((4, 4))) == 0
    with pytest.raises(ValueError, match=r"connectivity=6 is not valid for 2D"):
        n_components(diagonal, connectivity=6)
    with pytest.raises(ValueError, match="connectivity=8 is not valid for 3D"):
        evaluate_segmentation(square_tube(), square_tube(), connectivity=8)


# ---------------------------------------------------------------------------------------------- validation


def test_shape_mismatch_names_both():
    with pytest.raises(ValueError, match=r"target has shape \(4, 4, 5\) but pred has shape \(4, 4, 4\)"):
        dice(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)))


def test_rejects_bad_input():
    with pytest.raises(ValueError, match=r"pred has values \{0, 2\}"):
        dice(np.array([[0, 2], [0, 0]]), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"target must be 2D or 3D"):
        cldice(np.zeros((5, 5)), np.zeros(5))
    with pytest.raises(ValueError, match="target contains 1 NaN"):
        dice(np.zeros((2, 2)), np.array([[0, np.nan], [0, 0]]))
    with pytest.raises(ValueError, match="empty_score"):
        dice(np.zeros((2, 2)), np.zeros((2, 2)), empty_score=2.0)


# ------------------------------------------------------------------------------------------ tables, files


def _row(case_id: str, value: float) -> dict:
    return {"case_id": case_id, **dict.fromkeys(METRIC_KEYS, value)}


def test_summarize():
    summary = summarize([_row("a", 0.2), _row("b", 0.4), _row("c", 0.9)])
    assert list(summary)[:2] == ["dice_mean", "dice_std"]
    assert len(summary) == 2 * len(METRIC_KEYS)
    assert summary["cldice_mean"] == pytest.approx(0.5)
    assert summary["cldice_std"] == pytest.approx(np.sqrt((0.09 + 0.01 + 0.16) / 3))
    assert summarize([_row("a", 0.7)])["dice_std"] == 0.0


def test_summarize_errors():
    with pytest.raises(ValueError, match="rows is empty"):
        summarize([])
    bad = _row("case_7", 0.5)
    del bad["tsens"]
    with pytest.raises(ValueError, match=r"rows\[1\] \(case_id 'case_7'\) lacks metric keys \['tsens'\]"):
        summarize([_row("a", 0.5), bad])


def test_write_results(tmp_path):
    rows = [_row("case_000", 0.5), _row("case_001", 1.0)]
    txt_path, csv_path = write_results(rows, tmp_path / "eval", method="otsu")
    assert txt_path.name == "evaluation_results.txt" and csv_path.name == "evaluation_results.csv"
    lines = txt_path.read_text().splitlines()
    assert lines[0] == "method: otsu"
    header = next(line for line in lines if line.startswith("case_id"))
    assert header.split() == ["case_id", *METRIC_KEYS]
    mean_line = next(line for line in lines if line.startswith("mean"))
    std_line = next(line for line in lines if line.startswith("std"))
    assert mean_line.split()[1:] == ["0.7500"] * len(METRIC_KEYS)
    assert std_line.split()[1:] == ["0.2500"] * len(METRIC_KEYS)
    assert len(header) == len(mean_line)  # aligned columns
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["case_id"] for r in table] == ["case_000", "case_001", "mean", "std"]
    assert {r["method"] for r in table} == {"otsu"}
    assert float(table[2]["dice"]) == 0.75 and float(table[3]["n_components_gt"]) == 0.25


def test_write_results_refuses_to_overwrite(tmp_path):
    (tmp_path / "evaluation_results.csv").write_text("earlier")
    with pytest.raises(FileExistsError, match="evaluation_results.csv"):
        write_results([_row("a", 0.5)], tmp_path, method="otsu")
    assert not (tmp_path / "evaluation_results.txt").exists()
    assert (tmp_path / "evaluation_results.csv").read_text() == "earlier"


def test_write_results_validates_before_writing(tmp_path):
    with pytest.raises(ValueError, match="lacks metric keys"):
        write_results([{"case_id": "a", "dice": 1.0}], tmp_path, method="otsu")
    with pytest.raises(ValueError, match="method must be a non-empty string"):
        write_results([_row("a", 0.5)], tmp_path, method="")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- real case


@pytest.mark.slow
@pytest.mark.skipif(not (REAL_CASE / "label.nii.gz").exists(), reason="real case not available")
def test_real_label_against_itself():
    import nibabel as nib

    label = np.asarray(nib.load(REAL_CASE / "label.nii.gz").dataobj) > 0
    result = evaluate_segmentation(label, label)
    assert result["dice"] == 1.0 and result["cldice"] == 1.0
    assert result["n_components_gt"] == 19.0  # the case holds 19 components at 26-connectivity


def test_write_results_extra_columns(tmp_path):
    rows = [{**_row("a", 0.5), "betti0_error": 2.0}, {**_row("b", 1.0), "betti0_error": 4.0}]
    _, csv_path = write_results(rows, tmp_path, method="otsu", extra_keys=["betti0_error"])
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[-1] == "betti0_error" and float(table[2]["betti0_error"]) == 3.0
    with pytest.raises(ValueError, match="lacks metric keys"):
        write_results(rows[:1], tmp_path / "again", method="otsu", extra_keys=["recall_thin"])
