"""Dense-CRF refinement: cleans a noisy probability map along image edges; wraps any segmenter."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydensecrf", reason="pydensecrf2 is an optional extra (pip install '.[crf]')")

from stego_core.engine.crf import CRFSettings, refine_slice  # noqa: E402
from stego_core.evaluation.metrics import dice  # noqa: E402


def _bar_slice(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = np.zeros((40, 40), dtype=bool)
    truth[:, 18:23] = True
    image = np.where(truth, 0.9, 0.3).astype(np.float32)
    noisy = np.clip(np.where(truth, 0.7, 0.3) + rng.normal(0, 0.25, truth.shape), 0, 1).astype(np.float32)
    return image, noisy, truth


def test_refine_slice_removes_speckle_and_follows_the_image():
    image, noisy, truth = _bar_slice()
    refined = refine_slice(image, noisy)
    assert refined.shape == noisy.shape and refined.dtype == np.float32
    assert 0.0 <= refined.min() and refined.max() <= 1.0
    before, after = dice(noisy > 0.5, truth), dice(refined > 0.5, truth)
    assert after > before + 0.1, (before, after)
    assert after > 0.9


def test_crf_step_refines_every_slice_along_the_axis():
    """The ``crf`` post-processing step (any method's probabilities) refines each slice like refine_slice."""
    from stego_core.engine.postprocess import crf_refine

    image, noisy, truth = _bar_slice(1)
    volume, prob = np.stack([image, image], axis=2), np.stack([noisy, noisy], axis=2)
    out = crf_refine(prob, volume, axis=2, settings=CRFSettings(n_iterations=5))
    assert out.shape == prob.shape
    np.testing.assert_allclose(out[..., 0], refine_slice(image, noisy, CRFSettings(n_iterations=5)))
    assert dice(out[..., 1] > 0.5, truth) > dice(noisy > 0.5, truth)


def test_bad_settings_name_the_parameter():
    with pytest.raises(ValueError, match="crf.n_iterations"):
        CRFSettings(n_iterations=0)


@pytest.mark.usefixtures("mlflow_store")
def test_baseline_run_with_crf_is_tagged(tmp_path):
    from stego_core.data.cases import DataConfig
    from stego_core.data.phantom import PhantomConfig
    from stego_core.engine.reconstruction import EngineConfig
    from stego_core.platform.tracking import client
    from stego_core.steps.evaluation import BaselineConfig, run_baseline

    data = DataConfig(root=str(tmp_path / "ph"), phantom=PhantomConfig(n_volumes=2, shape=(32, 32, 24)))
    cfg = BaselineConfig(data=data, engine=EngineConfig(patch_size=None, batch_size=8), method="kmeans", crf=True,
                         crf_settings=CRFSettings(n_iterations=3), output=str(tmp_path / "out"), progress=False)
    result = run_baseline(cfg)
    run = client().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["method"] == "kmeans+crf"
    assert run.data.params["crf"] == "True" and run.data.params["crf_settings.n_iterations"] == "3"
    assert "dice_mean" in run.data.metrics


def _faint_thin_vessels(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-pixel and one-pixel vessels of low contrast (0.1 over a noisy background) and a weak, STEGO-like vessel
    probability (0.58 on the vessels, 0.42 elsewhere)."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((48, 48), dtype=bool)
    truth[:, 23:25] = True
    truth[10, :] = True
    image = np.clip(np.where(truth, 0.4, 0.3) + rng.normal(0, 0.05, truth.shape), 0, 1).astype(np.float32)
    prob = np.clip(np.where(truth, 0.58, 0.42) + rng.normal(0, 0.03, truth.shape), 0, 1).astype(np.float32)
    return image, prob, truth


def test_thin_preset_keeps_faint_thin_vessels_that_the_seed_settings_erase():
    from stego_core.engine.crf import CRF_PRESETS, crf_preset

    image, prob, truth = _faint_thin_vessels()
    assert dice(prob > 0.5, truth) > 0.95
    assert crf_preset("seed") == CRFSettings()
    assert dice(refine_slice(image, prob, crf_preset("seed")) > 0.5, truth) < 0.1  # the seed's CRF erases them
    assert dice(refine_slice(image, prob, CRF_PRESETS["thin"]) > 0.5, truth) > 0.7
    with pytest.raises(ValueError, match="unknown CRF preset 'wide'"):
        crf_preset("wide")


def test_crf_step_takes_a_named_preset():
    """``{step: crf, preset: thin}``: that preset's settings instead of the run's ``crf_settings``, tagged
    ``+crf-thin``; a preset is a parameter of the crf step alone."""
    from stego_core.engine.crf import crf_preset
    from stego_core.engine.postprocess import (
        PostprocessStep,
        apply_postprocessing,
        crf_refine,
        steps_tag,
    )

    image, prob, _ = _faint_thin_vessels(1)
    volume, probs = np.stack([image, image], axis=2), np.stack([prob, prob], axis=2)
    step = PostprocessStep("crf", preset="thin")
    out = apply_postprocessing(probs, volume, [step], crf_settings=CRFSettings())
    np.testing.assert_allclose(out.prob, crf_refine(probs, volume, axis=2, settings=crf_preset("thin")))
    seed = apply_postprocessing(probs, volume, [PostprocessStep("crf")], crf_settings=CRFSettings())
    assert out.mask.sum() > 10 * max(int(seed.mask.sum()), 1)
    assert steps_tag([step, PostprocessStep("cc", min_size_vox=3)]) == "+crf-thin+cc"
    with pytest.raises(ValueError, match="postprocess.preset"):
        PostprocessStep("crf", preset="wide")
    with pytest.raises(ValueError, match="takes"):
        PostprocessStep("cc", min_size_vox=3, preset="thin")
