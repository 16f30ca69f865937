"""Domains (issue 30): label-free case profiles, the out-of-domain guard, physical scales, the two-photon preset and
``preset: auto``. Synthetic stacks in CI; the real two-photon and MRA cases of ``../shared/data`` when present."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT

from stego_core.config import load_config
from stego_core.data.phantom import PhantomConfig, make_phantom, twophoton_stack, write_twophoton_case
from stego_core.data.profile import case_profile, guess_modality
from stego_core.evaluation.guard import DomainConfig, mask_warnings, profile_warnings
from stego_core.platform import tracking
from stego_core.steps.evaluation import BaselineConfig, choose_preset, run_baseline

CONFIGS = REPO_ROOT / "experiments" / "configs"
SHARED = REPO_ROOT.parent / "shared" / "data"
TWO_PHOTON = sorted(SHARED.glob("2pm_*")) if SHARED.is_dir() else []
MRA = sorted(SHARED.glob("mra_mni_*")) if SHARED.is_dir() else []


def _stack_case(root: Path, name: str = "stack_000", seed: int = 0) -> Path:
    spacing = (1.0, 1.0, 5.0)
    return write_twophoton_case(root / name, twophoton_stack(spacing_um=spacing, seed=seed), spacing)


def test_profiles_tell_a_twophoton_stack_from_an_mra_phantom():
    stack = twophoton_stack(seed=1)
    for unit, spacing in (("micron", (1.0, 1.0, 5.0)), ("unknown", (1.0, 1.0, 1.0))):  # the unit is not needed
        profile = case_profile(stack.image, spacing, unit)
        modality, votes = guess_modality(profile)
        assert modality == "2pm" and sum(votes.values()) >= 2, (unit, profile)
    profile = case_profile(stack.image, (1.0, 1.0, 5.0), "micron")
    assert profile["unit"] == "um" and profile["anisotropy"] == 5.0 and profile["shape_ratio"] < 0.1
    head = make_phantom(PhantomConfig(shape=(48, 48, 24)), seed=0)
    profile = case_profile(head.image, (1.0, 1.0, 1.0), "mm")
    assert guess_modality(profile)[0] == "mra" and profile["spacing_um"] == (1000.0, 1000.0, 1000.0)
    flat = case_profile(np.full((16, 16, 8), 7.0, np.float32), (1, 1, 1), "mm")  # a constant volume profiles too
    assert flat["skewness"] == 0.0 and flat["dynamic_range"] == 0.0


def test_the_guard_reasons():
    stack = case_profile(twophoton_stack(seed=2).image, (1.0, 1.0, 5.0), "micron")
    mra = DomainConfig(name="best_mra", modality="mra", spacing_mm=(0.1, 2.0), vessel_fraction=(0.001, 0.05))
    reasons = profile_warnings(stack, mra)
    assert reasons[0].startswith("the case looks like two-photon microscopy") and "best_mra" in reasons[0]
    assert "in-plane voxel size 0.001 mm lies outside the 0.1-2 mm" in reasons[1]
    assert profile_warnings(stack, DomainConfig(name="best_2pm", modality="2pm")) == []
    brain = np.ones((20, 20, 20), bool)
    few = np.zeros_like(brain)
    few[0, 0, 0] = True
    assert mask_warnings(few, brain, mra)[0].startswith("the mask is near-empty")
    assert mask_warnings(brain, brain, mra)[0].startswith("the mask marks 100% of the volume")
    assert mask_warnings(np.zeros_like(brain), brain, mra) == ["the mask is empty"]


def _run(cfg: BaselineConfig):
    result = run_baseline(cfg)
    run = tracking.client().get_run(result.run_id)
    with open(result.output_dir / "cases.csv", newline="") as f:
        table = {r["case_id"]: r for r in csv.DictReader(f)}
    return result, run, table


@pytest.mark.slow
def test_the_guard_fires_on_an_mra_preset_applied_to_a_twophoton_stack(tmp_path, mlflow_store, caplog):
    _stack_case(tmp_path / "stacks")
    cfg = load_config(BaselineConfig, CONFIGS / "best_mra_tree.yaml", {
        "data.source": "folder", "data.root": str(tmp_path / "stacks"), "split": "all", "progress": False,
        "output": str(tmp_path / "out"), "experiment": "domains"})
    result, run, table = _run(cfg)
    assert run.info.status == "FINISHED" and result.warned == ["stack_000"]
    assert run.data.tags["domain_warning"] == "true"
    reason = run.data.tags["domain_warning/stack_000"]
    assert "looks like two-photon microscopy" in reason and "best_mra_tree was chosen for MR angiography" in reason
    assert table["stack_000"]["domain_warning"] == reason and table["stack_000"]["modality"] == "2pm"
    assert run.data.metrics["domain_warnings"] == 1.0
    assert any("domain warning: case stack_000, preset best_mra_tree" in r.message for r in caplog.records)
    page = (result.output_dir / "viewer" / "stack_000.html").read_text()
    assert "looks like two-photon microscopy" in page and 'id="warn"' in page  # the viewer's mark
    # the two-photon preset on the same stack: in its domain, no warning, and it finds the tubes
    ok = load_config(BaselineConfig, CONFIGS / "best_2pm.yaml", {
        "data.source": "folder", "data.root": str(tmp_path / "stacks"), "split": "all", "progress": False,
        "viewer": False, "output": str(tmp_path / "out2"), "experiment": "domains"})
    result, run, table = _run(ok)
    assert result.warned == [] and "domain_warning" not in run.data.tags and table["stack_000"]["domain_warning"] == ""
    assert result.rows[0]["recall"] > 0.9  # every tube found (the recipe was chosen on real stacks, not these)


@pytest.mark.slow
def test_gmm_on_a_constant_volume_is_never_a_silent_result(tmp_path, mlflow_store, tiny_case):
    from stego_core.data.io import save_volume

    folder = tmp_path / "flat" / "flat_000"
    save_volume(folder / "image.nii.gz", np.full((24, 24, 12), 50.0, np.float32), np.eye(4))
    cfg = BaselineConfig(method="gmm", data=load_config(BaselineConfig, None, {
        "data.source": "folder", "data.root": str(tmp_path / "flat"), "data.skull_strip": "none"}).data,
        split="all", progress=False, viewer=False, output=str(tmp_path / "out"), experiment="domains")
    result, run, table = _run(cfg)
    assert result.warned == ["flat_000"]
    assert "the mask marks 100% of the volume as vessel" in run.data.tags["domain_warning/flat_000"]


def test_vesselness_at_physical_scales_finds_a_tube_along_each_axis():
    """An anisotropic grid (1 x 1 x 3 mm): three tubes of radius 3 mm, one along each axis; Frangi 3D at scales
    in mm finds each of them, at a response that does not depend on the tube's direction."""
    from stego_core.methods import build_method
    from stego_core.methods.classical import Frangi3DSegmenter

    spacing = np.array([1.0, 1.0, 3.0])
    shape = (64, 64, 24)
    coords = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing)), indexing="ij")
    centre = [n * s / 2 for n, s in zip(shape, spacing)]
    image = np.zeros(shape, np.float32)
    tubes, cores = {}, {}
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        offset = {0: (-14.0, -20.0), 1: (14.0, 0.0), 2: (0.0, 20.0)}[axis]
        d2 = sum((coords[a] - centre[a] - o) ** 2 for a, o in zip(others, offset))
        tubes[axis], cores[axis] = d2 <= 3.0 ** 2, d2 <= 1.5 ** 2
        image[tubes[axis]] = 1.0
    outside = ~np.logical_or.reduce(list(tubes.values()))

    def frangi(**scales):
        segmenter = Frangi3DSegmenter(**scales, rule="fixed", response_threshold=0.1, require_bright=False)
        return segmenter.predict_volume(image, np.ones(shape, bool), spacing=tuple(spacing)) > 0.5

    found = frangi(sigmas_mm=(1.5, 2.0, 3.0))
    for axis in range(3):
        assert found[cores[axis]].mean() > 0.95, f"tube along axis {axis}: {found[cores[axis]].mean():.2f}"
    false_mm = found[outside].mean()
    assert false_mm < 0.002
    # the same scales read as voxels on this grid (3 mm along z) mark far more of the background
    assert frangi(sigmas_vox=(1.5, 2.0, 3.0))[outside].mean() > 5 * false_mm
    # 2D filters take scales in mm on an isotropic slice plane, and refuse an anisotropic one
    method = build_method("frangi", {"sigmas_mm": [1.5, 3.0]})
    method.segmenter.set_spacing((1.0, 1.0, 3.0))
    assert method.segmenter.scales_vox == (1.5, 3.0)
    from stego_core.engine.reconstruction import EngineConfig

    across = build_method("frangi", {"sigmas_mm": [1.5, 3.0]}, EngineConfig(axis=0))
    across.segmenter.set_spacing((1.0, 1.0, 3.0))
    with pytest.raises(ValueError, match="isotropic plane"):
        across.segmenter.scales_vox
    method.segmenter.set_spacing(None)  # unknown unit: the scales are read in voxels
    assert method.segmenter.scales_vox == (1.0, 2.0, 3.0)


def test_preset_auto_reads_the_modality_from_the_profiles():
    stacks = {f"s{i}": case_profile(twophoton_stack(seed=i).image, (1, 1, 5), "micron") for i in range(2)}
    heads = {f"h{i}": case_profile(make_phantom(PhantomConfig(shape=(48, 48, 24)), seed=i).image, (1, 1, 1), "mm")
             for i in range(2)}
    assert choose_preset(stacks)[0] == "best_2pm.yaml"
    assert choose_preset(heads)[0] == "best_mra.yaml"
    assert choose_preset(heads, "tree")[0] == "best_mra_tree.yaml"
    with pytest.raises(ValueError, match="different modalities"):
        choose_preset({**stacks, **heads})


@pytest.mark.slow
def test_preset_auto_runs_the_chosen_preset_and_says_why(tmp_path, mlflow_store, monkeypatch):
    _stack_case(tmp_path / "stacks")
    cfg = load_config(BaselineConfig, CONFIGS / "baseline.yaml", {
        "preset": "auto", "data.source": "folder", "data.root": str(tmp_path / "stacks"), "split": "all",
        "progress": False, "viewer": False, "output": str(tmp_path / "out"), "experiment": "domains"})
    result, run, _ = _run(cfg)
    assert run.data.tags["preset_auto"] == "best_2pm" and "read as 2pm" in run.data.tags["preset_auto_reason"]
    assert run.data.tags["method"] == "twophoton" and run.data.params["data.skull_strip"] == "none"
    assert run.data.params["preset"] == ""  # the logged plan is the chosen preset's: it reruns as it ran


@pytest.mark.slow
@pytest.mark.skipif(not TWO_PHOTON or not MRA, reason="the shared real cases (../shared/data) are not here")
def test_the_rule_on_every_shared_case():
    """The profile rule reads every real two-photon stack as two-photon and every MRA volume as MRA."""
    from stego_core.data.io import load_case
    from stego_core.data.io import discover_cases

    for folder, expected in [*((f, "2pm") for f in TWO_PHOTON), *((f, "mra") for f in MRA)]:
        (case,) = discover_cases(folder)
        image = load_case(case).image
        profile = case_profile(image.data, tuple(image.header.get_zooms()[:3]), image.header.get_xyzt_units()[0])
        assert guess_modality(profile)[0] == expected, folder.name
