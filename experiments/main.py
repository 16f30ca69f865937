"""``make demo`` / ``mlflow run . -e main``: the whole pipeline end to end on embedded defaults."""

import sys

from experiments._cli import run
from stego_core.pipeline import MainConfig, run_main


def main(argv: list[str] | None = None) -> int:
    return run(MainConfig, run_main, argv, description=__doc__, default_config="main.yaml")


if __name__ == "__main__":
    sys.exit(main())
