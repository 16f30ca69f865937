"""``mlflow run . -e baseline``: a classical unsupervised method reconstructed and scored like STEGO."""

import sys

from experiments._cli import run
from stego_core.evaluation import BaselineConfig, run_baseline


def main(argv: list[str] | None = None) -> int:
    return run(BaselineConfig, run_baseline, argv, description=__doc__, default_config="baseline.yaml")


if __name__ == "__main__":
    sys.exit(main())
