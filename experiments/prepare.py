"""``mlflow run . -e prepare``: volumes -> preprocessed 2D crops (seed layout), logged as an MLflow run."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.prepare import PrepareConfig, run_prepare

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = PrepareConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_prepare, argv, description=__doc__, default_config=CONFIG_DIR / "prepare.yaml")


if __name__ == "__main__":
    sys.exit(main())
