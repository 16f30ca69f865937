"""Self-training: pseudo-labels, the masked loss, combination rules, a tiny end-to-end run."""

import inspect

import numpy as np
import pytest
import torch

from stego_core.config import from_dict, to_dict
from stego_core.data.phantom import PhantomConfig, make_phantom
from stego_core.evaluation.metrics import dice
from stego_core.methods.selftrain.settings import StudentSettings
from stego_core.methods.selftrain.student import (
    build_student,
    combine,
    masked_loss,
    predict_student,
    pseudo_labels,
    self_train,
)


def student(**sections) -> StudentSettings:
    """Student settings from nested sections, e.g. ``student(pseudo={"high": 0.8})``."""
    return from_dict(StudentSettings, sections)


def _tiny_teacher():
    prob = np.zeros((9, 9, 3), np.float32)
    prob[4, 4, :] = 0.9     # confident vessel
    prob[4, 5, :] = 0.6     # in the teacher mask, below the high cut
    prob[0, 0, :] = 0.3     # uncertain, far from the vessel
    return prob, prob > 0.5


def test_pseudo_label_cuts_and_band():
    prob, mask = _tiny_teacher()
    brain = np.ones_like(mask)
    brain[8, 8, :] = False
    target, weight = pseudo_labels(prob, mask, brain, student(pseudo={"high": 0.8, "low": 0.2, "band_vox": 1}))
    assert target.dtype == bool and weight.dtype == np.float32
    assert target[4, 4].all() and target.sum() == 3                 # only the confident voxel
    assert (weight[4, 5] == 0).all()                                 # teacher voxel below the high cut: ignored
    assert (weight[3, 4] == 0).all() and (weight[5, 5] == 0).all()   # the one-voxel ring is ignored
    assert (weight[4, 7] == 1).all()                                 # two voxels away: background
    assert (weight[0, 0] == 0).all()                                 # between the cuts: ignored
    assert (weight[8, 8] == 0).all()                                 # outside the brain mask: ignored
    _, no_band = pseudo_labels(prob, mask, brain, student(pseudo={"high": 0.8, "low": 0.2, "band_vox": 0}))
    assert (no_band[3, 4] == 1).all()
    wide = pseudo_labels(prob, mask, brain, student(pseudo={"high": 0.8, "low": 0.2, "band_vox": 2}))[1]
    assert wide.sum() < weight.sum() < no_band.sum()


def test_pseudo_labels_never_read_a_label():
    assert "label" not in " ".join(inspect.signature(pseudo_labels).parameters)
    assert "label" not in " ".join(inspect.signature(self_train).parameters)


@pytest.mark.parametrize("cldice_weight", [0.0, 0.5])
def test_masked_loss_has_zero_gradient_on_ignored_voxels(cldice_weight):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = (torch.rand(2, 1, 16, 16) > 0.7).float()
    weight = torch.ones(2, 1, 16, 16)
    weight[:, :, 4:9, 3:12] = 0
    loss = masked_loss(logits, target, weight, student(loss={"cldice_weight": cldice_weight}))
    loss.backward()
    assert torch.isfinite(loss)
    assert (logits.grad[weight == 0] == 0).all()
    assert (logits.grad[weight == 1] != 0).any()
    # the ignored voxels' targets do not change the loss
    other = target.clone()
    other[weight == 0] = 1 - other[weight == 0]
    again = masked_loss(logits.detach(), other, weight, student(loss={"cldice_weight": cldice_weight}))
    assert torch.isclose(loss.detach(), again)


def test_combine_rules():
    rng = np.random.default_rng(0)
    t_prob = rng.random((8, 8, 4)).astype(np.float32)
    t_mask = t_prob > 0.8
    s_prob = rng.random((8, 8, 4)).astype(np.float32)
    image = rng.random((8, 8, 4)).astype(np.float32)
    topn = combine(t_prob, t_mask, s_prob, image, student(combine={"rule": "topn"}))
    assert topn.sum() == t_mask.sum() and s_prob[topn].min() >= s_prob[~topn].max()
    union = combine(t_prob, t_mask, s_prob, image, student(combine={"rule": "union_bright"}))
    assert (union >= t_mask).all()
    assert (combine(t_prob, t_mask, s_prob, image, student(combine={"rule": "student"})) == (s_prob > 0.5)).all()


def test_build_student_shapes():
    settings = student(network={"dims": "2.5d", "context": 2, "channels": [8, 16]})
    out = build_student(settings)(torch.zeros(2, 5, 32, 32))
    assert out.shape == (2, 1, 32, 32)


def test_tiny_selftrain_on_a_phantom_beats_chance():
    ph = make_phantom(PhantomConfig(shape=(48, 48, 24), n_trees=2, max_depth=4), seed=1)
    image = (ph.image / ph.image.max()).astype(np.float32)
    brain = ph.brain_mask > 0
    # a crude label-free teacher: the brightest 10 % of the brain
    cut = np.quantile(image[brain], 0.9)
    t_prob = np.clip(0.5 + (image - cut) * 5, 0, 1) * brain
    t_mask = t_prob > 0.5
    settings = student(training={"steps": 60, "batch": 8, "crop": 32, "eval_every": 20, "val_every": 4,
                                    "threads": 1}, network={"channels": [8, 16]}, combine={"rule": "topn"})
    mask, s_prob, (model,) = self_train(image, brain, t_prob, t_mask, settings)
    assert s_prob.shape == image.shape and s_prob.dtype == np.float32
    assert 0.0 <= s_prob.min() and s_prob.max() <= 1.0
    assert (s_prob[~brain] == 0).all()
    chance = float(t_mask.sum()) / brain.sum()     # Dice of a random mask of the teacher's size
    assert dice(mask, ph.label) > 3 * chance
    again = predict_student(model, image, brain, from_dict(StudentSettings, {**to_dict(settings), "inference": {"tta": True}}))
    assert again.shape == image.shape and np.isfinite(again).all()


def test_augment_moves_target_and_weight_with_the_image():
    from stego_core.methods.selftrain.student import augment

    gen = torch.Generator().manual_seed(0)
    image = torch.rand(8, 3, 16, 16)
    target = (image[:, 1:2] > 0.5).float()
    weight = (image[:, 1:2] > 0.2).float()
    settings = student(augment={"intensity": False, "gamma": False, "noise": False})
    x, y, w = augment(image, target, weight, settings, gen)
    assert torch.equal(y, (x[:, 1:2] > 0.5).float()) and torch.equal(w, (x[:, 1:2] > 0.2).float())
    x2, _, _ = augment(image, target, weight, student(augment={"prob": 1.0}), gen)
    assert x2.shape == image.shape and not torch.equal(x2, image)


def test_rounds_learn_from_the_last_student_and_combine_with_the_original_teacher(monkeypatch):
    """``student.rounds``: round 2's pseudo-labels come from round 1's student, while every round's combination
    is made with the original teacher (its anchor)."""
    import stego_core.methods.selftrain.student as st

    prob, _ = _tiny_teacher()
    prob = np.repeat(prob, 3, axis=2)
    mask, brain, image = prob > 0.5, np.ones(prob.shape, bool), prob.copy()
    relabelled, anchors = [], []
    real_pseudo, real_combine = st.pseudo_labels, st.combine
    monkeypatch.setattr(st, "train_student", lambda *a, **k: torch.nn.Identity())
    monkeypatch.setattr(st, "predict_student", lambda model, img, b, s: np.full(img.shape, 0.7, np.float32))
    monkeypatch.setattr(st, "pseudo_labels", lambda p, m, b, s: (relabelled.append(p.copy()), real_pseudo(p, m, b, s))[1])
    monkeypatch.setattr(st, "combine", lambda tp, tm, sp, im, s: (anchors.append(tp.copy()), real_combine(tp, tm, sp, im, s))[1])
    st.self_train(image, brain, prob, mask, student(rounds=2))
    assert len(relabelled) == 2 and np.array_equal(relabelled[0], prob)
    assert np.allclose(relabelled[1], 0.7)                       # round 2 learns round 1's student
    assert len(anchors) == 2 and all(np.array_equal(a, prob) for a in anchors)  # both anchored on the teacher


def test_student_settings_are_checked_when_loaded():
    from stego_core.config import load_config
    from stego_core.steps.selftrain import SelfTrainConfig

    with pytest.raises(ValueError, match="student.training.crop"):
        load_config(SelfTrainConfig, None, ["student.training.crop=0"])
    with pytest.raises(ValueError, match="student.network.channels"):
        load_config(SelfTrainConfig, None, ["student.network.channels=[8]"])
    with pytest.raises(ValueError, match="unknown config key student.steps"):
        load_config(SelfTrainConfig, None, ["student.steps=3"])
