"""Feature computation, the on-disk cache and its staleness check, the kNN table."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stego_core.features import cache as feat_mod
from stego_core.features.backbones import build_backbone
from stego_core.features.cache import (
    FeatureCacheMeta,
    compute_features,
    crops_digest,
    draw_knn_partners,
    knn_table,
    load_features,
    load_or_compute_features,
    pool_features,
)


@pytest.fixture(scope="module")
def classical():
    return build_backbone("classical", res=8)


@pytest.fixture()
def crops():
    return np.random.default_rng(0).random((7, 16, 16), dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------
# kNN


def test_knn_on_hand_made_vectors():
    # two tight groups in 3D; cosine ignores the norm (item 2 is item 0 scaled by 5)
    v = np.array([[1.0, 0.0, 0.0], [0.9, 0.2, 0.0], [5.0, 0.5, 0.0],
                  [0.0, 0.0, 1.0], [0.0, 0.3, 1.0], [0.1, 0.0, 2.0]], dtype=np.float32)
    knn = knn_table(v, k=3)
    assert knn.dtype == np.int64 and knn.shape == (6, 3)
    np.testing.assert_array_equal(knn, [[0, 2, 1], [1, 2, 0], [2, 0, 1], [3, 5, 4], [4, 3, 5], [5, 3, 4]])
    # (N, C, h, w) input is global-average pooled first: same table
    maps = np.repeat(np.repeat(v[:, :, None, None], 2, axis=2), 3, axis=3)
    maps[:, :, 0, 0] += 1.0  # the pooled mean changes by 1/6 per channel ...
    maps[:, :, 1, 2] -= 1.0  # ... and back
    np.testing.assert_array_equal(knn_table(maps, k=3), knn)


def test_knn_self_first_even_with_duplicates_and_small_n():
    same = np.ones((5, 4), dtype=np.float32)
    knn = knn_table(same, k=3)
    np.testing.assert_array_equal(knn[:, 0], np.arange(5))
    assert all(i not in row[1:] for i, row in enumerate(knn))
    assert all(len(set(row)) == 3 for row in knn)
    small = knn_table(np.eye(3, dtype=np.float32), k=30)  # N <= k
    assert small.shape == (3, 3)
    np.testing.assert_array_equal(small[:, 0], [0, 1, 2])
    with pytest.raises(ValueError, match="k="):
        knn_table(same, k=0)


def test_pool_features_chunked():
    f = np.random.default_rng(1).random((5, 3, 2, 2)).astype(np.float16)
    np.testing.assert_allclose(pool_features(f, chunk=2), f.astype(np.float32).mean(axis=(2, 3)), rtol=1e-6)


def test_draw_knn_partners_from_ranks_1_to_rank_max():
    n, k = 20, 10
    knn = np.stack([np.r_[i, [(i + j) % n for j in range(1, k)]] for i in range(n)]).astype(np.int64)
    rng = np.random.default_rng(0)
    idx = np.repeat(np.arange(n), 50)
    partners = draw_knn_partners(knn, idx, rank_max=7, rng=rng)
    offsets = (partners - idx) % n
    assert offsets.min() == 1 and offsets.max() == 7  # ranks 1..7, never self, all reached
    same = draw_knn_partners(knn, idx, rank_max=7, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(partners, same)
    np.testing.assert_array_equal(draw_knn_partners(knn[:, :1], np.arange(3), rng=rng), [0, 1, 2])
    assert ((draw_knn_partners(knn[:, :3], idx, rank_max=7, rng=rng) - idx) % n).max() == 2  # capped at k-1


# ---------------------------------------------------------------------------------------------------------
# Compute and cache


def test_compute_features_memory_and_memmap_agree(classical, crops, tmp_path):
    mem = compute_features(classical, crops, batch_size=3, progress=False)
    assert mem.shape == (7, 21, 8, 8) and mem.dtype == np.float16
    want = classical(torch.from_numpy(crops)[:, None]).numpy().astype(np.float16)
    np.testing.assert_allclose(mem.astype(np.float32), want.astype(np.float32), rtol=2e-3, atol=1e-3)
    out = tmp_path / "f.npy"
    mm = compute_features(classical, crops, batch_size=4, out_path=out, progress=False)
    assert isinstance(mm, np.memmap)
    np.testing.assert_allclose(np.load(out).astype(np.float32), mem.astype(np.float32), rtol=2e-3, atol=1e-3)
    f32 = compute_features(classical, crops, dtype=np.float32, progress=False)
    assert f32.dtype == np.float32


def test_compute_features_vit(crops):
    vit = build_backbone("vit_small_patch16_dino", weights="random", res=32)
    f = compute_features(vit, crops[:3], batch_size=2, progress=False)
    assert f.shape == (3, 384, 2, 2)
    np.testing.assert_allclose(f.astype(np.float32), vit(torch.from_numpy(crops[:3])[:, None]).numpy(),
                               rtol=2e-3, atol=2e-3)  # float16 storage


def test_compute_features_rejects_bad_crops(classical):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        compute_features(classical, np.full((2, 8, 8), 3.0, np.float32), progress=False)
    with pytest.raises(ValueError, match="crops must be 3D"):
        compute_features(classical, np.zeros((8, 8), np.float32), progress=False)
    with pytest.raises(ValueError, match="NaN"):
        compute_features(classical, np.full((2, 8, 8), np.nan, np.float32), progress=False)


def test_cache_round_trip_and_staleness(classical, crops, tmp_path, monkeypatch):
    calls = []
    real = feat_mod.compute_features

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(feat_mod, "compute_features", counting)
    path = tmp_path / "cache" / "features.npy"
    f1, meta = load_or_compute_features(classical, crops, path, progress=False)
    assert len(calls) == 1 and isinstance(f1, np.memmap) and f1.shape == (7, 21, 8, 8)
    stored = json.loads(path.with_suffix(".json").read_text())
    assert stored["backbone"] == "classical" and stored["res"] == 8 and stored["crop_digest"] == crops_digest(crops)
    assert stored["shape"] == [7, 21, 8, 8] and stored["dtype"] == "float16"

    f2, meta2 = load_or_compute_features(classical, crops, path, progress=False)  # valid: loaded
    assert len(calls) == 1 and meta2 == meta
    np.testing.assert_array_equal(f2, f1)

    changed = crops.copy()
    changed[0, 0, 0] = 1.0 - changed[0, 0, 0]
    f3, meta3 = load_or_compute_features(classical, changed, path, progress=False)  # other crops: stale
    assert len(calls) == 2 and meta3.crop_digest != meta.crop_digest
    np.testing.assert_array_equal(f3, compute_features(classical, changed, progress=False))

    other = build_backbone("classical", res=4)  # other backbone config: stale
    f4, meta4 = load_or_compute_features(other, changed, path, progress=False)
    assert len(calls) == 3 and f4.shape == (7, 21, 4, 4) and meta4.res == 4

    path.with_suffix(".json").unlink()  # no metadata = incomplete: recomputed
    load_or_compute_features(other, changed, path, progress=False)
    assert len(calls) == 4
    features, meta5 = load_features(path)
    assert meta5 == meta4 and features.shape == (7, 21, 4, 4)


def test_crops_digest_sensitive_to_content_shape_dtype(crops):
    d = crops_digest(crops)
    assert d == crops_digest(crops.copy()) and len(d) == 32
    assert d != crops_digest(crops.reshape(7, 8, 32))
    assert d != crops_digest(crops.astype(np.float64))
    c2 = crops.copy()
    c2[-1, -1, -1] += 1e-3
    assert d != crops_digest(c2)


def test_meta_json_rejects_unknown_keys():
    meta = FeatureCacheMeta("classical", 8, "none", "abc", (1, 21, 8, 8), "float16")
    assert FeatureCacheMeta.from_json(meta.to_json()) == meta
    bad = json.loads(meta.to_json()) | {"colour": "red"}
    with pytest.raises(ValueError, match="colour"):
        FeatureCacheMeta.from_json(json.dumps(bad))
