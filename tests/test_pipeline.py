"""Tests for stego_core.steps.pipeline: the comparison table and the whole demo on tiny phantoms."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from experiments import CONFIG_DIR
from stego_core.config import load_config
from stego_core.methods.stego.inference import TorchSegmenter
from stego_core.platform import tracking
from stego_core.steps.pipeline import MainConfig, crf_available, format_table, run_main

pytestmark = pytest.mark.usefixtures("mlflow_store")


def test_format_table_rows_and_values():
    table = {
        "otsu": {"dice_mean": 0.5, "dice_std": 0.125, "cldice_mean": 0.25, "cldice_std": 0.0,
                 "precision_mean": 1.0, "precision_std": 0.0, "recall_mean": 0.75, "recall_std": 0.5, "n_cases": 3},
        "stego+crf": {"dice_mean": 0.9, "dice_std": 0.01, "domain_warnings": 1, "n_cases": 3},  # missing keys: nan
    }
    lines = format_table(table).splitlines()
    assert len(lines) == 5
    assert lines[0] == "n = 3 held-out volume(s) per method; mean ± std over the held-out volumes."
    assert lines[1].split() == ["method", "n", "dice", "cldice", "precision", "recall", "domain"]
    assert lines[4].split()[-1] == "1/3"  # the cases the domain guard warned about
    assert set(lines[2]) == {"-"} and len(lines[2]) == len(lines[1])
    assert lines[3].split() == ["otsu", "3", "0.500", "±", "0.125", "0.250", "±", "0.000", "1.000", "±", "0.000",
                                "0.750", "±", "0.500"]
    # a row whose MLflow keys differ from its name says both (stego_crf/dice on the runs table)
    assert lines[4].split()[:6] == ["stego+crf", "(stego_crf)", "3", "0.900", "±", "0.010"]
    assert lines[4].split()[6] == "nan"
    assert format_table(table, keys=("dice",)).splitlines()[3].split() == ["otsu", "3", "0.500", "±", "0.125"]
    one = format_table({"otsu": {"dice_mean": 0.5, "dice_std": 0.0, "n_cases": 1}}, keys=("dice",)).splitlines()
    assert one[0] == "n = 1 held-out volume(s) per method; the score of the one volume."
    assert one[3].split() == ["otsu", "1", "0.500"]  # no "± 0.000" for one volume


def _artifact_names(client, run_id: str) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id)}


@pytest.mark.slow
def test_run_main_on_tiny_phantoms(tmp_path, monkeypatch, mlflow_store, server_store):
    """The demo on tiny phantoms against a real `mlflow server` (REST): every row a registered method, STEGO
    trained once for its two rows, its model reused by ``reconstruct``."""
    import mlflow.models

    # skip MLflow's pip-requirement inference subprocess (~20 s on 2 cores); the model is logged all the same
    monkeypatch.setattr(mlflow.models, "infer_pip_requirements",
                        lambda model_uri, flavor, fallback=None, **kwargs: fallback)
    stego = "methods.stego.settings."
    cfg = load_config(MainConfig, CONFIG_DIR / "main.yaml", [  # the demo's plan, shrunk
        f"data.root={tmp_path / 'phantoms'}", "data.phantom.shape=[32, 32, 24]", "slicing.patch_size=16",
        "slicing.stride=8", "methods={otsu: {}, stego: {settings: {model: {backbone: mra_vit_t4_p2, code_dim: 16, "
        "n_clusters: 8, res: 16, cluster_fit: kmeans, cluster_rule: dice}}}, stego+crf: {}}",
        f"{stego}train.max_steps=10", f"{stego}train.val_every_n_steps=10", f"{stego}train.batch_size=8",
        f"{stego}train.progress=false", f"{stego}train.accelerator=cpu", f"{stego}train.cache_dir={tmp_path / 'cache'}",
        "pretrain.max_steps=2", "pretrain.batch_size=4", "pretrain.augment.global_size=16",
        "pretrain.augment.local_size=8", "pretrain.out_dim=64", "pretrain.hidden_dim=32",
        "pretrain.bottleneck_dim=16", "pretrain.progress=false", f"output={tmp_path / 'outputs'}",
        "experiment=pipeline-tests"])
    assert cfg.pretrain is not None and cfg.methods["stego"].settings.model.backbone == cfg.pretrain.backbone
    assert cfg.methods["stego+crf"].settings == cfg.methods["stego"].settings  # the row it extends
    assert cfg.methods["stego"].settings.slicing.patch_size == 16  # the pipeline's crops
    fits = []
    from stego_core.methods.stego import method as stego_method

    real = stego_method.train_stego
    monkeypatch.setattr(stego_method, "train_stego", lambda *a, **k: (fits.append(1), real(*a, **k))[1])
    text = run_main(cfg)
    table_text, _, closing = text.partition("\n\n")
    rows = {line.split()[0]: line for line in table_text.splitlines()[3:]}
    # the demo's split: five phantoms, three held out, so that statistics across cases are statistics
    assert table_text.startswith("n = 3 held-out volume(s) per method; mean ± std")  # the table states n
    with_crf = crf_available()
    assert set(rows) == {"otsu", "stego"} | ({"stego+crf"} if with_crf else set())
    assert len(fits) == 1  # stego and stego+crf share one training

    client = tracking.client()
    experiment = client.get_experiment_by_name("pipeline-tests")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"pipeline", "prepare", "otsu", "pretrain-mra_vit_t4_p2", "stego"} | (
        {"stego+crf"} if with_crf else set())
    assert all(r.info.status == "FINISHED" for r in runs.values())
    parent = runs["pipeline"]
    for name, run in runs.items():
        if name != "pipeline":
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id, name

    assert {"comparison.png", "comparison.txt", "comparison.csv", "comparison.md",
            "comparison_cases.png"} <= _artifact_names(client, parent.info.run_id)
    assert "comparison_radius.png" in _artifact_names(client, parent.info.run_id)  # recall by vessel radius
    # one slice viewer per held-out case on the parent, switching between every scored method
    viewers = [a.path for a in client.list_artifacts(parent.info.run_id, "viewer")]
    assert viewers and all(v.startswith("viewer/") and v.endswith(".html") for v in viewers)
    page = Path(client.download_artifacts(parent.info.run_id, viewers[0], str(tmp_path))).read_text()
    methods = set(rows)
    assert all(f'"{m}":[{{"slices":"data:image/png;base64,' in page for m in methods)
    assert "viewer/" in parent.data.tags["mlflow.note.content"]
    # three held-out phantoms: CIs and paired differences, no Wilcoxon test (n = 3 cannot reach alpha), said once
    assert "comparison.md" in _artifact_names(client, parent.info.run_id)
    assert parent.data.tags["mlflow.note.content"].count("No Wilcoxon test: with n = 3 cases") == 1
    assert "n = 1 case" not in parent.data.tags["mlflow.note.content"]
    local = client.download_artifacts(parent.info.run_id, "comparison.txt", str(tmp_path))
    assert Path(local).read_text() == table_text + "\n"
    # the last block: the run, its report (one self-contained page), make ui
    assert f"pipeline run  {parent.info.run_id} (experiment pipeline-tests)" in closing
    assert "report.html" in closing and "make ui" in closing and closing.startswith("==== done in ")
    assert "report.html" in _artifact_names(client, parent.info.run_id) and parent.data.tags["report"] == "report.html"
    report = Path(client.download_artifacts(parent.info.run_id, "report.html", str(tmp_path))).read_text()
    assert '<table id=comparison>' in report and report.count("data:image/png;base64,") >= 2
    assert f"./#/experiments/{experiment.experiment_id}/runs/{runs['otsu'].info.run_id}" in report
    assert "http://" not in report and "<script" not in report  # self-contained, nothing runs
    stego_run, otsu = runs["stego"], runs["otsu"]
    # the demo's STEGO trains on the backbone its own DINO pretraining made (hand-off by run id)
    pretrain = runs["pretrain-mra_vit_t4_p2"]
    assert stego_run.data.params["resolved.model.weights"].startswith(f"runs:/{pretrain.info.run_id}")
    assert stego_run.data.tags["pretrain_run_id"] == pretrain.info.run_id
    assert parent.data.tags["run.otsu"] == otsu.info.run_id and parent.data.tags["run.stego"] == stego_run.info.run_id
    assert stego_run.data.params["resolved.train.max_steps"] == "10"
    # tens of parameters per run, not the flattened plan (~120 for STEGO, ~300 for the pipeline): plan.yaml has it
    assert len(stego_run.data.params) <= 60 and len(otsu.data.params) <= 30, (len(stego_run.data.params),
                                                                              len(otsu.data.params))
    assert len(parent.data.params) <= 90 and "plan.yaml" in _artifact_names(client, parent.info.run_id)
    for method, run in (("otsu", otsu), ("stego", stego_run)):
        dice, std = run.data.metrics["dice_mean"], run.data.metrics["dice_std"]
        assert parent.data.metrics[f"{method}/dice"] == round(dice, 4)  # rounded for the runs table
        assert f"{dice:.3f} ± {std:.3f}" in rows[method]
        assert parent.data.metrics[f"{method}/cldice"] == round(run.data.metrics["cldice_mean"], 4)

    # the parent's description: the comparison as a markdown table linking each run, and the best method
    note = parent.data.tags["mlflow.note.content"]
    assert "| method | dice | cldice |" in note and "Best by clDice" in note
    assert f"#/experiments/{experiment.experiment_id}/runs/{otsu.info.run_id}" in note
    assert all(r.data.tags.get("mlflow.note.content") for r in runs.values())  # every run has a description
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # STEGO's run: its training curves, stepped images (step slider), val_final/* summaries, checkpoints
    images = {a.path for a in client.list_artifacts(stego_run.info.run_id, "images")}
    assert any(a.startswith("images/val~volume_mip+step+10+") and a.endswith(".png") for a in images)
    assert "val_final/cldice" in stego_run.data.metrics

    # its model, with the settings it was trained with, loads back through the one interface
    state = tracking.load_learned(stego_run.info.run_id)
    assert state.method == "stego" and state.settings["train"]["max_steps"] == 10
    segmenter = TorchSegmenter(state.state, device="cpu")

    prob = segmenter.predict_slices(np.random.default_rng(0).random((2, 16, 16), dtype=np.float32))
    assert prob.shape == (2, 16, 16) and np.isfinite(prob).all() and ((prob >= 0) & (prob <= 1)).all()
