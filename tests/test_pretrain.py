"""DINO pretraining as a tracked step: pretrain -> train hand-off by run id, resume, and clear weight errors."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from stego_core.config import load_config
from stego_core.data.cases import DataConfig, ensure_cases
from stego_core.data.phantom import PhantomConfig
from stego_core.features.backbones import build_backbone
from stego_core.features.vit import WEIGHTS_ARTIFACT
from stego_core.platform import tracking
from stego_core.platform.weights import fetch_weights
from stego_core.steps.pretrain import PretrainConfig, run_pretrain
from stego_core.steps.training import TrainConfig, run_train

EXPERIMENT = "pretrain-tests"


@pytest.fixture(scope="module")
def phantom1(tmp_path_factory) -> DataConfig:
    data = DataConfig(source="phantom", root=str(tmp_path_factory.mktemp("pre_data") / "phantoms"),
                      phantom=PhantomConfig(n_volumes=1, shape=(32, 32, 24), seed=0))
    ensure_cases(data)
    return data


def _pretrain_config(data: DataConfig, out: Path, **overrides) -> PretrainConfig:
    """A tiny DINO: ViT (4 blocks, patch 4) on 16-pixel crops, few prototypes, a few steps."""
    base = {"backbone": "mra_vit_t4_p4", "slicing.patch_size": 16, "slicing.stride": 8,
            "augment.global_size": 16, "augment.local_size": 8, "augment.n_local": 2, "batch_size": 4,
            "max_steps": 2, "out_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "warmup_steps": 1,
            "freeze_last_layer_steps": 1, "teacher_temp_warmup_steps": 2, "log_every": 1, "figure_every": 2,
            "n_figure_crops": 2, "checkpoint_every": 1, "accelerator": "cpu", "progress": False,
            "output": str(out / "pretrain"), "experiment": EXPERIMENT}
    return dataclasses.replace(load_config(PretrainConfig, None, {**base, **overrides}), data=data)


def _train_config(data: DataConfig, out: Path, weights: str) -> TrainConfig:
    base = {"slicing.patch_size": 16, "slicing.stride": 8, "model.backbone": "mra_vit_t4_p4", "model.res": 16,
            "model.weights": weights, "model.code_dim": 8, "train.max_steps": 2, "train.val_every_n_steps": 2,
            "train.batch_size": 4, "train.progress": False, "train.accelerator": "cpu",
            "train.cache_dir": str(out / "feature_cache"), "output": str(out / "train"), "experiment": EXPERIMENT,
            "log_model": False, "sampling.max_crops": 24, "val_stride": 16}
    return dataclasses.replace(load_config(TrainConfig, None, base), data=data)


@pytest.fixture(scope="module")
def store(tmp_path_factory, _mlflow_template_db) -> tuple[str, Path]:
    """One tracking store shared by this module's tests (MLflow's schema takes seconds to create)."""
    folder = tmp_path_factory.mktemp("pretrain_store")
    shutil.copyfile(_mlflow_template_db, folder / "mlflow.db")
    return f"sqlite:///{folder / 'mlflow.db'}", folder


@pytest.fixture(autouse=True)
def _use_store(store, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store[0])


@pytest.fixture(scope="module")
def pretrained(store, phantom1):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store[0])
        return run_pretrain(_pretrain_config(phantom1, store[1]))


def test_pretrain_logs_curves_figures_and_the_teacher_backbone(pretrained):
    client = tracking.client()
    run = client.get_run(pretrained.run_id)
    assert run.info.status == "FINISHED"
    for key in ("pretrain/loss", "pretrain/teacher_entropy", "pretrain/center_norm", "pretrain/lr",
                "pretrain/momentum"):
        assert [m.step for m in client.get_metric_history(pretrained.run_id, key)] == [1, 2]
    assert run.data.params["backbone"] == "mra_vit_t4_p4" and run.data.params["sampling.method"] == "bright"
    arts = {a.path for a in client.list_artifacts(pretrained.run_id, "backbone")}
    assert {WEIGHTS_ARTIFACT, "backbone/spec.json"} <= arts
    images = [a.path for a in client.list_artifacts(pretrained.run_id, "images")]  # stepped image (UI slider)
    assert any("teacher_features" in p and p.endswith(".png") for p in images), images
    assert any(p.startswith("images/pretrain~teacher_features+step+0+") for p in images), images  # cards open at 0
    assert pretrained.weights_path.suffix == ".safetensors"


@pytest.mark.slow
def test_pretrain_to_train_hand_off_by_run_id(pretrained, phantom1, tmp_path):
    result = run_train(_train_config(phantom1, tmp_path, f"runs:/{pretrained.run_id}"))
    run = tracking.client().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["pretrain_run_id"] == pretrained.run_id
    assert run.data.tags["weights_id"].startswith("file:teacher_backbone.safetensors:sha256=")
    # the same weights as the file: features of the train-time backbone equal the teacher's
    a = build_backbone("mra_vit_t4_p4", weights=str(pretrained.weights_path), res=16)
    b = build_backbone("mra_vit_t4_p4", weights=fetch_weights(f"runs:/{pretrained.run_id}"), res=16)
    x = torch.rand(2, 1, 16, 16)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.slow
def test_pretraining_resumes_from_its_last_checkpoint(phantom1, tmp_path):
    first = run_pretrain(_pretrain_config(phantom1, tmp_path, figure_every=0))
    shutil.rmtree(first.output_dir / "checkpoints")  # another machine: the logged checkpoint is fetched
    resumed = run_pretrain(_pretrain_config(phantom1, tmp_path, max_steps=4, figure_every=0, resume=first.run_id))
    assert resumed.run_id == first.run_id
    run = tracking.client().get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["resumed_at_step"] == "2"
    # the record is the last attempt's: max_steps is a tag (params cannot change), the plan.yaml is current
    assert run.data.tags["max_steps"] == "4" and "max_steps" not in run.data.params
    assert run.data.tags["end_reason"] == "max_steps=4 reached"
    plan = tracking.download_artifacts(f"runs:/{first.run_id}/plan.yaml", tmp_path / "dl").read_text()
    assert "max_steps: 4" in plan
    steps = [m.step for m in tracking.client().get_metric_history(first.run_id, "pretrain/loss")]
    assert steps == [1, 2, 3, 4]
    ckpt = torch.load(resumed.output_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["step"] == 4
    assert sorted(p.name for p in resumed.output_dir.iterdir()) == ["backbone", "checkpoints", "plan.yaml"]


def test_clear_errors_for_missing_or_incompatible_backbones(pretrained, tmp_path):
    with pytest.raises(FileNotFoundError, match="neither"):
        build_backbone("mra_vit_t4_p4", weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(ValueError, match=r"\(patch 4, dim 192\) but backbone 'mra_vit_t4_p2' has patch 2"):
        build_backbone("mra_vit_t4_p2", weights=str(pretrained.weights_path))
    with pytest.raises(ValueError, match="use model.backbone=mra_vit_t4_p4"):
        fetch_weights(f"runs:/{pretrained.run_id}", "mra_vit_t12_p4")
    with pytest.raises(ValueError, match="cannot fetch"):
        fetch_weights("runs:/0123456789abcdef0123456789abcdef")
    with pytest.raises(RuntimeError, match="pretrain"):
        build_backbone("mra_vit_t4_p4", weights="hub")
    assert fetch_weights("random") == "random"


def test_pretrain_refuses_a_non_trainable_backbone(phantom1, tmp_path):
    with pytest.raises(ValueError, match="not an in-domain ViT"):
        run_pretrain(_pretrain_config(phantom1, tmp_path, backbone="classical"))


@pytest.mark.slow
def test_a_probe_is_logged_at_the_start_every_n_steps_and_at_the_end(phantom1, tmp_path):
    seen: list[tuple[bool, float]] = []

    def probe(backbone: torch.nn.Module) -> dict[str, float]:
        first = next(backbone.parameters())
        seen.append((backbone.training, float(first.detach().sum())))
        return {"probe/value": float(len(seen))}

    result = run_pretrain(_pretrain_config(phantom1, tmp_path, max_steps=5, figure_every=0), probe=probe,
                          probe_every=2)
    history = tracking.client().get_metric_history(result.run_id, "probe/value")
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (2, 2.0), (4, 3.0), (5, 4.0)]
    assert not any(training for training, _ in seen)  # the teacher is probed in eval mode
    assert seen[0][1] != seen[-1][1]  # ... and it is the teacher being trained, not a copy taken once
