"""The ``selftrain`` step end to end on a small phantom: one MLflow run with the student scored beside its
teacher, curves, stepped images, checkpoints and a logged model; a preset teacher is read from its file."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO_ROOT
from stego_core.platform import tracking
from stego_core.config import SelfTrainConfig, load_config

TINY = ["data.phantom.n_volumes=2", "data.phantom.shape=[64,64,32]", "split=all", "progress=false",
        "student.steps=12", "student.eval_every=6", "student.crop=32", "student.batch=4",
        "student.channels=[8,16]", "experiment=selftrain-tests"]


@pytest.mark.slow
def test_selftrain_run_scores_student_beside_teacher(tmp_path, mlflow_store, monkeypatch):
    from stego_core.steps.selftrain import run_selftrain

    monkeypatch.chdir(REPO_ROOT)  # the teacher preset path is relative to the project
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
    assert {"plan.yaml", "checkpoints", "evaluation_results.txt"} <= artifacts
    preds = {a.path for a in client.list_artifacts(result.run_id, "predictions")}
    assert len([p for p in preds if p.endswith("_selftrain_pred.nii.gz")]) == 2
    assert len([p for p in preds if p.endswith("_teacher-best_mra_pred.nii.gz")]) == 2
    ckpts = {a.path for a in client.list_artifacts(result.run_id, "checkpoints")}
    assert len(ckpts) == 2  # one student per volume (transductive)
    # the teacher read from best_mra.yaml, resolved in the params
    assert run.data.params["teacher.resolved.n_components"] == "4"
    model = tracking.load_pytorch_model(run.data.tags["model_uri"])
    out = model(__import__("torch").zeros(1, cfg.student.in_channels, 32, 32))
    assert out.shape[-2:] == (32, 32) and np.isfinite(out.detach().numpy()).all()

    # reused like STEGO: `reconstruct model_uri=<selftrain run>` applies the logged student with that run's plan
    from stego_core.config import ReconstructConfig
    from stego_core.steps.evaluation import run_reconstruct

    again = run_reconstruct(ReconstructConfig(data=cfg.data, split="all", progress=False, experiment=cfg.experiment,
                                              output=str(tmp_path / "again"), model_uri=result.run_id))
    reused = client.get_run(again.run_id)
    assert reused.data.tags["students_from_run"] == result.run_id and reused.data.tags["method"] == "selftrain"
    assert reused.data.tags["training_run_id"] == result.run_id and "model_uris" not in reused.data.tags
    assert {r["case_id"] for r in again.rows} == {r["case_id"] for r in result.rows}
    assert all(0.0 <= r["dice"] <= 1.0 for r in again.rows)


def test_teacher_preset_must_match_the_skull_strip(tmp_path):
    from stego_core.config import TeacherConfig

    teacher = TeacherConfig(config=str(REPO_ROOT / "experiments/configs/best_mra_tree.yaml"))
    assert teacher.resolved("head").method == "frangi3d"
    with pytest.raises(ValueError, match="data.skull_strip=head"):
        teacher.resolved("auto")


def _tiny_student():
    from stego_core.config import SelfTrainSettings

    return SelfTrainSettings(steps=6, eval_every=3, crop=32, batch=2, channels=(8, 16))


def test_teacher_and_student_never_read_the_label(tmp_path):
    import dataclasses

    from stego_core.config import DataConfig, PhantomConfig, TeacherConfig
    from stego_core.data.cases import ensure_cases, preprocess_case
    from stego_core.methods.registry import build_method

    data = DataConfig(root=str(tmp_path / "ph"), phantom=PhantomConfig(n_volumes=1, shape=(48, 48, 24)))
    case = preprocess_case(ensure_cases(data)[0], data)
    outputs = []
    for fill in (True, False):  # labels of all ones and all zeros
        labelled = dataclasses.replace(case, label=np.full(case.image.shape, fill))
        method = build_method("selftrain", {"teacher": TeacherConfig(method="percentile"),
                                            "student": _tiny_student()})
        prob, mask = method.teacher_output(labelled)
        outputs.append((prob, mask, method.predict(labelled)))
    for a, b in zip(*outputs):
        np.testing.assert_array_equal(a, b)


def test_inductive_student_is_fitted_on_other_volumes(tmp_path):
    from stego_core.config import DataConfig, PhantomConfig, TeacherConfig
    from stego_core.data.cases import ensure_cases, preprocess_case
    from stego_core.methods.registry import build_method

    data = DataConfig(root=str(tmp_path / "ph"), phantom=PhantomConfig(n_volumes=2, shape=(48, 48, 24)))
    train, test = (preprocess_case(c, data) for c in ensure_cases(data))
    method = build_method("selftrain", {"teacher": TeacherConfig(method="percentile"), "student": _tiny_student(),
                                        "mode": "inductive"})
    with pytest.raises(ValueError, match="fit the student"):
        method.predict(test)
    method.fit([train])
    prob = method.predict(test)
    assert prob.shape == test.image.shape and set(np.unique(prob)) <= {0.0, 1.0}


@pytest.mark.slow
def test_pipeline_selftrains_on_the_stego_it_trained(tmp_path, mlflow_store, monkeypatch):
    """The STEGO-teacher switch: learned [stego, selftrain] with teacher method stego and no model_uri."""
    import mlflow.models

    from stego_core.config import MainConfig
    from stego_core.steps.pipeline import run_main

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kwargs: fallback)
    cfg = load_config(MainConfig, None, [
        f"data.root={tmp_path / 'phantoms'}", "data.phantom.shape=[48, 48, 24]", "data.phantom.n_volumes=2",
        "slicing.patch_size=16", "slicing.stride=8", "baselines=[]", "learned=[stego, selftrain]",
        "model.backbone=classical", "model.weights=random", "model.res=16", "model.code_dim=16",
        "model.n_clusters=8", "model.cluster_fit=kmeans", "model.cluster_rule=brightness", "stego_crf=false",
        "train.max_steps=6", "train.val_every_n_steps=6", "train.batch_size=8", "train.progress=false",
        "train.accelerator=cpu", f"train.cache_dir={tmp_path / 'cache'}", "selftrain.teacher.method=stego",
        *(f"selftrain.{o}" for o in TINY[4:9]), f"output={tmp_path / 'outputs'}",
        "experiment=selftrain-tests"])
    text = run_main(cfg)
    rows = {line.split()[0] for line in text.splitlines()[2:]}
    assert rows == {"stego", "teacher-stego", "selftrain"}
    client = tracking.client()
    experiment = client.get_experiment_by_name("selftrain-tests")
    (run,) = client.search_runs([experiment.experiment_id], "tags.step = 'selftrain'")
    assert run.data.tags["teacher"] == "stego" and run.data.params["teacher.settings.model_uri"]


def test_ablation_rows_take_selftrain_variants_by_alias(tmp_path):
    from stego_core.config import AblationConfig, from_dict
    from stego_core.steps.ablation import ablation_rows

    student = {"steps": 6, "eval_every": 3, "crop": 32, "batch": 2, "channels": [8, 16]}
    cfg = from_dict(AblationConfig, {
        "datasets": [{"root": str(tmp_path / "ph"), "phantom": {"n_volumes": 1, "shape": [48, 48, 24]}}],
        "progress": False, "variants": [{"name": "none"}],
        "methods": [{"name": "percentile", "alias": "teacher"},
                    {"name": "selftrain", "alias": "student",
                     "settings": {"teacher": {"method": "percentile"}, "student": student}}]})
    rows = ablation_rows(cfg)
    assert [r["method"] for r in rows] == ["teacher", "student"]
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)


@pytest.mark.slow
def test_stego_to_student_row_of_the_shipped_preset(tmp_path, mlflow_store, monkeypatch):
    """``selftrain_stego.yaml`` (the self-training ablation's STEGO -> student row) at tiny size on phantoms:
    the pipeline trains STEGO, the student learns that very model's confident voxels, and the comparison holds
    the reference, STEGO, STEGO as the teacher and the student."""
    import mlflow.models

    from stego_core.config import MainConfig
    from stego_core.steps.pipeline import run_main

    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kwargs: fallback)
    cfg = load_config(MainConfig, REPO_ROOT / "experiments/configs/selftrain_stego.yaml", [
        "data.source=phantom", f"data.root={tmp_path / 'phantoms'}", "data.phantom.shape=[48, 48, 24]",
        "data.phantom.n_volumes=2", "slicing.patch_size=16", "slicing.stride=8", "val_stride=8",
        "model.code_dim=8", "model.n_clusters=8", "train.max_steps=4", "train.val_every_n_steps=4",
        "train.batch_size=8", "train.progress=false", "train.accelerator=cpu", "sampling.max_crops=60",
        f"train.cache_dir={tmp_path / 'cache'}", *(f"selftrain.{o}" for o in TINY[4:9]),
        f"output={tmp_path / 'outputs'}", "experiment=selftrain-tests"])
    assert cfg.learned == ("stego", "selftrain") and cfg.selftrain.teacher.method == "stego"
    text = run_main(cfg)
    rows = {line.split()[0] for line in text.splitlines()[2:]}
    assert rows == {"percentile", "stego", "teacher-stego", "selftrain"}
    client = tracking.client()
    experiment = client.get_experiment_by_name("selftrain-tests")
    (training,) = client.search_runs([experiment.experiment_id], "tags.step = 'train'")
    (student,) = client.search_runs([experiment.experiment_id], "tags.step = 'selftrain'")
    assert training.info.run_id in student.data.params["teacher.settings.model_uri"]  # the STEGO trained here
    for key in ("dice_mean", "teacher_dice_mean"):
        assert 0.0 <= student.data.metrics[key] <= 1.0
