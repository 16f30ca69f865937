"""Tests for stego_core.steps.evaluation: classical baselines reconstructed, scored and tracked in MLflow."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from stego_core.data.cases import DataConfig, ensure_cases, split_cases
from stego_core.data.io import load_volume
from stego_core.data.phantom import PhantomConfig
from stego_core.engine.reconstruction import EngineConfig
from stego_core.evaluation.metrics import METRIC_KEYS
from stego_core.platform import tracking
from stego_core.steps.evaluation import (
    BaselineConfig,
    EvaluateConfig,
    ReconstructConfig,
    run_baseline,
    run_reconstruct,
    select_cases,
)

pytestmark = pytest.mark.usefixtures("mlflow_store")

EXPERIMENT = "eval-tests"
SPACING = (1.0, 1.0, 1.5)
WHOLE_SLICES = EngineConfig(axis=2, patch_size=None, batch_size=8, blend="constant")


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> DataConfig:
    """Three 32x32x24 phantoms with anisotropic voxels (1 x 1 x 1.5 mm), generated once for the module."""
    root = tmp_path_factory.mktemp("eval_data") / "phantoms"
    data = DataConfig(source="phantom", root=str(root), skull_strip="given",
                      phantom=PhantomConfig(n_volumes=3, shape=(32, 32, 24), spacing_mm=SPACING, seed=0))
    ensure_cases(data)
    return data


@pytest.fixture(scope="module")
def baseline_runs(tmp_path_factory, _mlflow_template_db, phantom_data):
    """An otsu run on every case and a frangi run on the held-out case, in a module-wide MLflow store."""
    folder = tmp_path_factory.mktemp("eval_store")
    shutil.copyfile(_mlflow_template_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    out = folder / "outputs"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        common = dict(data=phantom_data, engine=WHOLE_SLICES, output=str(out), experiment=EXPERIMENT,
                      progress=False)
        otsu = run_baseline(BaselineConfig(method="otsu", split="all", **common))
        frangi = run_baseline(BaselineConfig(method="frangi", split="test", settings={"sigmas_vox": [1.0, 2.0]},
                                             **common))
    return {"otsu": otsu, "frangi": frangi, "client": MlflowClient(tracking_uri=uri), "output": out}


@pytest.mark.parametrize("method", ["otsu", "frangi"])
def test_baseline_run_is_tracked(baseline_runs, phantom_data, method):
    result, client = baseline_runs[method], baseline_runs["client"]
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    tags = run.data.tags
    assert tags["method"] == method and tags["kind"] == "baseline" and tags["step"] == "evaluate"
    assert "git_commit" in tags
    params = run.data.params
    assert params["data.root"] == phantom_data.root
    assert "engine.axis" not in params  # at its default: in plan.yaml, not a parameter
    assert params["method"] == method
    # what a researcher filters on (method, data, split, seeds, what differs from the defaults), not the whole
    # flattened plan (~60 keys for a baseline): that is plan.yaml
    assert len(params) <= 30, sorted(params)
    if method == "otsu":
        assert params["resolved.nbins"] == "256" and params["split"] == "all"
    else:
        assert params["resolved.sigmas_vox"] == "[1.0, 2.0]"
        assert params["resolved.slice_axis"] == "2"  # filled in from engine.axis
        assert params["settings.sigmas_vox"] == "[1.0, 2.0]"

    cases = ensure_cases(phantom_data)
    expected_ids = ([c.case_id for c in cases] if method == "otsu"
                    else [c.case_id for c in split_cases(cases, 0.34, seed=0)[1]])
    assert [r["case_id"] for r in result.rows] == expected_ids
    metrics = run.data.metrics
    for key in ("dice", "cldice", "precision", "recall"):
        assert f"{key}_mean" in metrics and f"{key}_std" in metrics
        per_volume = [metrics[f"{key}/{cid}"] for cid in expected_ids]
        assert metrics[f"{key}_mean"] == pytest.approx(np.mean(per_volume))
        assert metrics[f"{key}_std"] == pytest.approx(np.std(per_volume))
    assert {k: v for k, v in metrics.items() if k.endswith(("_mean", "_std"))} == pytest.approx(result.summary)
    assert {f"{k}_mean" for k in METRIC_KEYS} <= set(metrics)
    assert 0.0 < metrics["dice_mean"] <= 1.0  # bright phantom vessels: neither method misses them all

    artifacts = _artifacts(client, result.run_id)
    for cid in expected_ids:
        assert f"predictions/{cid}_{method}_pred.nii.gz" in artifacts
        assert f"figures/{cid}_mip.png" in artifacts
        assert f"viewer/{cid}.html" in artifacts  # the self-contained slice viewer (tests/test_viewer.py)
    assert {"evaluation_results.txt", "evaluation_results.csv", "plan.yaml"} <= artifacts
    assert not any(a.startswith("predictions/") and a.endswith("_prob.nii.gz") for a in artifacts)

    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.name == "phantoms"
    input_tags = {t.key: t.value for t in inputs[0].tags}
    assert input_tags["mlflow.data.context"] == "evaluation"
    assert input_tags["case_ids"] == ",".join(expected_ids)


def test_predictions_keep_geometry_and_scores_match(baseline_runs, phantom_data, tmp_path):
    result, client = baseline_runs["otsu"], baseline_runs["client"]
    metrics = client.get_run(result.run_id).data.metrics
    for case in ensure_cases(phantom_data):
        local = client.download_artifacts(result.run_id, f"predictions/{case.case_id}_otsu_pred.nii.gz", str(tmp_path))
        pred_img = nib.load(local)
        source = load_volume(case.image)
        np.testing.assert_allclose(pred_img.affine, source.affine)
        np.testing.assert_allclose(pred_img.affine, np.diag([*SPACING, 1.0]))
        assert pred_img.header.get_zooms()[:3] == pytest.approx(SPACING)
        pred = np.asarray(pred_img.dataobj)
        assert pred.shape == source.data.shape and set(np.unique(pred).tolist()) <= {0, 1}
        label = load_volume(case.label).data > 0
        mask = load_volume(case.mask).data > 0
        assert not pred[~mask].any()  # nothing outside the brain mask
        p = pred > 0
        dice = 2 * (p & label).sum() / (p.sum() + label.sum())
        assert metrics[f"dice/{case.case_id}"] == pytest.approx(dice)
        assert metrics[f"recall/{case.case_id}"] == pytest.approx((p & label).sum() / label.sum())


def test_results_files(baseline_runs, phantom_data):
    result = baseline_runs["otsu"]
    txt = (result.output_dir / "evaluation_results.txt").read_text()
    ids = [c.case_id for c in ensure_cases(phantom_data)]
    for cid in ids + ["mean", "std"]:
        assert cid in txt
    with open(result.output_dir / "evaluation_results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_case = {r["case_id"]: r for r in rows}
    assert set(ids) <= set(by_case)
    assert all(r["method"] == "otsu" for r in rows)
    for r in result.rows:
        assert float(by_case[r["case_id"]]["dice"]) == pytest.approx(r["dice"])


def test_runs_do_not_overwrite_each_other(baseline_runs):
    otsu, frangi = baseline_runs["otsu"], baseline_runs["frangi"]
    assert otsu.run_id != frangi.run_id
    assert otsu.output_dir != frangi.output_dir
    assert otsu.output_dir == baseline_runs["output"] / otsu.run_id
    assert frangi.output_dir == baseline_runs["output"] / frangi.run_id
    for result, n_cases in ((otsu, 3), (frangi, 1)):
        assert len(list((result.output_dir / "predictions").glob("*_pred.nii.gz"))) == n_cases
        assert (result.output_dir / "evaluation_results.txt").is_file()


def test_select_cases_matches_the_training_split(phantom_data):
    cases = ensure_cases(phantom_data)
    assert select_cases(EvaluateConfig(data=phantom_data, split="all")) == cases
    assert select_cases(EvaluateConfig(data=phantom_data)) == split_cases(cases, 0.34, seed=0)[1]
    assert select_cases(EvaluateConfig(data=phantom_data, split_seed=5)) == split_cases(cases, 0.34, seed=5)[1]


def test_failing_run_ends_failed_with_error(phantom_data, monkeypatch, tmp_path):
    from stego_core.methods.classical import OtsuSegmenter

    def broken(self, slices):
        raise RuntimeError("segmenter exploded on purpose")

    monkeypatch.setattr(OtsuSegmenter, "predict_slices", broken)
    with pytest.raises(RuntimeError, match="exploded"):
        run_baseline(BaselineConfig(data=phantom_data, engine=WHOLE_SLICES, method="otsu", experiment=EXPERIMENT,
                                    output=str(tmp_path / "out"), progress=False))
    client = tracking.client()
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"
    assert "exploded" in run.data.tags["error"]
    assert "error.txt" in _artifacts(client, run.info.run_id)
    error = Path(client.download_artifacts(run.info.run_id, "error.txt", str(tmp_path))).read_text()
    assert "RuntimeError: segmenter exploded on purpose" in error
    assert "dice_mean" not in run.data.metrics


def test_unknown_method_lists_valid_methods(phantom_data):
    with pytest.raises(ValueError, match="otsh") as info:
        run_baseline(BaselineConfig(data=phantom_data, method="otsh", experiment=EXPERIMENT))
    for name in ("percentile", "otsu", "multiotsu", "kmeans", "gmm", "frangi", "sato"):
        assert name in str(info.value)
    assert tracking.client().get_experiment_by_name(EXPERIMENT) is None  # failed before any run started


def test_slice_axis_must_match_engine_axis(phantom_data):
    with pytest.raises(ValueError, match="slice_axis"):
        run_baseline(BaselineConfig(data=phantom_data, method="frangi", settings={"slice_axis": 0},
                                    engine=EngineConfig(axis=2, patch_size=None), experiment=EXPERIMENT))
    with pytest.raises(ValueError, match="nbins"):
        run_baseline(BaselineConfig(data=phantom_data, method="otsu", settings={"nbins": 1}, experiment=EXPERIMENT))


def test_unlabelled_cases_give_rows_but_no_scores(tmp_path, tiny_case):
    root = tmp_path / "cases"
    tiny_case("u1", root=root, label=False, brain_mask=True)
    tiny_case("u2", root=root, label=False, brain_mask=True, seed=1)
    data = DataConfig(source="folder", root=str(root), skull_strip="given")
    result = run_baseline(BaselineConfig(data=data, method="percentile", split="all", engine=WHOLE_SLICES,
                                         experiment=EXPERIMENT, output=str(tmp_path / "out"), progress=False,
                                         save_probabilities=True))
    assert [r["case_id"] for r in result.rows] == ["u1", "u2"]
    assert all(set(r) - {"profile", "domain_warning"} == {"case_id", "predicted_fraction"} for r in result.rows)
    assert result.summary == {}
    run = tracking.client().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "dice_mean" not in run.data.metrics and "predicted_fraction/u1" in run.data.metrics
    artifacts = _artifacts(tracking.client(), result.run_id)
    assert "evaluation_results.txt" not in artifacts
    assert {"predictions/u1_percentile_pred.nii.gz", "predictions/u1_percentile_prob.nii.gz"} <= artifacts
    viewer = Path(tracking.client().download_artifacts(result.run_id, "viewer/u1.html", str(tmp_path)))
    assert '"labelled":false' in viewer.read_text(encoding="utf-8")  # predictions drawn without a label
    quiet = run_baseline(BaselineConfig(data=data, method="percentile", split="all", engine=WHOLE_SLICES,
                                        experiment=EXPERIMENT, output=str(tmp_path / "out"), progress=False,
                                        viewer=False))
    assert not any(a.startswith("viewer/") for a in _artifacts(tracking.client(), quiet.run_id))


def test_config_validation():
    with pytest.raises(ValueError, match="split"):
        EvaluateConfig(split="train")
    with pytest.raises(ValueError, match="model_uri is required"):  # checked before any work starts
        run_reconstruct(ReconstructConfig())
    with pytest.raises(ValueError, match="device"):
        ReconstructConfig(model_uri="runs:/abc/model", device="tpu")
    with pytest.raises(ValueError, match="no model there"):
        tracking.load_learned("runs:/0123456789abcdef0123456789abcdef/model")
