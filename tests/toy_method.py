"""A toy learned method, the whole of it in this one file: what adding a method to the platform takes.

``fit`` learns one intensity cut (the mean of the training volumes' ``q``-th brain percentile), ``predict``
applies it; the state is that cut, saved and reloaded through the registry's one interface. Registered with one
line, ``register_method(TOY)`` (or ``STEGO_METHOD_PLUGINS=toy_method`` for the entry points). ``FITTED``
records the case ids every ``fit`` saw (``PREDICTED`` those ``predict`` saw), so a test can tell that only training volumes reach it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stego_core.methods.registry import (
    BuildContext,
    MethodEntry,
    Result,
    register_method,
)

#: Case ids seen by each ``fit`` call, and by each ``predict`` call, in order (a test's window into the method;
#: not a pattern to copy).
FITTED: list[list[str]] = []
PREDICTED: list[str] = []


@dataclass(frozen=True)
class ToySettings:
    """``q``: the brain percentile the cut is learned at; ``model_uri``: a saved cut to use instead of fitting."""

    q: float = 99.0
    model_uri: str = ""

    def __post_init__(self) -> None:
        if not 0.0 < self.q < 100.0:
            raise ValueError(f"settings.q={self.q} must lie in (0, 100)")


class Cut(torch.nn.Module):
    """The toy's state: one learned intensity cut."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.register_buffer("value", torch.tensor(float(value)))


class BrightestVoxels:
    name = "brightest"
    threshold = 0.5

    def __init__(self, settings: ToySettings, context: BuildContext) -> None:
        self._settings = settings
        self.cut: Cut | None = None

    def fit(self, cases: Sequence, validation: Sequence = ()) -> None:
        FITTED.append([c.case_id for c in cases])
        self.cut = Cut(np.mean([np.percentile(c.image[c.brain_mask], self._settings.q) for c in cases]))

    def predict(self, case) -> Result:
        if self.cut is None:
            raise ValueError("brightest: fit it first")
        PREDICTED.append(case.case_id)
        return Result(((case.image > float(self.cut.value)) & case.brain_mask).astype(np.float32))

    def settings(self) -> ToySettings:
        return self._settings

    def state(self) -> Cut | None:
        return self.cut

    def load_state(self, state: Cut) -> None:
        self.cut = state


TOY = MethodEntry("brightest", "learned", BrightestVoxels, settings=ToySettings,
                  summary="toy: the brightest voxels, above a cut learned on the training volumes")


register_method(TOY)  # the one registration line
