"""``mlflow run . -e pretrain``: DINO self-supervised pretraining of an in-domain ViT on unlabelled 2D crops."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.pretrain import PretrainConfig, run_pretrain

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = PretrainConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_pretrain, argv, description=__doc__, default_config=CONFIG_DIR / "pretrain.yaml")


if __name__ == "__main__":
    sys.exit(main())
