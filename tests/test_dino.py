"""DINO pieces against the paper's equations on tiny tensors (Caron et al., ICCV 2021, Algorithm 1)."""

from __future__ import annotations

import math

import pytest
import torch

from stego_core.features.backbones import get_spec
from stego_core.features.base import normalize_input
from stego_core.features.vit import create_vit
from stego_core.features.dino import (
    AugmentConfig,
    DinoModel,
    cosine_value,
    lr_at,
    multi_crop,
    teacher_entropy,
    teacher_temperature,
)


def _direct_dino_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], center: torch.Tensor,
                      t_temp: float, s_temp: float) -> torch.Tensor:
    """Algorithm 1 of the paper, written out: H(t, s) averaged over pairs of different views."""
    total, n = 0.0, 0
    for i, t in enumerate(teacher):
        p_t = torch.softmax((t - center) / t_temp, dim=-1)
        for j, s in enumerate(student):
            if i == j:
                continue
            total = total + (-(p_t * torch.log_softmax(s / s_temp, dim=-1)).sum(-1)).mean()
            n += 1
    return total / n


def test_dino_loss_and_centring_match_a_direct_computation():
    from lightly.loss import DINOLoss

    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(3, 5, generator=g) for _ in range(2)]
    student = [torch.randn(3, 5, generator=g) for _ in range(4)]
    crit = DINOLoss(output_dim=5, warmup_teacher_temp=0.04, teacher_temp=0.07, student_temp=0.1,
                    center_momentum=0.9)
    crit.center.copy_(torch.randn(1, 1, 5, generator=g))
    c0 = crit.center.clone().reshape(-1)
    loss = crit(teacher, student, teacher_temp=0.05)
    torch.testing.assert_close(loss, _direct_dino_loss(teacher, student, c0, 0.05, 0.1))
    # centring: c <- m c + (1 - m) mean over the batch and the teacher views
    expected = 0.9 * c0 + 0.1 * torch.cat(teacher).mean(0)
    torch.testing.assert_close(crit.center.reshape(-1), expected)


def test_teacher_entropy_bounds():
    k = 16
    uniform = torch.zeros(4, k)
    assert teacher_entropy(uniform, torch.zeros(k), 0.04) == pytest.approx(math.log(k), rel=1e-5)
    peaked = torch.zeros(4, k)
    peaked[:, 3] = 100.0
    assert teacher_entropy(peaked, torch.zeros(k), 0.04) < 1e-3


def test_schedules():
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(50, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert cosine_value(0, 100, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine_value(99, 100, 0.996, 1.0) == pytest.approx(1.0)
    assert 0.996 < cosine_value(50, 100, 0.996, 1.0) < 1.0
    assert lr_at(0, 100, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(9, 100, 1e-3, 10) == pytest.approx(1e-3)
    assert lr_at(99, 100, 1e-3, 10, min_lr=1e-6) == pytest.approx(1e-6)


def _tiny_model(out_dim: int = 8) -> DinoModel:
    spec = get_spec("mra_vit_t4_p4", res=16)
    return DinoModel(create_vit(spec, seed=0, dynamic_img_size=True), spec.embed_dim, out_dim=out_dim,
                     hidden_dim=16, bottleneck_dim=8, to_input=lambda v: normalize_input(v, spec))


def test_ema_update_moves_the_teacher_towards_the_student():
    model = _tiny_model()
    with torch.no_grad():
        for p in model.student_backbone.parameters():
            p.fill_(1.0)
        for p in model.teacher_backbone.parameters():
            p.fill_(0.0)
    model.update_teacher(0.9)
    for p in model.teacher_backbone.parameters():
        torch.testing.assert_close(p, torch.full_like(p, 0.1))
    assert not any(p.requires_grad for p in model.teacher_backbone.parameters())


def test_teacher_starts_as_a_copy_and_heads_score_any_view_size():
    model = _tiny_model(out_dim=8)
    x16, x8 = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 8, 8)
    torch.testing.assert_close(model.teacher(x16), model.student(x16).detach())
    assert model.student(x8).shape == (2, 8)


def test_multi_crop_shapes_and_views_differ():
    crops = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    s = AugmentConfig(n_global=2, n_local=3, global_size=32, local_size=16)
    views = multi_crop(crops, s, torch.Generator().manual_seed(1))
    assert [tuple(v.shape) for v in views] == [(3, 1, 32, 32)] * 2 + [(3, 1, 16, 16)] * 3
    assert not torch.allclose(views[0], views[1])
    assert not torch.allclose(views[0], crops)
    assert all(torch.isfinite(v).all() for v in views)
    again = multi_crop(crops, s, torch.Generator().manual_seed(1))
    torch.testing.assert_close(views[0], again[0])  # seeded


def test_multi_crop_rejects_colour_input():
    with pytest.raises(ValueError, match=r"\(B, 1, P, P\)"):
        multi_crop(torch.rand(2, 3, 8, 8), AugmentConfig())
