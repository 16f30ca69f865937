"""STEGO head, correspondence loss, probes and cluster -> vessel mapping, checked against direct loops."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stego_core.methods.stego.mapping import (
    bright_cut,
    cluster_vessel_probability,
    map_clusters_bright_cut,
    map_clusters_dice,
    map_clusters_hungarian,
    map_clusters_majority,
    map_clusters_unsupervised,
    vessel_clusters,
)
from stego_core.methods.stego.model import (
    ClusterProbe,
    LinearProbe,
    LossConfig,
    StegoHead,
    centre_correlation,
    correspondence_loss,
    correspondence_term,
    random_derangement,
    sample_grid,
    sample_points,
    tensor_correlation,
)

# ---------------------------------------------------------------------------------------------------------
# Direct, per-point reference implementations (float64 numpy, no vectorisation)


def loop_sample(t: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Bilinear sampling, align_corners=True, border padding. t (B,C,H,W), coords (B,n,m,2) -> (B,C,n,m)."""
    b_, c_, hh, ww = t.shape
    _, n, m, _ = coords.shape
    out = np.zeros((b_, c_, n, m))
    for b in range(b_):
        for i in range(n):
            for j in range(m):
                gx, gy = coords[b, i, j]
                x = min(max((gx + 1) / 2 * (ww - 1), 0), ww - 1)
                y = min(max((gy + 1) / 2 * (hh - 1), 0), hh - 1)
                x0, y0 = int(math.floor(x)), int(math.floor(y))
                x1, y1 = min(x0 + 1, ww - 1), min(y0 + 1, hh - 1)
                ax, ay = x - x0, y - y0
                for c in range(c_):
                    out[b, c, i, j] = ((1 - ay) * ((1 - ax) * t[b, c, y0, x0] + ax * t[b, c, y0, x1])
                                       + ay * ((1 - ax) * t[b, c, y1, x0] + ax * t[b, c, y1, x1]))
    return out


def loop_cos(u: np.ndarray, v: np.ndarray) -> float:
    return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))


def loop_term(f1, f2, c1, c2, shift):
    """mean(-max(S,0) * (F_centred - shift)) with every correlation computed point by point."""
    b_, _, n, m = f1.shape
    pts = list(itertools.product(range(n), range(m)))
    fcorr = np.zeros((b_, len(pts), len(pts)))
    scorr = np.zeros_like(fcorr)
    for b in range(b_):
        for q, (h, w) in enumerate(pts):
            for t, (i, j) in enumerate(pts):
                fcorr[b, q, t] = loop_cos(f1[b, :, h, w], f2[b, :, i, j])
                scorr[b, q, t] = loop_cos(c1[b, :, h, w], c2[b, :, i, j])
    global_mean = fcorr.mean()
    total = 0.0
    for b in range(b_):
        for q in range(len(pts)):
            row_mean = fcorr[b, q].mean()
            for t in range(len(pts)):
                f_c = fcorr[b, q, t] - row_mean + global_mean
                total += -max(scorr[b, q, t], 0.0) * (f_c - shift)
    return total / fcorr.size


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.fixture()
def tiny():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    codes = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    knn_feats = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64)
    knn_codes = torch.randn(3, 5, 4, 4, generator=g, dtype=torch.float64)
    return feats, codes, knn_feats, knn_codes


# ---------------------------------------------------------------------------------------------------------
# Head


def test_head_shape_code_dim_and_formula():
    torch.manual_seed(0)
    head = StegoHead(6, code_dim=4, dropout=0.1).eval()
    f = torch.randn(2, 6, 3, 5)
    code = head(f)
    assert code.shape == (2, 4, 3, 5) and head.code_dim == 4
    assert head.linear.weight.shape == (4, 6, 1, 1)
    lin = torch.einsum("oc,bchw->bohw", head.linear.weight[:, :, 0, 0], f) + head.linear.bias.view(1, -1, 1, 1)
    c0, c1 = head.nonlinear[0], head.nonlinear[2]
    hid = torch.relu(torch.einsum("oc,bchw->bohw", c0.weight[:, :, 0, 0], f) + c0.bias.view(1, -1, 1, 1))
    nonlin = torch.einsum("oc,bchw->bohw", c1.weight[:, :, 0, 0], hid) + c1.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(code, lin + nonlin, rtol=1e-5, atol=1e-5)
    assert StegoHead(384)(torch.zeros(1, 384, 2, 2)).shape == (1, 70, 2, 2)  # default code dim 70


def test_head_dropout_drops_whole_feature_channels_in_training():
    head = StegoHead(64, code_dim=3, dropout=0.5).train()
    torch.manual_seed(1)
    f = torch.ones(1, 64, 2, 2)
    a, b = head(f), head(f)
    assert not torch.allclose(a, b)  # dropout active in training
    head.eval()
    torch.testing.assert_close(head(f), head(f))
    with pytest.raises(ValueError, match="feats"):
        head(torch.zeros(1, 5, 2, 2))


# ---------------------------------------------------------------------------------------------------------
# Sampling and correlation


def test_sample_grid_range_and_reproducible():
    c1 = sample_grid(4, 11, generator=torch.Generator().manual_seed(3))
    c2 = sample_grid(4, 11, generator=torch.Generator().manual_seed(3))
    assert c1.shape == (4, 11, 11, 2)
    assert c1.min() >= -1 and c1.max() <= 1 and c1.min() < -0.9 and c1.max() > 0.9
    torch.testing.assert_close(c1, c2)


def test_sample_points_matches_manual_bilinear():
    t = torch.arange(2 * 2 * 4 * 4, dtype=torch.float64).reshape(2, 2, 4, 4) ** 1.5
    coords = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [-0.3, 0.7], [1.4, -2.0], [0.2, 1.1],
                           [-1.0, 0.5], [0.9, -0.9], [0.33, 0.33]], dtype=torch.float64)
    coords = torch.stack([coords.view(3, 3, 2), coords.flip(0).view(3, 3, 2)])
    got = sample_points(t, coords)
    torch.testing.assert_close(got, torch.from_numpy(loop_sample(_np(t), _np(coords))), rtol=1e-9, atol=1e-9)
    # corners are exact pixel values (align_corners=True); outside points clamp to the border
    assert got[0, 0, 0, 0] == t[0, 0, 0, 0] and got[0, 0, 0, 1] == t[0, 0, 3, 3]


def test_tensor_correlation_is_pointwise_cosine(tiny):
    feats, codes, *_ = tiny
    corr = tensor_correlation(feats[:, :, :2, :3], codes[:, :3, :2, :2])
    assert corr.shape == (3, 2, 3, 2, 2)
    want = loop_cos(_np(feats)[1, :, 1, 2], _np(codes)[1, :3, 0, 1])
    assert corr[1, 1, 2, 0, 1].item() == pytest.approx(want, abs=1e-12)


def test_centre_correlation_by_hand():
    corr = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 2, 1, 1, 2)  # two query rows, two targets
    # row means 2 and 6, global mean 4: each row minus its mean, plus 4
    torch.testing.assert_close(centre_correlation(corr).flatten(), torch.tensor([3.0, 5.0, 3.0, 5.0]))
    r = torch.randn(2, 3, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = centre_correlation(r)
    row_means = c.mean(dim=(3, 4))
    torch.testing.assert_close(row_means, torch.full_like(row_means, r.mean().item()))
    torch.testing.assert_close(c - r, (c - r).mean(dim=(3, 4), keepdim=True).expand_as(r))  # a per-row offset


def test_correspondence_term_matches_loop(tiny):
    feats, codes, knn_feats, knn_codes = tiny
    f1, f2 = feats[:, :, :3, :3], knn_feats[:, :, 1:, 1:]
    c1, c2 = codes[:, :, :3, :3], knn_codes[:, :, 1:, 1:]
    loss, cd = correspondence_term(f1, f2, c1, c2, 0.3)
    assert loss.item() == pytest.approx(loop_term(_np(f1), _np(f2), _np(c1), _np(c2), 0.3), abs=1e-5)
    assert cd.shape == (3, 3, 3, 3, 3)
    # codes with negative correlation everywhere contribute nothing (clamp at 0)
    pos = c1[:, :1].abs() + 0.1
    zero, _ = correspondence_term(f1, f1, pos, -pos, 0.3)
    assert zero.item() == pytest.approx(0.0, abs=1e-12)


def test_correspondence_term_gradient_only_through_codes(tiny):
    feats, codes, *_ = tiny
    f = feats.clone().requires_grad_(True)
    c = codes.clone().requires_grad_(True)
    loss, _ = correspondence_term(f, f, c, c, 0.1)
    loss.backward()
    assert f.grad is None and c.grad is not None and c.grad.abs().sum() > 0


def test_random_derangement_has_no_fixed_points():
    g = torch.Generator().manual_seed(0)
    for n in range(2, 9):
        for _ in range(50):
            p = random_derangement(n, generator=g)
            assert sorted(p.tolist()) == list(range(n))
            assert all(p[i].item() != i for i in range(n))
    assert random_derangement(2, generator=g).tolist() == [1, 0]
    seen = {tuple(random_derangement(3, generator=g).tolist()) for _ in range(60)}
    assert seen == {(1, 2, 0), (2, 0, 1)}  # both derangements of 3 items occur
    with pytest.raises(ValueError, match="n >= 2"):
        random_derangement(1)


def _loop_loss(feats, codes, knn_feats, knn_codes, cfg, seed):
    """Replays correspondence_loss's draws (query grid, target grid, self grid, derangements) and loops."""
    g = torch.Generator().manual_seed(seed)
    b, n = feats.shape[0], cfg.n_points
    co1, co2 = _np(sample_grid(b, n, generator=g)), _np(sample_grid(b, n, generator=g))
    co3 = co1 if cfg.intra_same_points else _np(sample_grid(b, n, generator=g))
    f, c, kf, kc = _np(feats), _np(codes), _np(knn_feats), _np(knn_codes)
    f1, c1 = loop_sample(f, co1), loop_sample(c, co1)
    intra = loop_term(f1, loop_sample(f, co3), c1, loop_sample(c, co3), cfg.pos_intra_shift)
    inter = loop_term(f1, loop_sample(kf, co2), c1, loop_sample(kc, co2), cfg.pos_inter_shift)
    negs = []
    for _ in range(cfg.neg_samples):
        p = random_derangement(b, generator=g).numpy()
        negs.append(loop_term(f1, loop_sample(f[p], co2), c1, loop_sample(c[p], co2), cfg.neg_inter_shift))
    neg = float(np.mean(negs))
    total = cfg.pos_intra_weight * intra + cfg.pos_inter_weight * inter + cfg.neg_inter_weight * neg
    return total, {"pos_intra": intra, "pos_inter": inter, "neg_inter": neg}


@pytest.mark.parametrize("same_points", [False, True])
def test_correspondence_loss_matches_loop(tiny, same_points):
    feats, codes, knn_feats, knn_codes = tiny
    cfg = LossConfig(n_points=3, neg_samples=2, intra_same_points=same_points)
    total, terms = correspondence_loss(feats, codes, knn_feats, knn_codes, cfg,
                                       generator=torch.Generator().manual_seed(7))
    want_total, want_terms = _loop_loss(feats, codes, knn_feats, knn_codes, cfg, seed=7)
    assert total.item() == pytest.approx(want_total, abs=1e-5)
    for key, value in want_terms.items():
        assert terms[key].item() == pytest.approx(value, abs=1e-5), key


def _plain_torch_loss(feats, codes, knn_feats, knn_codes, cfg, generator):
    """The loss as first written: one grid_sample per tensor and term, negatives by permuting whole maps."""
    b, n = feats.shape[0], cfg.n_points
    co1, co2 = sample_grid(b, n, generator=generator), sample_grid(b, n, generator=generator)
    co3 = co1 if cfg.intra_same_points else sample_grid(b, n, generator=generator)
    f1, c1 = sample_points(feats.float(), co1), sample_points(codes, co1)
    intra, _ = correspondence_term(f1, sample_points(feats.float(), co3), c1, sample_points(codes, co3),
                                   cfg.pos_intra_shift)
    inter, _ = correspondence_term(f1, sample_points(knn_feats.float(), co2), c1, sample_points(knn_codes, co2),
                                   cfg.pos_inter_shift)
    negs = []
    for _ in range(cfg.neg_samples):
        p = random_derangement(b, generator=generator)
        negs.append(correspondence_term(f1, sample_points(feats[p].float(), co2), c1, sample_points(codes[p], co2),
                                        cfg.neg_inter_shift)[0])
    return (cfg.pos_intra_weight * intra + cfg.pos_inter_weight * inter
            + cfg.neg_inter_weight * torch.stack(negs).mean())


@pytest.mark.parametrize("same_points", [False, True])
def test_correspondence_loss_one_sampling_call_equals_the_plain_path(same_points):
    """Values and gradients of the fused sampling equal the per-term path's (float32, realistic shapes)."""
    g = torch.Generator().manual_seed(3)
    feats, knn_feats = torch.randn(6, 16, 7, 7, generator=g).half(), torch.randn(6, 16, 7, 7, generator=g).half()
    head = torch.nn.Conv2d(16, 5, 1)
    cfg = LossConfig(n_points=5, neg_samples=3, intra_same_points=same_points)
    results = []
    for loss_fn in (correspondence_loss, _plain_torch_loss):
        head.zero_grad()
        codes, knn_codes = head(feats.float()), head(knn_feats.float())
        total = loss_fn(feats, codes, knn_feats, knn_codes, cfg, generator=torch.Generator().manual_seed(11))
        total = total[0] if isinstance(total, tuple) else total
        total.backward()
        results.append((total.detach(), head.weight.grad.clone(), head.bias.grad.clone()))
    (fused, *fused_grads), (plain, *plain_grads) = results
    assert fused.item() == pytest.approx(plain.item(), abs=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
    assert plain_grads[0].abs().sum() > 0


def test_correspondence_loss_trains_codes_and_validates(tiny):
    feats, codes, knn_feats, knn_codes = tiny
    c = codes.clone().requires_grad_(True)
    total, terms = correspondence_loss(feats, c, None, None, LossConfig(n_points=3, neg_samples=1),
                                       generator=torch.Generator().manual_seed(0))
    assert set(terms) == {"pos_intra", "neg_inter"}  # kNN term skipped when no partner is given
    total.backward()
    assert c.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="batch of >= 2"):
        correspondence_loss(feats[:1], codes[:1], None, None)
    total1, terms1 = correspondence_loss(feats[:1], codes[:1], None, None, LossConfig(neg_inter_weight=0))
    assert set(terms1) == {"pos_intra"}
    with pytest.raises(ValueError, match="together"):
        correspondence_loss(feats, codes, knn_feats, None)


def test_loss_config_defaults_and_validation():
    cfg = LossConfig()
    assert (cfg.pos_intra_weight, cfg.pos_intra_shift, cfg.pos_inter_weight, cfg.pos_inter_shift,
            cfg.neg_inter_weight, cfg.neg_inter_shift, cfg.neg_samples, cfg.n_points, cfg.knn_rank_max) == (
        0.67, 0.18, 0.25, 0.12, 0.63, 0.46, 5, 11, 7)
    with pytest.raises(ValueError, match="neg_inter_weight"):
        LossConfig(neg_inter_weight=-1)
    with pytest.raises(ValueError, match="n_points"):
        LossConfig(n_points=0)
    with pytest.raises(ValueError, match="pos_intra_shift"):
        LossConfig(pos_intra_shift=float("nan"))


# ---------------------------------------------------------------------------------------------------------
# Probes


def _two_cluster_codes(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    u = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    truth = torch.randint(0, 2, (6, 4, 4), generator=g)
    sign = (truth * 2 - 1).float()
    codes = sign[:, None] * u.view(1, -1, 1, 1) * 3 + 0.3 * torch.randn(6, 8, 4, 4, generator=g)
    return codes, truth


def test_cluster_probe_recovers_two_clusters():
    codes, truth = _two_cluster_codes()
    probe = ClusterProbe(8, 2, generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    first, _ = probe(codes)
    for _ in range(150):
        loss, probs = probe(codes.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first.item() - 0.1 and loss.item() < -0.9
    assert probs.shape == (6, 2, 4, 4) and set(probs.unique().tolist()) == {0.0, 1.0}
    pred = probe.predict(codes)
    agree = (pred == truth).float().mean().item()
    assert max(agree, 1 - agree) == 1.0
    soft = probe.probabilities(codes, alpha=2.0)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(6, 4, 4))
    assert (soft.argmax(dim=1) == pred).all()


def test_cluster_probe_needs_two_clusters():
    with pytest.raises(ValueError, match="n_clusters"):
        ClusterProbe(8, 1)


def test_linear_probe_learns_trivial_mapping():
    codes, truth = _two_cluster_codes(2)
    labels = truth.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (6, 8, 8) crop-resolution labels
    labels[:, 0, :] = -1  # unlabelled row: ignored
    probe = LinearProbe(8, 2)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(100):
        loss = probe.loss(codes.detach(), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert (probe(codes).argmax(dim=1) == truth).all()
    empty = probe.loss(codes, torch.full((6, 8, 8), -1))
    assert empty.item() == 0.0


# ---------------------------------------------------------------------------------------------------------
# Cluster -> vessel


def test_hungarian_on_swapped_labels():
    ids = np.array([0, 0, 0, 1, 1, 1, 1])
    labels = np.array([1, 1, 0, 0, 0, 0, -1])
    assert map_clusters_hungarian(ids, labels, 2).tolist() == [True, False]
    assert map_clusters_hungarian(1 - ids, labels, 2).tolist() == [False, True]  # cluster ids swapped
    with pytest.raises(ValueError, match="no vessel"):
        map_clusters_hungarian(ids, np.zeros(7, int), 2)
    with pytest.raises(ValueError, match="cluster_ids"):
        map_clusters_hungarian(ids + 5, labels, 2)


def test_majority_mapping():
    ids = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 0, 1])
    assert map_clusters_majority(ids, labels, 4).tolist() == [True, False, False, False]  # cluster 3 empty
    # balanced: vessel share of cluster 1 (1/4) > background share (2/5)? no; cluster 2: 1/4 < 3/5
    assert map_clusters_majority(ids, labels, 3, balanced=True).tolist() == [True, False, False]


def test_dice_mapping_against_every_union():
    """The Dice rule's union equals the best of all 2^K unions on random cluster maps (ties aside)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        k = 5
        ids = rng.integers(0, k, 200)
        labels = (rng.random(200) < np.array([0.9, 0.5, 0.2, 0.05, 0.0])[ids]).astype(int)
        labels[rng.random(200) < 0.1] = -1  # unlabelled pixels are ignored
        ok = labels >= 0

        def dice(mask):
            pred = mask[ids][ok]
            return 2 * (pred & (labels[ok] == 1)).sum() / (pred.sum() + (labels[ok] == 1).sum())

        best = max(dice(np.array(bits, bool)) for bits in itertools.product([0, 1], repeat=k) if any(bits))
        assert dice(map_clusters_dice(ids, labels, k)) == pytest.approx(best)
    m, r = vessel_clusters("dice", cluster_ids=np.array([0, 0, 1]), n_clusters=2, labels=np.array([1, 1, 0]))
    assert r == "dice" and m.tolist() == [True, False]
    with pytest.raises(ValueError, match="no vessel"):
        map_clusters_dice(np.array([0, 1]), np.array([0, 0]), 2)


def test_brightness_rule_and_vessel_clusters():
    ids = np.array([[0, 1], [2, 1]])
    intens = np.array([[0.2, 0.9], [0.5, 0.7]])
    mask, rule = map_clusters_unsupervised(ids, intens, 4)
    assert mask.tolist() == [False, True, False, False] and rule == "brightness"
    assert vessel_clusters("auto", cluster_ids=ids, n_clusters=3, intensities=intens)[1] == "brightness"
    labels = np.array([[0, 1], [0, 1]])
    m2, r2 = vessel_clusters("auto", cluster_ids=ids % 2, n_clusters=2, labels=labels)
    assert r2 == "hungarian" and m2.tolist() == [False, True]
    m3, r3 = vessel_clusters("auto", cluster_ids=ids, n_clusters=3, labels=labels)
    assert r3 == "majority" and m3.tolist() == [False, True, False]
    with pytest.raises(ValueError, match="needs labels"):
        vessel_clusters("hungarian", cluster_ids=ids, n_clusters=3)
    with pytest.raises(ValueError, match="rule"):
        vessel_clusters("vote", cluster_ids=ids, n_clusters=3)


def test_cluster_vessel_probability():
    probs = torch.zeros(2, 3, 2, 2)
    probs[:, 0], probs[:, 1], probs[:, 2] = 0.5, 0.3, 0.2
    probs[1, :, 0, 0] = torch.tensor([0.0, 1.0, 0.0])
    out = cluster_vessel_probability(probs, np.array([True, False, True]), 8, combine="sum")
    assert out.shape == (2, 1, 8, 8)
    torch.testing.assert_close(out[0], torch.full((1, 8, 8), 0.7))
    assert out[1, 0, 0, 0].item() == pytest.approx(0.0) and out[1, 0, -1, -1].item() == pytest.approx(0.7)
    # default "max": best vessel cluster against best background cluster, 0.5 / (0.5 + 0.3)
    out = cluster_vessel_probability(probs, np.array([True, False, True]), 8)
    torch.testing.assert_close(out[0], torch.full((1, 8, 8), 0.625))
    # K = 12, one vessel cluster winning the argmax: "sum" stays below 0.5, "max" is above it
    probs12 = torch.softmax(2.0 * torch.tensor([1.0] + [0.0] * 11), 0).view(1, 12, 1, 1)
    vessel12 = np.array([True] + [False] * 11)
    assert cluster_vessel_probability(probs12, vessel12, 1, combine="sum").item() < 0.5
    assert cluster_vessel_probability(probs12, vessel12, 1).item() == pytest.approx(1 / (1 + np.exp(-2.0)))
    with pytest.raises(ValueError, match="vessel_mask"):
        cluster_vessel_probability(probs, np.array([True, False]), 8)


def test_linear_probe_balanced_loss_weights_classes_by_inverse_frequency():
    torch.manual_seed(0)
    probe = LinearProbe(4, 2)
    codes = torch.randn(2, 4, 4, 4)
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, 0, :2] = 1  # 2 vessel pixels of 32
    logits = probe(codes)
    weight = torch.tensor([32 / (2 * 30), 32 / (2 * 2)])
    expected = F.cross_entropy(logits, labels, weight=weight)
    assert torch.allclose(probe.loss(codes, labels), expected)
    assert torch.allclose(probe.loss(codes, labels, balanced=False), F.cross_entropy(logits, labels))


def test_brightness_rule_ignores_tiny_clusters():
    # cluster 2 is the brightest but holds 2 pixels of 10,000: not a vessel class; cluster 1 (bright, 5 %) is.
    ids = np.zeros(10_000, dtype=np.int64)
    ids[:500] = 1
    ids[500:502] = 2
    intensities = np.where(ids == 1, 0.9, 0.3)
    intensities[500:502] = 1.0
    vessel, rule = map_clusters_unsupervised(ids, intensities, 3)
    assert rule == "brightness" and vessel.tolist() == [False, True, False]
    vessel, _ = map_clusters_unsupervised(ids, intensities, 3, min_fraction=0.0)
    assert vessel.tolist() == [False, False, True]


def test_bright_cut_rule_takes_every_cluster_at_or_above_the_cut():
    # a vessel split over clusters 1 and 2 (K large), bright tissue in 3 below the cut, 4 too small to count
    ids = np.repeat([0, 1, 2, 3, 4], [9005, 400, 400, 190, 5])
    intensities = np.select([ids == 1, ids == 2, ids == 3, ids == 4], [0.9, 0.8, 0.6, 1.0], 0.2)
    vessel, rule = map_clusters_bright_cut(ids, intensities, 6, cut=0.75)
    assert rule == "bright_cut" and vessel.tolist() == [False, True, True, False, False, False]
    # nothing reaches the cut: the brightest candidate alone (the brightness rule), never an empty mapping
    vessel, _ = map_clusters_bright_cut(ids, intensities, 6, cut=0.95)
    assert vessel.tolist() == [False, True, False, False, False, False]
    assert vessel_clusters("bright_cut", cluster_ids=ids, n_clusters=6, intensities=intensities,
                           cut=0.75)[0].sum() == 2
    with pytest.raises(ValueError, match="cut"):
        vessel_clusters("bright_cut", cluster_ids=ids, n_clusters=6, intensities=intensities)


def test_bright_cut_is_a_percentile_of_the_brain_voxels_only():
    crops = np.zeros((2, 4, 4), np.float32)  # zeros are outside the brain: they do not lower the cut
    crops[0, :2] = np.arange(1, 9).reshape(2, 4) / 10.0
    assert bright_cut(crops, 50.0) == pytest.approx(np.percentile(np.arange(1, 9) / 10.0, 50.0))
    with pytest.raises(ValueError, match="no brain voxel"):
        bright_cut(np.zeros((1, 4, 4)), 99.0)
