"""Backbones by name: shapes, frozen state, weight files, offline hub failure, classical featurizer."""

from __future__ import annotations

import argparse
import math

import huggingface_hub.constants as hf_constants
import pytest
import torch
from safetensors.torch import save_file

from stego_core.features import base, classical, vit
from stego_core.features.backbones import (
    BACKBONES,
    build_backbone,
    get_spec,
    list_backbones,
)
from stego_core.features.base import to_model_input
from stego_core.features.classical import ClassicalFeaturizer

NAME = "vit_small_patch16_dino"


@pytest.fixture(scope="module")
def vit32():
    """Random ViT-S/16 at res 32 (2 x 2 tokens), seed 1."""
    return build_backbone(NAME, weights="random", res=32, seed=1)


@pytest.fixture(scope="module")
def crops():
    return torch.rand(2, 1, 24, 24, generator=torch.Generator().manual_seed(0))


def test_spec_table():
    assert list_backbones() == sorted(["vit_small_patch8_dino", "vit_small_patch16_dino", "vit_base_patch8_dino",
                                       "vit_base_patch16_dino", "vit_small_patch14_dinov2", "classical",
                                       "mra_vit_t4_p1", "mra_vit_t4_p2", "mra_vit_t4_p4", "mra_vit_t12_p4",
                                       "mra_vit_s12_p8"])
    mra = BACKBONES["mra_vit_t4_p2"]
    assert (mra.vit_patch, mra.embed_dim, mra.res, mra.grid, mra.trainable) == (2, 192, 32, 16, True)
    fine = BACKBONES["mra_vit_t4_p1"]  # one token per voxel of a 16-px crop
    assert (fine.vit_patch, fine.res, fine.grid, fine.trainable) == (1, 16, 16, True)
    assert not BACKBONES["vit_small_patch8_dino"].trainable
    spec = BACKBONES["vit_small_patch8_dino"]
    assert (spec.timm_name, spec.vit_patch, spec.embed_dim, spec.res, spec.grid) == (
        "vit_small_patch8_224.dino", 8, 384, 224, 28)
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225)
    assert get_spec("vit_small_patch8_dino", res=112).grid == 14
    with pytest.raises(TypeError):
        BACKBONES["x"] = spec  # read-only table


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="Did you mean 'vit_small_patch8_dino'") as err:
        build_backbone("vit_smal_patch8_dino", weights="random")
    assert "classical" in str(err.value)  # valid names listed
    with pytest.raises(ValueError, match="multiple of its patch size 16"):
        get_spec(NAME, res=40)


def test_to_model_input_resize_grey_to_rgb_imagenet():
    spec = get_spec(NAME, res=32)
    x = to_model_input(torch.full((2, 1, 8, 8), 0.5), spec)
    assert x.shape == (2, 3, 32, 32)
    for c, (m, s) in enumerate(zip(spec.mean, spec.std)):
        torch.testing.assert_close(x[:, c], torch.full((2, 32, 32), (0.5 - m) / s))
    ramp = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16)
    y = to_model_input(ramp, spec)
    assert torch.all(y[0, 0, :, 1:] >= y[0, 0, :, :-1])  # bilinear upsampling keeps the ramp monotone


def test_vit_random_shape_and_frozen(vit32, crops):
    assert vit32.feature_dim == 384 and vit32.output_shape(24) == (384, 2, 2)
    f = vit32(crops)
    assert f.shape == (2, 384, 2, 2) and f.dtype == torch.float32 and not f.requires_grad
    assert all(not p.requires_grad for p in vit32.parameters())
    vit32.train()
    assert not vit32.training and not any(m.training for m in vit32.modules())
    # the final LayerNorm is applied: each token has ~zero mean over channels before the affine (weight 1, bias 0)
    torch.testing.assert_close(f.mean(dim=1), torch.zeros(2, 2, 2), atol=1e-4, rtol=0)
    # the same crops give the same features (eval: no dropout)
    torch.testing.assert_close(vit32(crops), f)


def test_random_init_seeded_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = build_backbone(NAME, weights="random", res=32, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())
    b = build_backbone(NAME, weights="random", res=32, seed=5)
    torch.testing.assert_close(a.model.pos_embed, b.model.pos_embed)
    assert a.weights_id == "random:seed=5"


def _dino_style(sd: dict) -> dict:
    """Original DINO full-checkpoint layout: teacher/student wrappers, module./backbone. prefixes, DINO head."""
    teacher = {f"module.backbone.{k}": v for k, v in sd.items()}
    teacher["module.head.mlp.0.weight"] = torch.zeros(4, 384)
    return {"teacher": teacher, "student": {k: v + 1 for k, v in teacher.items()}, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16)}


@pytest.mark.parametrize("fmt", ["timm_pth", "dino_pth", "safetensors", "release_pth"])
def test_local_weights_round_trip(vit32, crops, tmp_path, fmt):
    sd = {k: v.clone() for k, v in vit32.model.state_dict().items()}
    if fmt == "timm_pth":
        path = tmp_path / "model.pth"
        torch.save(sd, path)
    elif fmt == "dino_pth":
        path = tmp_path / "dino_full_checkpoint.pth"
        torch.save(_dino_style(sd), path)
    elif fmt == "release_pth":  # dino_deitsmall16_pretrain.pth: a bare dict with timm-compatible keys
        path = tmp_path / "dino_deitsmall16_pretrain.pth"
        torch.save(sd, path)
    else:
        path = tmp_path / "model.safetensors"
        save_file({f"backbone.{k}": v.contiguous() for k, v in sd.items()}, str(path))
    other = build_backbone(NAME, weights="random", res=32, seed=2)
    assert not torch.allclose(other(crops), vit32(crops))
    loaded = build_backbone(NAME, weights=str(path), res=32)
    torch.testing.assert_close(loaded(crops), vit32(crops), rtol=0, atol=0)
    assert loaded.weights_id.startswith(f"file:{path.name}:sha256=")


def test_pos_embed_resampled_to_other_res(vit32, tmp_path):
    path = tmp_path / "w.pth"
    torch.save(vit32.model.state_dict(), path)
    bigger = build_backbone(NAME, weights=path, res=64)
    assert bigger.model.pos_embed.shape == (1, 1 + 16, 384)
    assert bigger(torch.rand(1, 1, 32, 32)).shape == (1, 384, 4, 4)


def test_mismatching_files_raise(vit32, tmp_path):
    path = tmp_path / "s16.pth"
    torch.save(vit32.model.state_dict(), path)
    with pytest.raises(ValueError, match="does not fit backbone 'vit_small_patch8_dino'.*patch_embed"):
        build_backbone("vit_small_patch8_dino", weights=path, res=32)
    with pytest.raises(ValueError, match="does not fit backbone 'vit_base_patch16_dino'"):
        build_backbone("vit_base_patch16_dino", weights=path, res=32)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in vit32.model.state_dict().items() if not k.startswith("blocks.11.")}, partial)
    with pytest.raises(ValueError, match="missing keys.*blocks.11"):
        build_backbone(NAME, weights=partial, res=32)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"junk.pth is not a weights file: .*\(UnpicklingError: Weights only load "
                                         r"failed\)"):
        build_backbone(NAME, weights=junk, res=32)
    with pytest.raises(FileNotFoundError, match="neither 'hub', 'random' nor an existing file"):
        build_backbone(NAME, weights=tmp_path / "absent.pth", res=32)


def test_hub_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache

    def no_network(*args, **kwargs):
        raise AssertionError("offline mode must not touch the network")

    monkeypatch.setattr(vit, "_hub_reachable", no_network)
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE") as err:
        build_backbone("vit_small_patch8_dino", weights="hub", res=32)
    assert "weights='/path/to/dino_deitsmall8_pretrain.pth'" in str(err.value)


def test_hub_unreachable_fails_with_instructions(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(vit, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match="unreachable.*weights='/path/to/dino_deitsmall16_pretrain.pth'"):
        build_backbone(NAME, weights="hub", res=32)


def test_hub_uses_local_cache_offline(vit32, crops, monkeypatch, tmp_path):
    snap = tmp_path / "models--timm--vit_small_patch16_224.dino" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    save_file({k: v.contiguous() for k, v in vit32.model.state_dict().items()}, str(snap / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    bb = build_backbone(NAME, weights="hub", res=32)
    torch.testing.assert_close(bb(crops), vit32(crops), rtol=0, atol=0)
    assert bb.weights_id.startswith("hub:timm/vit_small_patch16_224.dino/model.safetensors:sha256=")


def test_dinov2_random_drops_prefix_tokens():
    bb = build_backbone("vit_small_patch14_dinov2", weights="random", res=28)
    assert bb(torch.rand(1, 1, 16, 16)).shape == (1, 384, 2, 2)


# ---------------------------------------------------------------------------------------------------------
# Classical featurizer


def testgaussian_derivative_kernels_exact_on_polynomials():
    for sigma in (0.5, 1.0, 3.0):
        g, d1, d2 = classical.gaussian_derivative_kernels(sigma).double()
        r = g.numel() // 2
        x = torch.arange(-r, r + 1, dtype=torch.float64)
        assert g.sum().item() == pytest.approx(1.0)
        assert (d1 * x).sum().item() == pytest.approx(1.0) and d1.sum().item() == pytest.approx(0.0, abs=1e-6)
        assert (d2 * x**2).sum().item() == pytest.approx(2.0) and d2.sum().item() == pytest.approx(0.0, abs=1e-6)
        assert r == max(1, math.ceil(3 * sigma))


def test_classical_shape_and_weights_ignored():
    bb = build_backbone("classical", weights="/nonexistent/file.pth", res=8)
    assert isinstance(bb, ClassicalFeaturizer)
    f = bb(torch.rand(3, 1, 20, 20))
    assert f.shape == (3, 21, 8, 8) and len(bb.channel_names) == 21 == bb.feature_dim
    assert torch.isfinite(f).all() and not any(p.requires_grad for p in bb.parameters())
    assert bb.output_shape(20) == (21, 8, 8)
    bb.train()
    assert not bb.training


@pytest.mark.parametrize("standardize", ["crop", "fixed"])
@pytest.mark.parametrize("vertical", [True, False])
def test_classical_vesselness_peaks_on_bright_tube(standardize, vertical):
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    dist = (xx - 16.5).abs() if vertical else (yy - 16.5).abs()
    crop = 0.2 + 0.6 * (1.5 + 0.5 - dist).clamp(0, 1)  # tube of radius 1.5 voxels, partial-volume edge
    bb = build_backbone("classical", res=16, standardize=standardize)
    f = bb(crop.view(1, 1, 32, 32))[0]
    for name in ("vesselness_s1", "vesselness_s2"):
        v = f[bb.channel_names.index(name)]
        profile = v.mean(dim=0) if vertical else v.mean(dim=1)  # across the tube
        assert profile.argmax().item() == 8, name  # grid cell 8 covers voxels 16-17
        assert profile[8] > profile[2] + 1.0 and profile[8] > profile[13] + 1.0, name
    flat = bb(torch.full((1, 1, 32, 32), 0.4))[0, bb.channel_names.index("vesselness_s1")]
    assert flat.abs().max().item() < 1e-3


def test_classical_derivatives_equal_one_convolution_per_derivative():
    """The fast path (one row pass, one grouped column pass per scale) equals separate separable convolutions."""
    import torch.nn.functional as F

    from stego_core.features.classical import ClassicalFeaturizer, gaussian_derivative_kernels

    def sep(x, ky, kx):
        ry, rx = ky.numel() // 2, kx.numel() // 2
        x = F.conv2d(F.pad(x, (0, 0, ry, ry), mode="replicate"), ky.view(1, 1, -1, 1))
        return F.conv2d(F.pad(x, (rx, rx, 0, 0), mode="replicate"), kx.view(1, 1, 1, -1))

    featurizer = ClassicalFeaturizer(get_spec("classical", res=8))
    x = torch.rand(4, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    for i, sigma in enumerate(featurizer.sigmas_vox):
        g, d1, d2 = gaussian_derivative_kernels(sigma)
        plain = (sep(x, g, g), sep(x, g, d1), sep(x, d1, g), sep(x, g, d2), sep(x, d2, g), sep(x, d1, d1))
        for fast, ref in zip(featurizer._derivatives(x, i), plain):
            assert torch.allclose(fast, ref, atol=1e-6)


def test_in_domain_vit_builds_at_the_crop_scale():
    bb = build_backbone("mra_vit_t4_p2", weights="random")
    assert bb(torch.rand(2, 1, 32, 32)).shape == (2, 192, 16, 16)


def test_forward_batch_size_keeps_the_largest_activation_in_a_quarter_of_the_cache(monkeypatch):
    """Crops per forward pass shrink as the model's largest activation grows, never below 1 or above the cap."""
    from stego_core.features.base import (
        activation_bytes_per_crop,
        cpu_cache_bytes,
        forward_batch_size,
    )

    cache = cpu_cache_bytes()
    assert cache > 0
    small, large = get_spec("vit_small_patch16_dino", res=64), get_spec("vit_small_patch8_dino", res=224)
    assert activation_bytes_per_crop(small) == 17 * 4 * 384 * 4  # (8x8 + CLS) tokens x MLP hidden x fp32
    assert activation_bytes_per_crop(large, dtype_bytes=2) == 785 * 4 * 384 * 2
    for spec in (small, get_spec("mra_vit_t4_p2"), large, get_spec("classical")):
        batch = forward_batch_size(spec, "cpu")
        assert batch == max(1, min(1024, cache // 4 // activation_bytes_per_crop(spec)))
    assert forward_batch_size(small, "cpu") > forward_batch_size(get_spec("mra_vit_t4_p2"), "cpu") \
        >= forward_batch_size(large, "cpu") >= 1
    assert forward_batch_size(small, "cpu", max_batch=3) == 3
    monkeypatch.setattr(base, "cpu_cache_bytes", lambda: 1024)  # a tiny cache still gives one crop
    assert forward_batch_size(large, "cpu") == 1
