"""``mlflow run . -e baseline``: a classical unsupervised method reconstructed and scored like STEGO."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.evaluation import BaselineConfig, run_baseline

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = BaselineConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_baseline, argv, description=__doc__, default_config=CONFIG_DIR / "baseline.yaml")


if __name__ == "__main__":
    sys.exit(main())
