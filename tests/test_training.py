"""End-to-end STEGO training on tiny phantoms: train -> log model -> load -> reconstruct, all tracked in MLflow."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from stego_core.config import load_config
from stego_core.data.cases import DataConfig, ensure_cases, split_cases
from stego_core.data.phantom import PhantomConfig
from stego_core.engine.reconstruction import EngineConfig
from stego_core.methods.stego.inference import TorchSegmenter
from stego_core.methods.stego.mapping import choose_mapping_rule
from stego_core.platform import tracking
from stego_core.steps.evaluation import (
    BaselineConfig,
    ReconstructConfig,
    run_baseline,
    run_reconstruct,
)
from stego_core.steps.training import TrainConfig, run_train

pytestmark = pytest.mark.usefixtures("mlflow_store")

EXPERIMENT = "train-tests"


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    out: set[str] = set()
    for info in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, info.path) if info.is_dir else {info.path}
    return out


def _fast_model_logging(mp: pytest.MonkeyPatch) -> None:
    """Skip MLflow's pip-requirement inference (a subprocess that re-imports everything: ~20 s on 2 cores)."""
    import mlflow.models

    mp.setattr(mlflow.models, "infer_pip_requirements",
               lambda model_uri, flavor, fallback=None, **kwargs: fallback)


def _phantoms(root: Path, n_volumes: int) -> DataConfig:
    data = DataConfig(source="phantom", root=str(root),
                      phantom=PhantomConfig(n_volumes=n_volumes, shape=(32, 32, 24), seed=0))
    ensure_cases(data)
    return data


def _train_config(data: DataConfig, out: Path, **overrides) -> TrainConfig:
    """A tiny STEGO: the weight-free featurizer at res 8, 16-pixel crops, a few steps on CPU."""
    base = {"slicing.patch_size": 16, "slicing.stride": 8, "model.backbone": "classical", "model.res": 8,
            "model.code_dim": 16, "train.max_steps": 10, "train.val_every_n_steps": 10, "train.batch_size": 8,
            "train.log_every_n_steps": 2, "train.progress": False, "train.accelerator": "cpu",
            "train.cache_dir": str(out / "feature_cache"), "output": str(out / "train"), "experiment": EXPERIMENT,
            "log_model": False}
    return dataclasses.replace(load_config(TrainConfig, None, {**base, **overrides}), data=data)


def _head_state(result) -> dict[str, torch.Tensor]:
    ckpt = torch.load(result.output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if k.startswith("head.")}


@pytest.fixture(scope="module")
def data3(tmp_path_factory) -> DataConfig:
    return _phantoms(tmp_path_factory.mktemp("train_data") / "phantoms3", 3)


@pytest.fixture(scope="module")
def data1(tmp_path_factory) -> DataConfig:
    return _phantoms(tmp_path_factory.mktemp("train_data1") / "phantoms1", 1)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, _mlflow_template_db, data3):
    """Train 20 steps (validation at 10 and 20), log the model, reconstruct with it, and run one baseline."""
    folder = tmp_path_factory.mktemp("train_store")
    shutil.copyfile(_mlflow_template_db, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(folder)
        _fast_model_logging(mp)
        cfg = _train_config(data3, folder, **{"train.max_steps": 20, "log_model": True})
        trained = run_train(cfg)
        recon = run_reconstruct(ReconstructConfig(
            data=data3, engine=EngineConfig(patch_size=None, batch_size=32), model_uri=trained.model_uri,
            device="cpu", output=str(folder / "reconstruct"), experiment=EXPERIMENT, progress=False))
        baseline = run_baseline(BaselineConfig(
            data=data3, method="percentile", engine=EngineConfig(patch_size=None, blend="constant"),
            output=str(folder / "baseline"), experiment=EXPERIMENT, progress=False))
    return {"cfg": cfg, "train": trained, "reconstruct": recon, "baseline": baseline, "uri": uri,
            "client": MlflowClient(tracking_uri=uri)}


# --------------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_run_records_everything(e2e, data3, tmp_path):
    client, trained = e2e["client"], e2e["train"]
    run = client.get_run(trained.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["method"] == "stego" and tags["step"] == "train" and tags["backbone"] == "classical"
    # three labelled phantoms: training volumes disjoint from the held-out one -> label-based mapping
    assert tags["cluster_mapping_rule"] == "hungarian" == trained.mapping_rule
    assert tags["weights_id"].startswith("none:classical") and tags["device"] == "cpu"
    params = run.data.params
    assert params["train.max_steps"] == "20" and params["model.backbone"] == "classical"
    assert params["slicing.patch_size"] == "16" and params["model.n_clusters"]  # key settings, even at defaults
    # the rest at its defaults stays in plan.yaml: tens of parameters, not the ~120 of the flattened plan
    assert "loss.pos_intra_shift" not in params and len(params) <= 60, sorted(params)
    plan = Path(client.download_artifacts(trained.run_id, "plan.yaml", str(tmp_path))).read_text()
    assert "pos_intra_shift: 0.18" in plan
    assert params["data.phantom.shape"] == "[32, 32, 24]"

    loss = client.get_metric_history(trained.run_id, "train/loss")
    assert len({m.step for m in loss}) >= 5 and all(np.isfinite(m.value) for m in loss)
    # a validation before the first update (step 0), then every val_every_n_steps
    assert [m.step for m in client.get_metric_history(trained.run_id, "val/dice")] == [0, 10, 20]
    assert len(client.get_metric_history(trained.run_id, "val/cluster_miou")) == 3
    metrics = run.data.metrics
    for key in ("dice", "cldice", "precision", "recall", "cluster_miou", "linear_miou"):
        assert metrics[f"val_final/{key}"] == pytest.approx(trained.metrics[f"val/{key}"])
        assert 0.0 <= metrics[f"val_final/{key}"] <= 1.0
    assert "train/linear_loss" in metrics  # disjoint labelled training volumes feed the linear probe

    artifacts = _artifacts(client, trained.run_id)
    assert {"plan.yaml", "checkpoints/last.ckpt", "checkpoints/best_k.json"} <= artifacts
    # stepped images (the run page's image cards with a step slider), one per validation, from step 0 (where
    # MLflow's image cards open)
    for key in ("val~crops", "val~volume_mip"):  # MLflow's file name of the key val/...
        steps = sorted(int(a.split("+step+")[1].split("+")[0]) for a in artifacts
                       if a.startswith(f"images/{key}+step+") and a.endswith(".png"))
        assert steps == [0, 10, 20], key
    assert any(a.startswith("checkpoints/best-step") for a in artifacts)  # top-k by val/cldice
    assert run.data.tags["mlflow.note.content"].startswith("STEGO training")
    assert trained.model_uri == f"runs:/{trained.run_id}/model"
    (logged,) = client.search_logged_models([run.info.experiment_id], f"source_run_id = '{trained.run_id}'")
    assert logged.name == "model"

    cases = ensure_cases(data3)
    train_cases, test_cases = split_cases(cases, 0.34, seed=0)
    contexts = {}
    for dataset_input in run.inputs.dataset_inputs:
        t = {tag.key: tag.value for tag in dataset_input.tags}
        contexts[t["mlflow.data.context"]] = t["case_ids"]
    assert contexts == {"training": ",".join(c.case_id for c in train_cases),
                        "validation": ",".join(c.case_id for c in test_cases)}


@pytest.mark.slow
def test_reconstruct_run_links_training_and_shares_metric_keys(e2e, data3):
    client, trained, recon = e2e["client"], e2e["train"], e2e["reconstruct"]
    run = client.get_run(recon.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["training_run_id"] == trained.run_id
    assert tags["method"] == "stego" and tags["step"] == "evaluate"
    assert tags["model_uri"] == trained.model_uri
    assert tags["cluster_mapping_rule"] == "hungarian"
    assert run.data.params["engine.patch_size"] == "None"  # null: the model's own training crop size (16)

    baseline = client.get_run(e2e["baseline"].run_id)
    stego_keys = {k for k in run.data.metrics if k.endswith(("_mean", "_std"))}
    baseline_keys = {k for k in baseline.data.metrics if k.endswith(("_mean", "_std"))}
    assert stego_keys == baseline_keys and {"dice_mean", "cldice_mean", "precision_mean",
                                            "recall_mean"} <= stego_keys
    per_volume = {k for k in run.data.metrics if "/" in k}
    assert per_volume == {k for k in baseline.data.metrics if "/" in k}
    (test_case,) = split_cases(ensure_cases(data3), 0.34, seed=0)[1]
    assert f"dice/{test_case.case_id}" in per_volume
    artifacts = _artifacts(client, recon.run_id)
    assert {f"predictions/{test_case.case_id}_stego_pred.nii.gz", f"figures/{test_case.case_id}_mip.png",
            "evaluation_results.txt", "evaluation_results.csv"} <= artifacts


@pytest.mark.slow
def test_logged_model_loads_and_predicts(e2e, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", e2e["uri"])
    trained = e2e["train"]
    model = tracking.load_pytorch_model(trained.model_uri)
    assert model.patch_size == 16 and model.mapping_rule == "hungarian" and model.threshold == 0.5
    assert model.vessel_clusters.dtype == torch.bool and int(model.vessel_clusters.sum()) == 1
    crops = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    prob = model(crops)
    assert prob.shape == (3, 1, 16, 16)
    assert float(prob.min()) >= 0.0 and float(prob.max()) <= 1.0
    # the logged head is the trained one: same weights as the last checkpoint
    logged = {f"head.{k}": v for k, v in model.head.state_dict().items()}
    checkpoint = _head_state(trained)
    assert logged.keys() == checkpoint.keys()
    for k in logged:
        torch.testing.assert_close(logged[k], checkpoint[k])

    segmenter = TorchSegmenter(tracking.load_pytorch_model(trained.model_uri), device="cpu")
    assert segmenter.name == "stego" and segmenter.threshold == 0.5
    out = segmenter.predict_slices(crops[:, 0].numpy())
    assert out.shape == (3, 16, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, prob[:, 0].numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------------- reproducibility


@pytest.mark.slow
def test_seeded_runs_are_reproducible(data3, tmp_path):
    first = run_train(_train_config(data3, tmp_path, **{"train.seed": 0}))
    second = run_train(_train_config(data3, tmp_path, **{"train.seed": 0}))
    other = run_train(_train_config(data3, tmp_path, **{"train.seed": 1}))
    assert first.run_id != second.run_id and first.model_uri is None
    assert first.metrics == second.metrics and len(first.metrics) >= 8
    a, b, c = _head_state(first), _head_state(second), _head_state(other)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    client = tracking.client()
    loss_a = [m.value for m in client.get_metric_history(first.run_id, "train/loss")]
    loss_b = [m.value for m in client.get_metric_history(second.run_id, "train/loss")]
    assert loss_a == loss_b and len(loss_a) >= 3


# --------------------------------------------------------------------------------------------- cluster mapping


@pytest.mark.slow
def test_single_case_uses_brightness_and_refuses_label_rules(data1, tmp_path):
    result = run_train(_train_config(data1, tmp_path, **{"train.max_steps": 4}))
    client = tracking.client()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cluster_mapping_rule"] == "brightness" == result.mapping_rule
    assert "train/linear_loss" not in run.data.metrics  # labels of an evaluated volume never train anything

    with pytest.raises(ValueError, match="overlap"):
        run_train(_train_config(data1, tmp_path, **{"model.cluster_rule": "hungarian"}))
    failed = client.search_runs([run.info.experiment_id], "attributes.status = 'FAILED'")
    assert len(failed) == 1 and "overlap" in failed[0].data.tags["error"]


@pytest.mark.slow
def test_bright_cut_rule_maps_several_clusters_without_labels(data1, tmp_path):
    result = run_train(_train_config(data1, tmp_path, **{"train.max_steps": 2, "model.n_clusters": 16,
                                                       "model.cluster_fit": "kmeans",
                                                       "model.cluster_rule": "bright_cut"}))
    run = tracking.client().get_run(result.run_id)
    assert run.data.tags["cluster_mapping_rule"] == "bright_cut" == result.mapping_rule
    assert run.data.params["model.cluster_rule"] == "bright_cut"
    plan = Path(tracking.client().download_artifacts(result.run_id, "plan.yaml", str(tmp_path))).read_text()
    assert "bright_quantile: 99.0" in plan  # at its default: in the plan, not a parameter


@pytest.mark.slow
def test_requested_label_rule_is_the_one_applied(data3, tmp_path):
    # model.cluster_rule=majority with K=2 must not silently become Hungarian matching (what 'auto' picks)
    result = run_train(_train_config(data3, tmp_path, **{"model.cluster_rule": "majority", "train.max_steps": 2}))
    assert result.mapping_rule == "majority"
    assert tracking.client().get_run(result.run_id).data.tags["cluster_mapping_rule"] == "majority"


def test_choose_mapping_rule():
    assert choose_mapping_rule("auto", labels_available=True, overlaps_evaluation=False) == "label"
    assert choose_mapping_rule("auto", labels_available=True, overlaps_evaluation=True) == "brightness"
    assert choose_mapping_rule("auto", labels_available=False, overlaps_evaluation=False) == "brightness"
    assert choose_mapping_rule("brightness", labels_available=True, overlaps_evaluation=False) == "brightness"
    assert choose_mapping_rule("majority", labels_available=True, overlaps_evaluation=False) == "majority"
    assert choose_mapping_rule("hungarian", labels_available=True, overlaps_evaluation=False) == "hungarian"
    with pytest.raises(ValueError, match="overlap"):
        choose_mapping_rule("majority", labels_available=True, overlaps_evaluation=True)
    with pytest.raises(ValueError, match="labelled"):
        choose_mapping_rule("hungarian", labels_available=False, overlaps_evaluation=False)


# --------------------------------------------------------------------------------------------- weights


def test_hub_weights_offline_fail_fast_and_run_failed(data1, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)  # nothing cached
    cfg = _train_config(data1, tmp_path, **{"model.backbone": "vit_small_patch16_dino", "model.weights": "hub",
                                            "model.res": 32})
    with pytest.raises(RuntimeError, match="local weights file") as info:
        run_train(cfg)
    assert "weights=" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    client = tracking.client()
    (run,) = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    assert run.info.status == "FAILED"
    assert "local weights file" in run.data.tags["error"]
    assert "error.txt" in _artifacts(client, run.info.run_id)


@pytest.mark.slow
def test_vit_trains_from_a_local_weights_file(data1, tmp_path):
    from stego_core.features.backbones import build_backbone

    random_vit = build_backbone("vit_small_patch16_dino", weights="random", res=32)
    weights = tmp_path / "vit_s16_random.pth"
    torch.save(random_vit.model.state_dict(), weights)
    from_file = build_backbone("vit_small_patch16_dino", weights=str(weights), res=32)
    crops = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(from_file(crops), random_vit(crops))  # the file round-trips the weights

    result = run_train(_train_config(data1, tmp_path, **{
        "model.backbone": "vit_small_patch16_dino", "model.weights": str(weights), "model.res": 32,
        "train.max_steps": 4, "train.val_every_n_steps": 4}))
    run = tracking.client().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["weights_id"].startswith("file:vit_s16_random.pth:sha256=")
    assert run.data.params["model.weights"] == str(weights)
    # validated before the first update (the untrained head) and at the end
    assert [m.step for m in tracking.client().get_metric_history(result.run_id, "val/dice")] == [0, 4]
    assert np.isfinite(result.metrics["val/dice"])


@pytest.mark.slow
def test_kmeans_cluster_fit_maps_with_refitted_centroids(data3, tmp_path):
    """model.cluster_fit=kmeans: the segmenter's centroids are k-means of the codes, not the trained probe."""
    from stego_core.methods.stego.mapping import refit_centroids

    result = run_train(_train_config(data3, tmp_path, **{"model.cluster_fit": "kmeans", "model.n_clusters": 5,
                                                         "train.max_steps": 4, "train.val_every_n_steps": 4}))
    assert result.mapping_rule in ("hungarian", "majority", "brightness")
    assert "val/dice" in result.metrics and 0.0 <= result.metrics["val/dice"] <= 1.0
    codes_probe = refit_centroids(_TinyModule(), np.random.default_rng(0).random((6, 4, 3, 3)).astype(np.float32),
                                  3, seed=0)
    assert codes_probe.clusters.shape == (3, 4) and torch.allclose(codes_probe.clusters.norm(dim=1),
                                                                    torch.ones(3), atol=1e-4)


class _TinyModule(torch.nn.Module):
    """A module with an identity head: refit_centroids clusters the features themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.head = torch.nn.Identity()

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")
