"""``mlflow run . -e train``: train STEGO on 2D crops of MRA volumes (one MLflow run, model logged)."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.training import TrainConfig, run_train

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = TrainConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_train, argv, description=__doc__, default_config=CONFIG_DIR / "train.yaml")


if __name__ == "__main__":
    sys.exit(main())
