"""``mlflow run . -e pretrain_synth``: synth's 3D U-Net trained on domain-randomized synthetic patches only."""

import sys

from experiments import CONFIG_DIR
from stego_core.platform.cli import run
from stego_core.steps.pretrain_synth import PretrainSynthConfig, run_pretrain_synth

#: The entry point's config (its plan); defaults in stego_core.steps.pretrain_synth, the YAML states what differs.
CONFIG = PretrainSynthConfig


def main(argv: list[str] | None = None) -> int:
    return run(CONFIG, run_pretrain_synth, argv, description=__doc__,
               default_config=CONFIG_DIR / "pretrain_synth.yaml")


if __name__ == "__main__":
    sys.exit(main())
