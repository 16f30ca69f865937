"""``mlflow run . -e selftrain``: a student network self-trained on a label-free teacher's pseudo-labels and
evaluated beside its teacher (one MLflow run)."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.selftrain import SelfTrainConfig, run_selftrain

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = SelfTrainConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_selftrain, argv, description=__doc__, default_config=CONFIG_DIR / "selftrain.yaml")


if __name__ == "__main__":
    sys.exit(main())
