"""``mlflow run . -e reconstruct -P model_uri=runs:/<id>/model``: evaluate a trained STEGO model in 3D."""

import sys

from experiments._cli import run
from stego_core.evaluation import ReconstructConfig, run_reconstruct


def main(argv: list[str] | None = None) -> int:
    return run(ReconstructConfig, run_reconstruct, argv, description=__doc__, default_config="reconstruct.yaml")


if __name__ == "__main__":
    sys.exit(main())
