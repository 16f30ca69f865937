"""Figures: panel counts, PNG output, and the error overlay's colours."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.figure import Figure

from stego_core.report.visualize import (
    ERROR_COLOURS,
    comparison_bar_figure,
    error_overlay,
    mask_outline_figure,
    mip_figure,
    per_case_figure,
    radius_recall_figure,
    slice_panel_figure,
)


@pytest.fixture()
def volumes():
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 0.3, (20, 16, 12)).astype(np.float32)
    target = np.zeros(image.shape, bool)
    target[5:15, 8, 6] = True  # a vessel along i
    image[target] = 0.9
    pred = target.copy()
    pred[5:8, 8, 6] = False  # missed: false negatives at (5..7, 8)
    pred[2, 3, 9] = True  # one false positive, alone on its projection ray
    return image, target, pred


def _png_ok(fig: Figure, path) -> None:
    fig.savefig(path, dpi=40)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mip_figure_panels(volumes, tmp_path):
    image, target, pred = volumes
    fig = mip_figure(image, target, pred, title="case_000 / otsu")
    assert isinstance(fig, Figure)
    assert len(fig.axes) == 4
    assert [ax.get_title().split(" ")[0] for ax in fig.axes] == ["image", "ground", "prediction", "errors:"]
    assert fig.axes[1].get_title() == "ground truth (10 vox)"
    assert fig.get_size_inches()[0] * fig.dpi == 600  # MLflow's image card: drawn at its width, 2 x 2 panels
    _png_ok(fig, tmp_path / "mip.png")


def test_mip_figure_without_target(volumes, tmp_path):
    image, _, pred = volumes
    fig = mip_figure(image, None, pred, axis=0)
    assert len(fig.axes) == 2
    _png_ok(fig, tmp_path / "mip_no_gt.png")


def test_error_overlay_colours(volumes):
    image, target, pred = volumes
    rgb = error_overlay(image.max(axis=2), target, pred, axis=2)
    assert rgb.shape == (20, 16, 3)
    np.testing.assert_array_equal(rgb[2, 3], ERROR_COLOURS["fp"])  # the false positive is red
    np.testing.assert_array_equal(rgb[2, 3], (1.0, 0.0, 0.0))
    np.testing.assert_array_equal(rgb[6, 8], ERROR_COLOURS["fn"])  # missed voxels are cyan
    np.testing.assert_allclose(rgb[10, 8], ERROR_COLOURS["tp"], rtol=1e-6)  # found voxels gold
    tp = np.asarray(ERROR_COLOURS["tp"])
    assert tp.max() - tp.min() >= 0.8  # a saturated colour: it reads on a grey or white MIP (light grey did not)
    assert rgb[0, 0].max() <= 0.35  # background is the dimmed image


def test_mip_figure_draws_overlay_with_axes_convention(volumes):
    # panels show array axis 0 horizontally: the displayed data is the transposed projection
    image, target, pred = volumes
    fig = mip_figure(image, target, pred, axis=2)
    shown = np.asarray(fig.axes[3].images[0].get_array())
    assert shown.shape == (16, 20, 3)
    np.testing.assert_array_equal(shown[3, 2], (1.0, 0.0, 0.0))


def test_mip_figure_validates(volumes):
    image, target, pred = volumes
    with pytest.raises(ValueError, match=r"target has shape \(20, 16, 11\) but image has shape \(20, 16, 12\)"):
        mip_figure(image, target[..., :11], pred)
    with pytest.raises(ValueError, match="axis=3"):
        mip_figure(image, target, pred, axis=3)


def test_slice_panel_figure(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.uniform(size=(10, 1, 16, 16)).astype(np.float32)  # (N, 1, H, W) crops accepted
    labels = images[:, 0] > 0.8
    clusters = rng.integers(0, 5, size=(10, 16, 16))
    preds = images[:, 0]
    fig = slice_panel_figure(images, labels, clusters, preds, n=6)
    assert len(fig.axes) == 4 * 6
    _png_ok(fig, tmp_path / "panel.png")
    fig = slice_panel_figure(images[:3], None, None, preds[:3] > 0.5)
    assert len(fig.axes) == 2 * 3
    fig = slice_panel_figure(images, None, None, None, n=4)  # a data preview: images only
    assert len(fig.axes) == 4
    fig = slice_panel_figure(images, labels, clusters[:, ::4, ::4], preds[:, ::4, ::4], n=2)  # coarse maps
    assert len(fig.axes) == 4 * 2
    with pytest.raises(ValueError, match=r"labels holds 9 crops \(shape \(9, 16, 16\)\) but images holds 10"):
        slice_panel_figure(images, labels[:9], clusters, preds)


def test_comparison_bar_figure(tmp_path):
    table = {
        "otsu": {"dice": 0.4, "cldice": 0.5},
        "stego": {"dice_mean": 0.6, "dice_std": 0.1, "cldice_mean": 0.7, "cldice_std": 0.05},
    }
    fig = comparison_bar_figure(table)
    assert len(fig.axes) == 1 and fig.get_size_inches()[0] * fig.dpi == 600
    ax = fig.axes[0]
    widths = sorted(round(p.get_width(), 6) for p in ax.patches)
    assert widths == [0.4, 0.5, 0.6, 0.7]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["otsu", "stego"] and ax.get_xlim()[0] == 0
    _png_ok(fig, tmp_path / "bars.png")
    with pytest.raises(ValueError, match=r"table\['otsu'\] has no metric 'recall'"):
        comparison_bar_figure(table, keys=("recall",))
    fig = comparison_bar_figure({"otsu": {"dice": float("nan"), "cldice": 0.5}})  # not measured: no bar
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["n/a", "0.500"]
    _png_ok(fig, tmp_path / "bars_nan.png")


def test_mask_outline_figure(volumes, tmp_path):
    image, target, _ = volumes
    brain = np.zeros(image.shape, bool)
    brain[3:17, 2:14, 2:10] = True
    fig = mask_outline_figure(image, brain, target, title="case_000")
    assert len(fig.axes) == 4
    assert [ax.get_title() for ax in fig.axes] == ["MIP", "slice 4", "slice 6", "slice 7"]
    assert len(fig.axes[0].collections) == 1  # the outline contour
    _png_ok(fig, tmp_path / "mask.png")
    assert len(mask_outline_figure(image, brain, None, axis=0).axes) == 4


PER_CASE = {  # method -> case -> row, as the pipeline collects them
    "otsu": {"c1": {"dice": 0.5, "cldice": 0.6, "recall_thin": 0.1, "recall_medium": 0.5, "recall_thick": 0.9},
             "c2": {"dice": 0.7, "cldice": 0.8, "recall_medium": 0.7, "recall_thick": 1.0}},  # c2: no thin vessel
    "stego": {"c1": {"dice": 0.6, "cldice": 0.7, "recall_thin": 0.3, "recall_medium": 0.6, "recall_thick": 0.8},
              "c2": {"dice": 0.8, "cldice": 0.9, "recall_thin": 0.5, "recall_medium": 0.8, "recall_thick": 0.9}},
    "frangi": {"c1": {"dice": 0.4, "cldice": 0.5}},  # evaluated without the analysis keys
}


def test_per_case_figure_dots_per_case_no_lines_across_methods(tmp_path):
    fig = per_case_figure(PER_CASE)
    axes = fig.get_axes()
    assert [ax.get_xlabel() for ax in axes] == ["dice", "cldice"]
    assert fig.get_size_inches()[0] * fig.dpi == 600  # MLflow's card width (was 2160 x 380 px)
    for ax, key in zip(axes, ("dice", "cldice")):
        assert [t.get_text() for t in ax.get_yticklabels()] == list(PER_CASE)
        assert ax.get_xlim() == (0.0, 1.0)
        dots = {c.get_label(): c.get_offsets() for c in ax.collections}
        if ax is axes[0]:
            assert set(dots) == {"c1", "c2"}  # one colour per case
        by_case = list(dots.values())
        np.testing.assert_allclose(np.asarray(by_case[0])[:, 0], [PER_CASE[m]["c1"][key] for m in PER_CASE])
        # methods are categories: no line joins a case across them; the lines are the means' ticks
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 1]
        assert not lines
        ticks = [line.get_xdata()[0] for line in ax.get_lines() if line.get_marker() == "|"]
        np.testing.assert_allclose(ticks, [np.mean([r[key] for r in PER_CASE[m].values()]) for m in PER_CASE])
    _png_ok(fig, tmp_path / "cases.png")
    many = {"otsu": {f"c{i}": {"betti0_error": float(i)} for i in range(6)}}
    (ax,) = per_case_figure(many, keys=("betti0_error",)).get_axes()
    assert ax.get_xlim() == (0.0, 5.5) and any(len(line.get_xdata()) == 2 for line in ax.get_lines())  # a box
    with pytest.raises(ValueError, match="per_case is empty"):
        per_case_figure({})


def test_radius_recall_figure_one_line_per_method(tmp_path):
    fig = radius_recall_figure(PER_CASE)
    (ax,) = fig.get_axes()
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["otsu", "stego"]  # frangi has no radius keys: no line
    np.testing.assert_allclose(lines[0].get_xdata(), [0, 1, 2])
    np.testing.assert_allclose(lines[0].get_ydata(), [0.1, 0.6, 0.95])  # thin: only c1 has thin vessels
    np.testing.assert_allclose(lines[1].get_ydata(), [0.4, 0.7, 0.85])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["thin", "medium", "thick"]
    dots = sum(len(c.get_offsets()) for c in ax.collections)
    assert dots == 2 * 3 + 2 * 3  # every case of every method drawn (NaN offsets included, not shown)
    assert ax.get_ylabel() == "recall" and ax.get_legend() is not None
    _png_ok(fig, tmp_path / "radius.png")
    (ax2,) = radius_recall_figure({"frangi": PER_CASE["frangi"]}).get_axes()
    assert ax2.get_lines() == [] and ax2.get_legend() is None
    with pytest.raises(ValueError, match="bins is empty"):
        radius_recall_figure(PER_CASE, bins=())
    no_thick = {m: {c: {k: v for k, v in r.items() if k != "recall_thick"} for c, r in rows.items()}
                for m, rows in PER_CASE.items()}
    (ax3,) = radius_recall_figure(no_thick).get_axes()
    assert [t.get_text() for t in ax3.get_xticklabels()] == ["thin", "medium"]  # no empty "thick" bin
