"""Label-free post-processing steps, tri-planar fusion, 3D vesselness and the two MRA presets."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO_ROOT

from stego_core.engine.postprocess import (
    PostprocessStep,
    apply_postprocessing,
    component_sizes,
    fill_small_holes,
    keep_largest_trees,
    remove_small_components,
    smooth_probability,
    steps_tag,
)
from stego_core.engine.reconstruction import (
    EngineConfig,
    fuse_probabilities,
    predict_volume,
)
from stego_core.methods.classical import build_segmenter
from stego_core.methods.vesselness import frangi_response, hessian_eigenvalues


def _blobs() -> np.ndarray:
    """Three separate boxes of 1, 8 and 27 voxels (26-connected each) and a diagonal pair of 2 voxels."""
    mask = np.zeros((12, 12, 12), bool)
    mask[1, 1, 1] = True                # 1 voxel
    mask[4:6, 4:6, 4:6] = True          # 8 voxels
    mask[8:11, 8:11, 8:11] = True       # 27 voxels
    mask[1, 9, 9] = mask[2, 10, 10] = True  # 2 voxels touching by a corner only (26-connected)
    return mask


# ------------------------------------------------------------------------------------------- components


def test_component_sizes_use_26_connectivity():
    _, sizes = component_sizes(_blobs())
    assert sorted(sizes[1:].tolist()) == [1, 2, 8, 27]
    _, sizes6 = component_sizes(_blobs(), connectivity=6)
    assert sorted(sizes6[1:].tolist()) == [1, 1, 1, 8, 27]


@pytest.mark.parametrize("min_size, kept", [(1, 38), (2, 37), (3, 35), (8, 35), (9, 27), (28, 0)])
def test_cc_filter_in_voxels(min_size, kept):
    assert int(remove_small_components(_blobs(), min_size_vox=min_size).sum()) == kept


def test_cc_filter_in_mm3_with_anisotropic_spacing():
    spacing = (0.5, 0.5, 2.0)  # 0.5 mm^3 per voxel
    mask = _blobs()
    # 4 mm^3 = 8 voxels: the 8- and 27-voxel boxes stay
    assert int(remove_small_components(mask, min_size_mm3=4.0, spacing=spacing).sum()) == 35
    # 4.5 mm^3 = 9 voxels: only the 27-voxel box
    assert int(remove_small_components(mask, min_size_mm3=4.5, spacing=spacing).sum()) == 27
    # same sizes on a different grid: 2 mm^3 voxels -> 4 mm^3 = 2 voxels
    assert int(remove_small_components(mask, min_size_mm3=4.0, spacing=(1.0, 1.0, 2.0)).sum()) == 37
    with pytest.raises(ValueError, match="spacing"):
        remove_small_components(mask, min_size_mm3=4.0)
    with pytest.raises(ValueError, match="exactly one"):
        remove_small_components(mask, min_size_vox=2, min_size_mm3=4.0, spacing=spacing)


def test_keep_largest_trees_by_fraction():
    mask = _blobs()
    assert int(keep_largest_trees(mask, min_fraction=1.0).sum()) == 27
    assert int(keep_largest_trees(mask, min_fraction=0.25).sum()) == 35   # 8 >= 0.25 * 27
    assert int(keep_largest_trees(np.zeros((4, 4, 4), bool), min_fraction=0.5).sum()) == 0


def test_fill_small_holes_only_fills_enclosed_small_cavities():
    mask = np.zeros((12, 12, 12), bool)
    mask[1:6, 1:6, 1:6] = True
    mask[3, 3, 3] = False               # a 1-voxel cavity
    mask[6:11, 6:11, 6:11] = True
    mask[7:10, 7:10, 7:10] = False      # a 27-voxel cavity
    out = fill_small_holes(mask, max_size_vox=8)
    assert out[3, 3, 3] and not out[8, 8, 8]
    assert fill_small_holes(mask, max_size_mm3=27 * 0.125, spacing=(0.5, 0.5, 0.5))[8, 8, 8]


def test_apply_postprocessing_orders_steps_and_counts_components():
    prob = _blobs().astype(np.float32) * 0.9
    steps = [PostprocessStep("cc", min_size_vox=8)]
    result = apply_postprocessing(prob, None, steps)
    assert result.n_components_before == 4 and result.n_components_after == 2
    assert steps_tag(steps) == "+cc" and steps_tag([]) == ""
    with pytest.raises(ValueError, match="after a mask step"):
        apply_postprocessing(prob, None, [{"step": "cc", "min_size_vox": 2}, {"step": "smooth", "sigma_vox": 1}])
    with pytest.raises(ValueError, match="needs a probability"):
        apply_postprocessing(_blobs(), None, [{"step": "smooth", "sigma_vox": 1}])
    smooth = smooth_probability(prob, sigma_mm=1.0, spacing=(0.5, 0.5, 2.0))
    assert smooth.dtype == np.float32 and 0 <= smooth.min() and smooth.max() <= 1


def test_step_config_validates_parameters():
    with pytest.raises(ValueError, match="exactly one"):
        PostprocessStep("cc")
    with pytest.raises(ValueError, match="takes"):
        PostprocessStep("largest", sigma_vox=1.0)
    with pytest.raises(ValueError, match="postprocess.step"):
        PostprocessStep("erode")


# ---------------------------------------------------------------------------------------------- fusion


def _tube_volume(shape=(32, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    grid = np.indices(shape).astype(np.float32)
    dist = np.hypot(grid[0] - 15.5, grid[1] - 12.0)           # a tube along axis 2
    dist2 = np.hypot(grid[1] - 22.0, grid[2] - 16.0)          # and one along axis 0
    cover = np.clip(2.5 - np.minimum(dist, dist2), 0, 1)
    rng = np.random.default_rng(0)
    image = np.clip(0.3 + 0.6 * cover + rng.normal(0, 0.03, shape), 0, 1).astype(np.float32)
    return image, np.ones(shape, bool)


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_triplanar_fusion_matches_single_axes_where_they_agree(fusion):
    image, brain = _tube_volume()
    engine = EngineConfig(patch_size=None, batch_size=8, blend="constant")
    per_axis = [predict_volume(build_segmenter("frangi", slice_axis=a), image, brain,
                               EngineConfig(axis=a, patch_size=None, batch_size=8, blend="constant"),
                               progress=False) for a in range(3)]
    fused = predict_volume(build_segmenter("frangi"), image, brain,
                           EngineConfig(patch_size=None, batch_size=8, blend="constant", axes=(0, 1, 2),
                                        fusion=fusion), progress=False)
    assert np.allclose(fused, fuse_probabilities(per_axis, fusion), atol=1e-6)
    votes = np.stack([p > 0.5 for p in per_axis])
    agree = votes.all(0) | (~votes).all(0)
    assert np.array_equal((fused > 0.5)[agree], votes[0][agree])
    # a voxel-wise method gives the same probabilities along every axis: fusion changes nothing
    single = predict_volume(build_segmenter("gmm"), image, brain, engine, progress=False)
    tri = predict_volume(build_segmenter("gmm"), image, brain,
                         EngineConfig(patch_size=None, batch_size=8, blend="constant", axes=(0, 1, 2),
                                      fusion=fusion), progress=False)
    assert np.allclose(single, tri, atol=1e-6)


def test_engine_axes_validation():
    with pytest.raises(ValueError, match="engine.fusion"):
        EngineConfig(axes=(0, 1), fusion="median")
    with pytest.raises(ValueError, match="distinct"):
        EngineConfig(axes=(1, 1))


# ------------------------------------------------------------------------------------------ 3D vesselness


def test_frangi3d_responds_to_a_tube_not_to_a_plate():
    shape = (32, 32, 32)
    grid = np.indices(shape).astype(np.float32)
    tube = np.exp(-((grid[0] - 16) ** 2 + (grid[1] - 16) ** 2) / (2 * 2.0**2))   # along axis 2
    plate = np.exp(-((grid[0] - 16) ** 2) / (2 * 2.0**2))                        # the plane x = 16
    responses = {}
    for name, img in (("tube", tube), ("plate", plate)):
        ev = hessian_eigenvalues(img, 2.0)
        gamma = float(np.sqrt((ev**2).sum(0)).max()) / 2
        responses[name] = frangi_response(ev, gamma=gamma)[16, 16, 16]
    assert responses["tube"] > 0.5
    assert responses["plate"] < 0.05


def test_frangi3d_segmenter_with_mm_scales_on_anisotropic_grid():
    shape = (40, 40, 20)
    spacing = (0.5, 0.5, 1.0)
    grid = np.indices(shape).astype(np.float32) * np.asarray(spacing)[:, None, None, None]
    dist = np.hypot(grid[0] - 10.0, grid[2] - 10.0)  # a 1.5 mm tube along axis 1
    image = np.clip(0.3 + 0.6 * np.clip(1.5 - dist, 0, 1), 0, 1).astype(np.float32)
    brain = np.ones(shape, bool)
    seg = build_segmenter("frangi3d", sigmas_mm=(1.0, 1.5), bright_percentile=90.0)
    prob = predict_volume(seg, image, brain, EngineConfig(), spacing=spacing, progress=False)
    assert seg.scales(spacing) == ((1.0, 1.5), spacing)
    assert prob[20, 20, 10] > 0.5 and prob[5, 20, 3] < 0.5


# --------------------------------------------------------------------------------------- presets and labels


@pytest.mark.parametrize("preset, tag", [("best_mra.yaml", "gmm+smooth+largest"),
                                         ("best_mra_tree.yaml", "frangi3d+cc")])
def test_preset_runs_end_to_end_on_a_tiny_phantom(tmp_path, mlflow_store, preset, tag):
    from stego_core.config import load_config
    from stego_core.platform.tracking import client
    from stego_core.steps.evaluation import BaselineConfig, run_baseline

    cfg = load_config(BaselineConfig, REPO_ROOT / "experiments" / "configs" / preset,
                      [f"data.root={tmp_path / 'ph'}", "data.phantom.n_volumes=1", "data.phantom.shape=[40,40,32]",
                       "split=all", f"output={tmp_path / 'out'}", "progress=false"])
    result = run_baseline(cfg)
    run = client().get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == tag
    assert run.data.params["postprocess.0.step"] in ("smooth", "cc")
    assert 0.0 < result.rows[0]["dice"] <= 1.0
    assert result.rows[0]["n_components_after_postprocess"] <= result.rows[0]["n_components_before_postprocess"]


def test_no_step_reads_the_label(tmp_path):
    """Swapping the labels of two cases leaves every prediction identical (labels only score)."""
    import shutil

    from stego_core.data.cases import DataConfig, ensure_cases
    from stego_core.data.io import make_case
    from stego_core.data.phantom import PhantomConfig
    from stego_core.engine.reconstruction import EngineConfig as Engine
    from stego_core.methods.registry import build_method
    from stego_core.steps.evaluation import BaselineConfig, evaluate_cases

    data = DataConfig(root=str(tmp_path / "ph"), phantom=PhantomConfig(n_volumes=2, shape=(32, 32, 24)))
    cases = ensure_cases(data)
    swapped = []
    for case, other in zip(cases, cases[::-1]):
        dst = tmp_path / "swapped" / case.case_id
        dst.mkdir(parents=True)
        shutil.copy(case.image, dst / "image.nii.gz")
        shutil.copy(other.label, dst / "label.nii.gz")
        swapped.append(make_case(dst, case.case_id))
    steps = tuple(PostprocessStep(**s) for s in (
        {"step": "smooth", "sigma_vox": 0.5}, {"step": "largest", "min_fraction": 0.05},
        {"step": "fill_holes", "max_size_vox": 8}, {"step": "cc", "min_size_vox": 3}))
    for method in ("gmm", "frangi3d"):
        cfg = BaselineConfig(data=data, engine=Engine(patch_size=None, batch_size=8, blend="constant"),
                             method=method, split="all", progress=False, postprocess=steps)
        rows = {}
        for name, group in (("orig", cases), ("swap", swapped)):
            out = tmp_path / f"{method}_{name}"
            rows[name] = evaluate_cases(build_method(method, None, cfg.engine), group, cfg, out,
                                         log_to_mlflow=False)
        for case in cases:
            from stego_core.data.io import load_volume
            a = load_volume(tmp_path / f"{method}_orig" / "predictions" / f"{case.case_id}_{method}_pred.nii.gz").data
            b = load_volume(tmp_path / f"{method}_swap" / "predictions" / f"{case.case_id}_{method}_pred.nii.gz").data
            assert np.array_equal(a, b)
        assert [r["dice"] for r in rows["orig"]] != [r["dice"] for r in rows["swap"]]  # the labels did differ
