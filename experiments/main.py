"""``make demo`` / ``mlflow run . -e main``: the whole pipeline end to end on embedded defaults."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.pipeline import MainConfig, run_main

#: The entry point's config (its plan); defaults in stego_core.config, the YAML states what differs.
CONFIG = MainConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_main, argv, description=__doc__, default_config=CONFIG_DIR / "main.yaml")


if __name__ == "__main__":
    sys.exit(main())
