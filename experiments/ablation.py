"""``mlflow run . -e ablation``: each baseline with and without each post-processing step, per case (issue 10)."""

import sys

from experiments import CONFIG_DIR
from stego_core.cli import run
from stego_core.config import AblationConfig
from stego_core.steps.ablation import run_ablation


def main(argv: list[str] | None = None) -> int:
    return run(AblationConfig, run_ablation, argv, description=__doc__, default_config=CONFIG_DIR / "ablation.yaml")


if __name__ == "__main__":
    sys.exit(main())
