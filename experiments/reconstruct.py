"""``mlflow run . -e reconstruct -P model_uri=runs:/<id>/model``: evaluate a trained STEGO model in 3D."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.evaluation import ReconstructConfig, run_reconstruct

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = ReconstructConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_reconstruct, argv, description=__doc__,
               default_config=CONFIG_DIR / "reconstruct.yaml")


if __name__ == "__main__":
    sys.exit(main())
