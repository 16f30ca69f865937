"""``mlflow run . -e prepare``: volumes -> preprocessed 2D crops (seed layout), logged as an MLflow run."""

import sys

from experiments._cli import run
from stego_core.config import PrepareConfig
from stego_core.prepare import run_prepare


def main(argv: list[str] | None = None) -> int:
    return run(PrepareConfig, run_prepare, argv, description=__doc__, default_config="prepare.yaml")


if __name__ == "__main__":
    sys.exit(main())
