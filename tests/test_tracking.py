"""Tests for stego_core.platform.tracking against a real SQLite MLflow store in the test's temporary folder."""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import mlflow
import numpy as np
import pytest

from stego_core.data.io import discover_cases
from stego_core.platform import tracking

pytestmark = pytest.mark.usefixtures("mlflow_store")


def _artifact_paths(client, run_id: str, path: str | None = None) -> set[str]:
    out = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifact_paths(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def test_tracking_uri_honours_env(mlflow_store, monkeypatch):
    assert tracking.tracking_uri() == mlflow_store
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.tracking_uri() == "sqlite:///mlflow.db"


def test_start_run_tags_commit_and_scopes_outputs(tmp_path):
    with tracking.start_run("exp-a", run_name="first", tags={"method": "otsu"}) as handle:
        assert tracking.active_run_id() == handle.run_id
        assert handle.output_dir == Path("outputs") / handle.run_id
        assert (tmp_path / "outputs" / handle.run_id).is_dir()
        (handle.output_dir / "result.txt").write_text("ok")
    assert mlflow.active_run() is None
    with tracking.start_run("exp-a", output_root=tmp_path / "elsewhere") as second:
        pass
    assert second.run_id != handle.run_id
    assert second.output_dir == tmp_path / "elsewhere" / second.run_id and second.output_dir.is_dir()
    assert (tmp_path / "outputs" / handle.run_id / "result.txt").read_text() == "ok"  # not overwritten

    client = tracking.client()
    run = client.get_run(handle.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "first"
    assert run.data.tags["method"] == "otsu"
    assert run.data.tags["git_commit"] == tracking.git_commit()
    assert client.get_experiment(handle.experiment_id).name == "exp-a"
    assert second.experiment_id == handle.experiment_id


def test_git_commit(tmp_path):
    commit = tracking.git_commit()
    assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}", commit)
    plain = tmp_path / "plain"
    plain.mkdir()
    assert tracking.git_commit(plain) == "unknown"  # not a repository
    empty = tmp_path / "empty_repo"
    empty.mkdir()
    if subprocess.run(["git", "init", "-q", str(empty)], capture_output=True).returncode != 0:
        pytest.skip("git init unavailable")
    assert tracking.git_commit(empty) == "unknown"  # a repository without commits has no commit


def test_failing_body_ends_run_failed_with_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom 42"):
        with tracking.start_run("exp-fail") as handle:
            tracking.log_metrics({"before": 1.0})
            raise RuntimeError("boom 42")
    assert mlflow.active_run() is None
    client = tracking.client()
    run = client.get_run(handle.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "RuntimeError: boom 42"
    assert run.data.metrics == {"before": 1.0}  # what was logged before the failure is kept
    assert "error.txt" in _artifact_paths(client, handle.run_id)
    text = (tracking.download_artifacts(f"runs:/{handle.run_id}/error.txt", tmp_path / "dl")).read_text()
    assert "Traceback" in text and "RuntimeError: boom 42" in text


def test_run_killed_ends_killed_without_error_and_spares_the_parent():
    class Pruned(tracking.RunKilled):
        pass

    with tracking.start_run("exp-k", run_name="sweep") as parent:
        with pytest.raises(Pruned):
            with tracking.start_run("exp-k", run_name="trial", nested=True) as child:
                raise Pruned("trial 3 pruned at step 2")
        assert tracking.active_run_id() == parent.run_id
    client = tracking.client()
    run = client.get_run(child.run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags["end_reason"] == "Pruned: trial 3 pruned at step 2"
    assert "error" not in run.data.tags
    assert _artifact_paths(client, child.run_id) == set()
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_nested_and_resumed_runs():
    with tracking.start_run("exp-n", run_name="parent") as parent:
        with tracking.start_run("exp-n", run_name="child", nested=True) as child:
            tracking.log_metrics({"trial_value": 0.5})
        assert tracking.active_run_id() == parent.run_id
    client = tracking.client()
    assert client.get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id
    with tracking.start_run("ignored-when-resuming", run_id=parent.run_id) as resumed:
        tracking.log_metrics({"late": 2.0})
    assert resumed.run_id == parent.run_id
    assert client.get_run(parent.run_id).data.metrics["late"] == 2.0
    assert client.get_experiment_by_name("ignored-when-resuming") is None


def test_log_params_masks_password_and_batches():
    params = {f"p{i:03d}": i for i in range(250)}
    params["storage"] = "postgresql://optuna:s3cret@db:5432/optuna"
    params["long"] = "x" * 7000
    params["nested_url"] = "use sqlite:///optuna.db"
    with tracking.start_run("exp-p") as handle:
        tracking.log_params(params)
    logged = tracking.client().get_run(handle.run_id).data.params
    assert len(logged) == 253
    assert logged["p000"] == "0" and logged["p249"] == "249"
    assert logged["storage"] == "postgresql://optuna:***@db:5432/optuna"
    assert not any("s3cret" in v for v in logged.values())
    assert logged["long"] == "x" * 6000
    assert logged["nested_url"] == "use sqlite:///optuna.db"


def test_log_metrics_skips_non_finite(caplog):
    with tracking.start_run("exp-m") as handle:
        with caplog.at_level(logging.WARNING, logger="stego_core.platform.tracking"):
            tracking.log_metrics({"dice": 0.75, "cldice": float("nan"), "recall": np.float32(0.5),
                                  "bad": float("inf")}, step=3)
        tracking.log_metrics({"dice": 0.8}, step=4)
    client = tracking.client()
    run = client.get_run(handle.run_id)
    assert run.data.metrics == {"dice": 0.8, "recall": 0.5}
    history = client.get_metric_history(handle.run_id, "dice")
    assert [(m.step, m.value) for m in history] == [(3, 0.75), (4, 0.8)]
    assert "cldice" in caplog.text and "bad" in caplog.text


def test_log_dataset_records_cases(tmp_path, tiny_case):
    root = tmp_path / "data"
    tiny_case("case_b", root=root)
    tiny_case("case_a", root=root, brain_mask=True)
    cases = discover_cases(root)
    with tracking.start_run("exp-d") as handle:
        tracking.log_dataset(cases, name="phantoms", context="training", source=str(root))
    client = tracking.client()
    inputs = client.get_run(handle.run_id).inputs.dataset_inputs
    assert len(inputs) == 1
    dataset = inputs[0].dataset
    assert dataset.name == "phantoms"
    assert str(root) in dataset.source
    assert json.loads(dataset.profile)["num_rows"] == 2
    columns = [c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]]
    assert columns == ["case_id", "image", "label", "mask", "digest"]
    tags = {t.key: t.value for t in inputs[0].tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["case_ids"] == "case_a,case_b" and tags["n_cases"] == "2"
    manifest = tracking.download_artifacts(f"runs:/{handle.run_id}/datasets/training_phantoms.json", tmp_path / "dl")
    records = json.loads(manifest.read_text())
    assert [r["case_id"] for r in records] == ["case_a", "case_b"]
    assert [r["digest"] for r in records] == [c.digest for c in cases]


def test_log_dataset_digest_follows_content(tmp_path, tiny_case):
    root = tmp_path / "data"
    tiny_case("case_a", root=root, seed=0)
    first = discover_cases(root)
    tiny_case("case_b", root=root, seed=1)
    second = discover_cases(root)
    with tracking.start_run("exp-d") as handle:
        tracking.log_dataset(first, name="one", context="training", source=str(root))
        tracking.log_dataset(second, name="two", context="evaluation", source=str(root))
    inputs = tracking.client().get_run(handle.run_id).inputs.dataset_inputs
    digests = {i.dataset.name: i.dataset.digest for i in inputs}
    assert set(digests) == {"one", "two"} and digests["one"] != digests["two"]


def test_log_dataset_long_id_list_is_cut(tmp_path):
    from stego_core.data.io import Case

    cases = [Case(f"case_{i:04d}", f"/d/case_{i:04d}/image.nii.gz", digest=f"{i:012x}") for i in range(120)]
    with tracking.start_run("exp-d") as handle:
        tracking.log_dataset(cases, name="many", context="training", source="/d")
    tags = {t.key: t.value for t in tracking.client().get_run(handle.run_id).inputs.dataset_inputs[0].tags}
    assert len(tags["case_ids"]) <= 500 and tags["case_ids"].startswith("case_0000,case_0001")
    assert tags["case_ids"].endswith(",...") and tags["n_cases"] == "120"


def test_log_figure_artifact_and_files(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 2))
    ax.imshow(np.eye(8))
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "a.csv").write_text("dice\n0.5\n")
    (folder / "b.txt").write_text("b")
    single = tmp_path / "evaluation_results.txt"
    single.write_text("row\n")
    with tracking.start_run("exp-f") as handle:
        tracking.log_figure(fig, "figures/mip.png")
        tracking.log_artifact(folder, "tables")
        tracking.log_artifact(single)
        tracking.log_text("hello", "notes/hello.txt")
        tracking.set_tags({"n_clusters": 3})
    assert not plt.fignum_exists(fig.number)  # the figure was closed
    client = tracking.client()
    assert _artifact_paths(client, handle.run_id) == {
        "figures/mip.png", "tables/a.csv", "tables/b.txt", "evaluation_results.txt", "notes/hello.txt"}
    png = tracking.download_artifacts(f"runs:/{handle.run_id}/figures/mip.png", tmp_path / "dl")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get_run(handle.run_id).data.tags["n_clusters"] == "3"


@pytest.mark.parametrize("url, expected", [
    ("postgresql://optuna:s3cret@db:5432/optuna", "postgresql://optuna:***@db:5432/optuna"),
    ("postgresql+psycopg2://u:p%40ss:w0rd@host/db", "postgresql+psycopg2://u:***@host/db"),
    ("mysql://user@host/db", "mysql://user@host/db"),  # no password
    ("sqlite:///optuna.db", "sqlite:///optuna.db"),
    ("http://localhost:5000", "http://localhost:5000"),  # a port is not a password
    ("a postgresql://u:p1@h1/db and redis://v:p2@h2:6379",
     "a postgresql://u:***@h1/db and redis://v:***@h2:6379"),
    ("", ""),
])
def test_mask_secrets(url, expected):
    assert tracking.mask_secrets(url) == expected


def test_run_of_model():
    assert tracking.run_of_model("runs:/0123abcd/model") == "0123abcd"
    assert tracking.run_of_model("models:/segmenter/3") is None


def test_pytorch_model_round_trip():
    import torch
    from torch import nn

    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    x = torch.linspace(0, 1, 2 * 1 * 6 * 6).reshape(2, 1, 6, 6)
    x8 = torch.linspace(-1, 1, 3 * 1 * 8 * 8).reshape(3, 1, 8, 8)
    with torch.no_grad():
        expected, expected8 = model(x), model(x8)
    with tracking.start_run("exp-model") as handle:
        uri = tracking.log_pytorch_model(model, name="segmenter", input_example=x[:1].numpy(),
                                         metadata={"n_clusters": 2})
        bare = tracking.log_pytorch_model(model, name="bare")  # no input example needed
    assert uri == f"runs:/{handle.run_id}/segmenter"
    assert tracking.run_of_model(uri) == handle.run_id
    loaded = tracking.load_pytorch_model(uri)
    assert isinstance(loaded, nn.Sequential) and loaded is not model  # the class survives, not a traced graph
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)  # batch 2 although the example had 1
        torch.testing.assert_close(loaded(x8), expected8, rtol=0, atol=0)  # other crop size too
        torch.testing.assert_close(tracking.load_pytorch_model(bare)(x), expected, rtol=0, atol=0)
    from mlflow.models import get_model_info

    assert get_model_info(uri).metadata == {"n_clusters": 2}


def test_project_run_in_default_is_replaced_in_the_configured_experiment(monkeypatch):
    """`mlflow run` without --experiment-name: the project's run sits in Default; the step runs in its own
    experiment and the placeholder points to it. With an experiment chosen, the project run is adopted."""
    client = tracking.client()
    placeholder = client.create_run("0", tags={"mlflow.source.type": "PROJECT", "mlflow.project.entryPoint": "x"})
    monkeypatch.setenv("MLFLOW_RUN_ID", placeholder.info.run_id)
    with tracking.start_run("exp-configured", description="one line") as handle:
        pass
    run = client.get_run(handle.run_id)
    assert handle.run_id != placeholder.info.run_id
    assert client.get_experiment(handle.experiment_id).name == "exp-configured"
    assert run.data.tags["mlflow.note.content"] == "one line"
    assert run.data.tags["stego.project_run_id"] == placeholder.info.run_id
    assert run.data.tags["mlflow.project.entryPoint"] == "x"
    moved = client.get_run(placeholder.info.run_id).data.tags
    assert moved["stego.moved_to_run_id"] == handle.run_id and "exp-configured" in moved["mlflow.note.content"]
    exp = client.get_experiment(handle.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs table

    chosen = client.create_experiment("exp-chosen")
    project = client.create_run(chosen)
    monkeypatch.setenv("MLFLOW_RUN_ID", project.info.run_id)
    with tracking.start_run("exp-configured") as adopted:
        pass
    assert adopted.run_id == project.info.run_id and adopted.experiment_id == chosen


def test_log_image_is_stepped():
    import matplotlib.figure

    with tracking.start_run("exp-img") as handle:
        for step in (1, 2):
            figure = matplotlib.figure.Figure(figsize=(1, 1))
            figure.add_subplot().plot([0, step])
            tracking.log_image(figure, "val/panel", step=step)
    names = _artifact_paths(tracking.client(), handle.run_id)
    assert sorted(int(n.split("+step+")[1].split("+")[0]) for n in names if n.endswith(".png")) == [1, 2]
