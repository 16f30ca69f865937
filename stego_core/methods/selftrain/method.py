"""Self-training as a registered method: a student network learns a label-free teacher's confident voxels.

``transductive`` (default): ``predict(case)`` runs the teacher on the volume, trains the students (one per view)
on its pseudo-labels and returns the combined mask, with the teacher's mask and the student's probability as
named extras (the evaluation scores the teacher beside the student). ``inductive``: ``fit(cases)`` trains the
students on the training volumes' pseudo-labels, ``predict`` applies them. The state is the last students (a
``torch.nn.ModuleList``, one per view). No label is read anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from stego_core.data.cases import PreparedCase
from stego_core.engine.postprocess import apply_postprocessing
from stego_core.methods.registry import (
    BuildContext,
    CaseRefused,
    Method,
    MethodEntry,
    Result,
    build_method,
    method_kind,
    remember_state,
)
from stego_core.methods.selftrain.settings import SelfTrainSettings
from stego_core.methods.selftrain.student import (
    combine,
    predict_student,
    pseudo_labels,
    self_train,
    train_student,
)

__all__ = ["SelfTrainMethod", "SELFTRAIN", "EmptyTeacher"]


class EmptyTeacher(CaseRefused):
    """The teacher's mask is empty or covers (nearly) everything: nothing confident to learn from."""


class SelfTrainMethod:
    """A student (small 2.5D U-Net, MONAI) trained on a teacher's confident voxels (:mod:`.student`)."""

    name = "selftrain"
    threshold = 0.5

    def __init__(self, settings: SelfTrainSettings, context: BuildContext) -> None:
        self._settings = settings
        self.context = context
        teacher = settings.teacher
        self.teacher: Method = build_method(teacher.method, teacher.settings, context.replace(monitor=_quiet()))
        self.models: list[torch.nn.Module] = []  # inductive or loaded: applied to every volume
        self._trained: list[torch.nn.Module] = []  # transductive: the students the last volume trained
        self._curves = _Curves(context.monitor)
        #: the teacher's mask is scored beside the student, as the comparison row ``teacher-<its name>``
        self.extra_rows = {"teacher": f"teacher-{teacher.name}"}
        #: an inductive student must not train on the volumes it is evaluated on
        self.needs_disjoint_fit = settings.mode == "inductive"
        #: a learned teacher without a trained state is fitted first (and may draw curves on held-out volumes)
        self.teacher_learns = method_kind(teacher.method) == "learned" and self.teacher.state() is None
        self.wants_validation = self.teacher_learns

    @property
    def state_per_case(self) -> bool:
        """Transductive students are trained per volume: the state is the last volume's."""
        return self._settings.mode != "inductive" and not self.models

    def set_case_state(self, state: torch.nn.ModuleList) -> None:
        """Take another process's last-volume students as this method's state (a launched evaluation)."""
        self._trained = list(state)

    @property
    def student(self) -> Any:
        return self._settings.student

    def settings(self) -> SelfTrainSettings:
        return self._settings

    def state(self) -> torch.nn.ModuleList | None:
        """The students, one per view: the inductive (or loaded) ones, else the last volume's (transductive)."""
        models = self.models or self._trained
        return torch.nn.ModuleList(models) if models else None

    def load_state(self, state: Any) -> None:
        models = list(state) if isinstance(state, torch.nn.ModuleList) else None
        if not models:
            raise ValueError(f"method 'selftrain' expects its students (a ModuleList), got a {type(state).__name__}")
        if len(models) != len(self.student.view_axes):
            raise ValueError(f"the saved state holds {len(models)} student(s) but student.views asks for "
                             f"{len(self.student.view_axes)}")
        self.models = [m.eval() for m in models]

    def teacher_output(self, case: PreparedCase) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's probability and post-processed mask of ``case``; refuses an empty or all-vessel
        teacher (a student would learn nothing, or everything)."""
        prob = self.teacher.predict(case).prob
        post = apply_postprocessing(prob, case.image, self._settings.teacher.postprocess, case.spacing,
                                    threshold=self.teacher.threshold, brain_mask=case.brain_mask,
                                    slice_axis=self.context.engine.axis)
        inside = case.brain_mask.sum()
        fraction = float(post.mask.sum() / inside) if inside else 0.0
        if not post.mask.any() or fraction > 0.5:
            what = "is empty" if not post.mask.any() else f"covers {fraction:.0%} of the brain mask"
            raise EmptyTeacher(f"case {case.case_id}: the teacher {self._settings.teacher.name}'s mask {what}; "
                               "a student cannot learn vessels from it (check the teacher on this volume)")
        return post.prob, post.mask

    def fit(self, cases: Sequence[PreparedCase], validation: Sequence[PreparedCase] = ()) -> None:
        """A learned teacher without a state first (STEGO trained on ``cases``); then, inductive: one student
        per view on the training volumes' pseudo-labels (nothing when loaded); transductive: nothing more (each
        volume trains its own students in :meth:`predict`)."""
        if self.teacher_learns and self.teacher.state() is None:
            self.teacher.fit(cases, validation)
            remember_state(self.teacher, self.context)
        if self._settings.mode != "inductive" or self.models:
            return
        images, brains, targets, weights = [], [], [], []
        for case in cases:
            t_prob, t_mask = self.teacher_output(case)
            target, weight = pseudo_labels(t_prob, t_mask, case.brain_mask, self.student)
            images.append(case.image), brains.append(case.brain_mask)
            targets.append(target), weights.append(weight)
        self.models = []
        for i, view in enumerate(self.student.view_axes):
            on_step = self._curves.callback("train", 1, view)
            self.models.append(train_student(images, brains, targets, weights, self.student.for_view(i),
                                             on_step=on_step))

    def predict(self, case: PreparedCase) -> Result:
        t_prob, t_mask = self.teacher_output(case)
        student = self.student
        if self.models:  # inductive, or students loaded from a run
            s_prob = sum(predict_student(m, case.image, case.brain_mask, student.for_view(i))
                         for i, m in enumerate(self.models)) / len(self.models)
            mask = combine(t_prob, t_mask, s_prob, case.image, student)
        elif self._settings.mode == "inductive":
            raise ValueError("selftrain mode=inductive: fit the students on training volumes first")
        else:
            mask, s_prob, models = self_train(case.image, case.brain_mask, t_prob, t_mask, student,
                                              progress=self.context.progress,
                                              on_step=lambda r, v, step, info: self._curves(case.case_id, r, v,
                                                                                          step, info))
            self._trained = models
        if student.combine.margin_vox == 0:
            mask = mask & case.brain_mask
        return Result(mask.astype(np.float32), extras={"teacher": t_mask, "student": np.asarray(s_prob, np.float32)})


class _Curves:
    """Turns the students' per-step reports into one curve per run: ``selftrain/loss`` every ``every`` steps and
    at each evaluation step, ``selftrain/agreement`` (the label-free stopping criterion)."""

    def __init__(self, monitor: Any, every: int = 25) -> None:
        self.monitor = monitor
        self.every = every
        self.offset: dict[tuple[str, int, int], int] = {}
        self.total = 0

    def callback(self, case_id: str, rnd: int, axis: int) -> Any:
        return lambda step, info: self(case_id, rnd, axis, step, info)

    def __call__(self, case_id: str, rnd: int, axis: int, step: int, info: dict) -> None:
        key = (case_id, rnd, axis)
        if key not in self.offset:
            self.offset[key] = self.total
        global_step = self.offset[key] + step
        self.total = max(self.total, global_step)
        metrics = {}
        if step % self.every == 0 or "agreement" in info:
            metrics["selftrain/loss"] = info["loss"]
        if "agreement" in info:
            metrics["selftrain/agreement"] = info["agreement"]
        if metrics:
            self.monitor.metrics(metrics, global_step)


def _quiet() -> Any:
    from stego_core.methods.registry import NullMonitor

    return NullMonitor()


def _build(settings: SelfTrainSettings, context: BuildContext) -> SelfTrainMethod:
    if settings.student.axis != context.engine.axis:
        import dataclasses

        settings = dataclasses.replace(settings, student=dataclasses.replace(settings.student,
                                                                             axis=context.engine.axis))
    return SelfTrainMethod(settings, context)


#: The registry entry (registered in :mod:`stego_core.methods`).
SELFTRAIN = MethodEntry("selftrain", "learned", _build, settings=SelfTrainSettings,
                        summary="a small U-Net trained on a label-free teacher's confident voxels (self-training)")
