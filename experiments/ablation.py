"""``mlflow run . -e ablation``: each baseline with and without each post-processing step, per case."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.ablation import AblationConfig, run_ablation

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = AblationConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_ablation, argv, description=__doc__, default_config=CONFIG_DIR / "ablation.yaml")


if __name__ == "__main__":
    sys.exit(main())
