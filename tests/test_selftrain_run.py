"""The ``selftrain`` step end to end on a small phantom: one MLflow run with the student scored beside its
teacher, curves, stepped images and a logged model; a preset teacher is read once, when the config is loaded."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import REPO_ROOT, table_rows

from stego_core.config import load_config
from stego_core.platform import tracking
from stego_core.steps.selftrain import SelfTrainConfig

STUDENT = ["student.training.steps=12", "student.training.eval_every=6", "student.training.crop=32",
           "student.training.batch=4", "student.network.channels=[8,16]"]
TINY = ["data.phantom.n_volumes=2", "data.phantom.shape=[64,64,32]", "split=all", "progress=false", *STUDENT,
        "experiment=selftrain-tests"]


@pytest.mark.slow
def test_selftrain_run_scores_student_beside_teacher(tmp_path, mlflow_store, monkeypatch):
    from stego_core.steps.selftrain import run_selftrain

    cfg = load_config(SelfTrainConfig, REPO_ROOT / "experiments/configs/selftrain.yaml",
                      [f"data.root={tmp_path / 'ph'}", f"output={tmp_path / 'out'}", *TINY])
    result = run_selftrain(cfg)
    client = tracking.client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["method"] == "selftrain"
    assert run.data.tags["teacher"] == "best_mra"
    metrics = run.data.metrics
    for key in ("dice_mean", "cldice_mean", "teacher_dice_mean", "teacher_cldice_mean"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert "selftrain/loss" in metrics and "selftrain/agreement" in metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"plan.yaml", "evaluation_results.txt"} <= artifacts and run.data.tags["model_uri"].endswith("/model")
    preds = {a.path for a in client.list_artifacts(result.run_id, "predictions")}
    assert len([p for p in preds if p.endswith("_selftrain_pred.nii.gz")]) == 2
    assert len([p for p in preds if p.endswith("_teacher-best_mra_pred.nii.gz")]) == 2
    # the teacher read from best_mra.yaml at load time, resolved in the params and the plan
    assert run.data.params["resolved.teacher.settings.n_components"] == "4"
    assert run.data.params["teacher.method"] == "gmm" and run.data.params["teacher.preset"] == ""
    state = tracking.load_learned(result.run_id)
    assert state.method == "selftrain" and state.settings["teacher"]["settings"]["n_components"] == 4
    (student,) = state.state
    out = student(__import__("torch").zeros(1, cfg.student.in_channels, 32, 32))
    assert out.shape[-2:] == (32, 32) and np.isfinite(out.detach().numpy()).all()

    # reused through the one interface: `reconstruct model_uri=<selftrain run>` applies the logged students with
    # that run's settings, from another working directory, without reading a preset file
    from stego_core.steps.evaluation import ReconstructConfig, run_reconstruct

    monkeypatch.chdir(tmp_path)
    again = run_reconstruct(ReconstructConfig(data=cfg.data, split="all", progress=False, experiment=cfg.experiment,
                                              output=str(tmp_path / "again"), model_uri=result.run_id))
    reused = client.get_run(again.run_id)
    assert reused.data.tags["method"] == "selftrain" and reused.data.tags["training_run_id"] == result.run_id
    assert {r["case_id"] for r in again.rows} == {r["case_id"] for r in result.rows}
    assert all(0.0 <= r["dice"] <= 1.0 for r in again.rows)
    assert [r["teacher_dice"] for r in again.rows] == [r["teacher_dice"] for r in result.rows]


def test_teacher_preset_is_resolved_at_load_and_must_match_the_skull_strip(tmp_path):
    from stego_core.methods.selftrain.settings import TeacherConfig

    preset = str(REPO_ROOT / "experiments/configs/best_mra_tree.yaml")
    teacher = TeacherConfig(preset=preset)
    assert teacher.method == "frangi3d" and teacher.preset == "" and teacher.name == "best_mra_tree"
    assert teacher.skull_strip == "head" and teacher.settings["response_threshold"] == 0.2
    with pytest.raises(ValueError, match="data.skull_strip=head"):
        load_config(SelfTrainConfig, None, [f"teacher.preset={preset}", "data.skull_strip=auto"])
    with pytest.raises(ValueError, match="both given"):  # an override of a preset's method is refused, not ignored
        load_config(SelfTrainConfig, None, [f"teacher.preset={preset}", "teacher.method=gmm", "data.skull_strip=head"])
    with pytest.raises(ValueError, match="is a folder"):
        TeacherConfig(preset=str(REPO_ROOT / "experiments/configs"))
    with pytest.raises(ValueError, match="not a baseline preset"):
        TeacherConfig(preset=str(REPO_ROOT / "experiments/configs/train_cpu.yaml"))


def test_plan_of_a_selftrain_preset_is_what_runs(tmp_path):
    """``--print-config`` of the tree preset shows the teacher that runs (frangi3d, its steps), no STEGO section."""
    from stego_core.config import plan_yaml
    from stego_core.steps.pipeline import MainConfig

    cfg = load_config(MainConfig, REPO_ROOT / "experiments/configs/selftrain_mra_tree.yaml")
    plan = plan_yaml(cfg)
    assert "method: frangi3d" in plan and "preset: best_mra_tree" not in plan and "name: best_mra_tree" in plan
    assert "backbone:" not in plan and "n_clusters:" not in plan and "phantom:" not in plan  # no STEGO section
    (tmp_path / "plan.yaml").write_text(plan)
    assert load_config(MainConfig, tmp_path / "plan.yaml") == cfg  # the plan reruns as itself


def _tiny_student():
    from stego_core.config import from_dict
    from stego_core.methods.selftrain.settings import StudentSettings

    return from_dict(StudentSettings, {"training": {"steps": 6, "eval_every": 3, "crop": 32, "batch": 2},
                                       "network": {"channels": [8, 16]}})


def test_teacher_and_student_never_read_the_label(tmp_path):
    import dataclasses

    from stego_core.data.cases import DataConfig, ensure_cases, preprocess_case
    from stego_core.data.phantom import PhantomConfig
    from stego_core.methods import build_method

    data = DataConfig(root=str(tmp_path / "ph"), phantom=PhantomConfig(n_volumes=1, shape=(48, 48, 24)))
    case = preprocess_case(ensure_cases(data)[0], data)
    outputs = []
    for fill in (True, False):  # labels of all ones and all zeros
        labelled = dataclasses.replace(case, label=np.full(case.image.shape, fill))
        method = build_method("selftrain", {"teacher": {"method": "percentile"}, "student": _tiny_student()})
        prob, mask = method.teacher_output(labelled)
        result = method.predict(labelled)
        outputs.append((prob, mask, result.prob, result.extras["teacher"], result.extras["student"]))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


def test_inductive_student_is_fitted_on_other_volumes(tmp_path):
    from stego_core.data.cases import DataConfig, ensure_cases, preprocess_case
    from stego_core.data.phantom import PhantomConfig
    from stego_core.methods import build_method

    data = DataConfig(root=str(tmp_path / "ph"), phantom=PhantomConfig(n_volumes=2, shape=(48, 48, 24)))
    train, test = (preprocess_case(c, data) for c in ensure_cases(data))
    method = build_method("selftrain", {"teacher": {"method": "percentile"}, "student": _tiny_student(),
                                        "mode": "inductive"})
    assert method.needs_disjoint_fit
    with pytest.raises(ValueError, match="fit the students"):
        method.predict(test)
    method.fit([train])
    result = method.predict(test)
    assert result.prob.shape == test.image.shape and set(np.unique(result.prob)) <= {0.0, 1.0}


def test_an_empty_or_full_teacher_is_refused_per_case(tmp_path):
    """A constant volume: a teacher marks nothing (or everything); the student refuses that case by name."""
    from stego_core.data.cases import PreparedCase
    from stego_core.data.io import Case
    from stego_core.methods import build_method
    from stego_core.methods.registry import CaseRefused

    image = np.full((24, 24, 8), 0.5, np.float32)
    case = PreparedCase(case=Case("flat", tmp_path / "i.nii.gz", None, None), image=image,
                        brain_mask=np.ones(image.shape, bool), label=None, affine=np.eye(4), header=None)
    for teacher in ({"method": "percentile"}, {"method": "gmm"}):
        method = build_method("selftrain", {"teacher": teacher, "student": _tiny_student()})
        with pytest.raises(CaseRefused, match="case flat: the teacher"):
            method.predict(case)


def test_ablation_rows_take_selftrain_variants_by_alias(tmp_path):
    from stego_core.config import from_dict
    from stego_core.steps.ablation import AblationConfig, ablation_rows

    student = {"training": {"steps": 6, "eval_every": 3, "crop": 32, "batch": 2}, "network": {"channels": [8, 16]}}
    cfg = from_dict(AblationConfig, {
        "datasets": [{"root": str(tmp_path / "ph"), "phantom": {"n_volumes": 1, "shape": [48, 48, 24]}}],
        "progress": False, "variants": [{"name": "none"}],
        "methods": [{"name": "percentile", "alias": "teacher"},
                    {"name": "selftrain", "alias": "student",
                     "settings": {"teacher": {"method": "percentile"}, "student": student}}]})
    rows = ablation_rows(cfg)
    assert [r["method"] for r in rows] == ["teacher", "student"]
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)


STEGO_TINY = {"model": {"backbone": "classical", "weights": "random", "res": 16, "code_dim": 8, "n_clusters": 8,
                        "cluster_fit": "kmeans", "cluster_rule": "brightness"},
              "train": {"max_steps": 4, "val_every_n_steps": 4, "batch_size": 8, "progress": False,
                        "accelerator": "cpu"},
              "slicing": {"patch_size": 16, "stride": 8}, "val_stride": 8}


@pytest.mark.slow
def test_pipeline_selftrains_on_the_stego_it_trained(tmp_path, mlflow_store, monkeypatch):
    """A STEGO teacher with the settings of the pipeline's stego row: STEGO is trained once (the row's fit), and
    the student learns that very model's confident voxels."""
    import mlflow.models

    from stego_core.steps.pipeline import MainConfig, run_main

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kwargs: fallback)
    stego = {**STEGO_TINY, "train": {**STEGO_TINY["train"], "cache_dir": str(tmp_path / "cache")}}
    student = {"training": {"steps": 12, "eval_every": 6, "crop": 32, "batch": 4}, "network": {"channels": [8, 16]}}
    cfg = load_config(MainConfig, None, {
        "data.root": str(tmp_path / "phantoms"), "data.phantom.shape": [48, 48, 24], "data.phantom.n_volumes": 2,
        "slicing.patch_size": 16, "slicing.stride": 8, "prepare": False, "output": str(tmp_path / "outputs"),
        "experiment": "selftrain-tests",
        "methods": {"percentile": {}, "stego": {"settings": stego},
                    "selftrain": {"settings": {"teacher": {"method": "stego", "settings": stego},
                                               "student": student}}}})
    fits = []
    from stego_core.methods.stego import method as stego_method

    real = stego_method.train_stego
    monkeypatch.setattr(stego_method, "train_stego", lambda *a, **k: (fits.append(1), real(*a, **k))[1])
    text = run_main(cfg)
    rows = set(table_rows(text))
    assert rows == {"percentile", "stego", "teacher-stego", "selftrain"}
    assert len(fits) == 1  # one STEGO training for the row and the teacher
    client = tracking.client()
    experiment = client.get_experiment_by_name("selftrain-tests")
    (student_run,) = client.search_runs([experiment.experiment_id], "tags.method = 'selftrain'")
    for key in ("dice_mean", "teacher_dice_mean"):
        assert 0.0 <= student_run.data.metrics[key] <= 1.0
