"""steps.base"""

from __future__ import annotations

from dataclasses import dataclass, field

from stego_core._checks import check_range
from stego_core.data.cases import DataConfig
from stego_core.data.slicing import SlicingConfig


@dataclass(frozen=True)
class RunSettings:
    """What every entry point shares: the train/test split of the cases (seeded by ``split_seed``, or named by
    ``test_cases``: held-out case ids, e.g. ``test_cases=mra_mni_0640`` for one fold of a leave-one-out
    rotation), where outputs go (one folder per run id below ``output``) and the MLflow experiment."""

    test_fraction: float = 0.34
    split_seed: int = 0
    test_cases: tuple[str, ...] = ()
    output: str = "outputs"
    experiment: str = "stego-vessels"

    def __post_init__(self) -> None:
        check_range(self.test_fraction, "test_fraction", 0.0, 1.0, high_inclusive=False)


@dataclass(frozen=True)
class DataSettings:
    """The volumes and their 2D crops: the sections every step that reads data shares."""

    data: DataConfig = field(default_factory=DataConfig)
    slicing: SlicingConfig = field(default_factory=SlicingConfig)

