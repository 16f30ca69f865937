"""``train.features=online``: the frozen backbone's features computed in the training step, no disk cache, the
same losses as training on the cached features."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from stego_core.config import load_config
from stego_core.data.cases import DataConfig, ensure_cases
from stego_core.data.phantom import PhantomConfig
from stego_core.features.backbones import build_backbone
from stego_core.features.cache import (
    OnlineFeatures,
    compute_features,
    compute_pooled_features,
    pool_features,
)
from stego_core.methods.stego.settings import TrainSettings
from stego_core.platform import tracking
from stego_core.steps.training import TrainConfig, run_train

#: The cache stores features as float16 (relative rounding <= 2**-11 ~ 4.9e-4 per value); the loss, a smooth
#: function of them, may move by about as much. 1e-3 is twice that; a wrong feature or a different partner moves
#: the loss by percent.
LOSS_RTOL = 1e-3


def _config(data: DataConfig, out: Path, features: str) -> TrainConfig:
    """A tiny STEGO on a randomly initialised in-domain ViT (4 blocks, patch 4) on 16-pixel crops, 4 steps."""
    overrides = {"slicing.patch_size": 16, "slicing.stride": 8, "model.backbone": "mra_vit_t4_p4",
                 "model.weights": "random", "model.res": 16, "model.code_dim": 16, "train.max_steps": 4,
                 "train.val_every_n_steps": 4, "train.batch_size": 8, "train.log_every_n_steps": 1,
                 "train.progress": False, "train.accelerator": "cpu", "train.system_metrics": False,
                 "train.cache_dir": str(out / "feature_cache"), "output": str(out / "train"),
                 "experiment": "online-features", "log_model": False, "train.features": features}
    return dataclasses.replace(load_config(TrainConfig, None, overrides), data=data)


def test_features_setting_default_and_error() -> None:
    assert TrainSettings().features == "cache"
    assert load_config(TrainConfig, None, ["train.features=online"]).train.features == "online"
    with pytest.raises(ValueError, match=r"train\.features='onlin'.*did you mean 'online'"):
        load_config(TrainConfig, None, ["train.features=onlin"])


def test_online_features_and_bank_match_computed_features() -> None:
    bb = build_backbone("mra_vit_t4_p4", weights="random", res=16)
    crops = np.random.default_rng(0).random((5, 16, 16), dtype=np.float32)
    full = compute_features(bb, crops, dtype=np.float32, progress=False)
    lazy = OnlineFeatures(bb, crops)
    assert len(lazy) == 5 and lazy.shape == full.shape
    np.testing.assert_allclose(lazy[1:4], full[1:4], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lazy[np.array([4, 0])], full[[4, 0]], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lazy[2], full[2], rtol=1e-5, atol=1e-6)
    # the bank pools the float16 maps the cache would hold, in chunks
    half = compute_features(bb, crops, dtype=np.float16, progress=False)
    np.testing.assert_array_equal(compute_pooled_features(bb, crops, chunk=2, progress=False), pool_features(half))


@pytest.mark.slow
def test_online_training_has_the_cached_losses_and_writes_no_cache(mlflow_store: str, tmp_path: Path) -> None:
    """4 steps with features from the cache and computed in the step: the same loss at every step (within the
    cache's float16 rounding), the same validation; the online run leaves no feature cache anywhere."""
    data = DataConfig(source="phantom", root=str(tmp_path / "phantoms"),
                      phantom=PhantomConfig(n_volumes=3, shape=(32, 32, 24), seed=0))
    ensure_cases(data)
    before = set(tmp_path.rglob("*"))
    online = run_train(_config(data, tmp_path / "online", "online"))
    written = set(tmp_path.rglob("*")) - before
    assert not (tmp_path / "online" / "feature_cache").exists()
    assert not [p for p in written if p.suffix == ".npy" or "partial" in p.name], sorted(written)
    cached = run_train(_config(data, tmp_path / "cached", "cache"))
    assert list((tmp_path / "cached" / "feature_cache").glob("*.npy"))  # the cached path did cache

    client = tracking.client()
    losses = {}
    for name, result in (("online", online), ("cached", cached)):
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        assert run.data.params["train.features"] == ("online" if name == "online" else "cache")
        history = sorted(client.get_metric_history(result.run_id, "train/loss"), key=lambda m: m.step)
        losses[name] = np.array([m.value for m in history])
    assert len(losses["cached"]) == 4
    np.testing.assert_allclose(losses["online"], losses["cached"], rtol=LOSS_RTOL, atol=0)
    assert client.get_run(online.run_id).data.tags["feature_cache_mb"].startswith("0 ")
    head = {k: v for k, v in torch.load(online.output_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                                        weights_only=False)["state_dict"].items()}
    assert head and not any(k.startswith(("backbone", "_frozen")) for k in head)  # the backbone is not saved
    assert online.metrics["val/dice"] == pytest.approx(cached.metrics["val/dice"], abs=0.02)
