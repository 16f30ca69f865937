"""The ``selftrain`` step: the ``selftrain`` method evaluated as one MLflow run, its teacher scored beside it.

A thin face of :func:`~stego_core.steps.evaluation.run_method`: the teacher, the student and the mode are the
method's settings (:class:`~stego_core.methods.selftrain.settings.SelfTrainSettings`), stated at the top of this
entry point's config. The run holds the student's and the teacher's scores (``dice_mean``, ``teacher_dice_mean``),
the curves ``selftrain/loss`` and ``selftrain/agreement`` (the label-free stopping criterion), the stepped image
``selftrain/slices`` per volume (image | teacher | student probability | final mask), predictions named
``<case>_selftrain_pred.nii.gz`` beside ``<case>_teacher-<name>_pred.nii.gz``, and the students as its model. The
label only scores.
"""

from __future__ import annotations

from dataclasses import dataclass

from stego_core.methods.selftrain.settings import SelfTrainSettings
from stego_core.steps.evaluation import (
    EvaluateConfig,
    EvaluationResult,
    check_data,
    run_method,
)


@dataclass(frozen=True)
class SelfTrainConfig(SelfTrainSettings, EvaluateConfig):
    """The ``selftrain`` entry point: the method's settings (``teacher``, ``student``, ``mode``, ``model_uri``:
    a selftrain run whose students are applied without training) and the volumes it is evaluated on."""

    log_model: bool = True
    output: str = "outputs/selftrain"

    def __post_init__(self) -> None:
        EvaluateConfig.__post_init__(self)
        SelfTrainSettings.__post_init__(self)
        check_data(self.method_settings(), self.data, self.split)

    def method_settings(self) -> SelfTrainSettings:
        """The ``selftrain`` method's own settings (what its logged model carries)."""
        return SelfTrainSettings(teacher=self.teacher, student=self.student, mode=self.mode,
                                 model_uri=self.model_uri)


def run_selftrain(cfg: SelfTrainConfig, *, nested: bool = False, tags: dict[str, str] | None = None
                  ) -> EvaluationResult:
    """Self-train and evaluate on the ``split`` volumes of ``cfg`` as one MLflow run (see the module)."""
    return run_method("selftrain", cfg, settings=cfg.method_settings(),
                      run_name=f"selftrain-{cfg.teacher.name}", nested=nested, log_model=cfg.log_model,
                      tags={"teacher": cfg.teacher.name, "selftrain_mode": cfg.mode, **(tags or {})})
