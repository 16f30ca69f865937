"""Run by ``torchrun`` from tests/test_distributed.py (not a test module): DINO pretraining of a tiny ViT as
one process of a launched job, then every rank's centre, teacher and student compared; rank 0 writes the
largest differences between ranks as JSON to the path given first. The other arguments are config overrides."""

from __future__ import annotations

import json
import sys

import torch

from stego_core.config import load_config
from stego_core.runtime import distributed
from stego_core.steps.pretrain import PretrainConfig, run_pretrain


def main(out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    result = run_pretrain(load_config(PretrainConfig, None, overrides))
    assert result.model is not None and result.center is not None
    mine = {"center": result.center.reshape(-1),
            "teacher": torch.cat([p.detach().reshape(-1) for p in [*result.model.teacher_backbone.parameters(),
                                                                    *result.model.teacher_head.parameters()]]),
            "student": torch.cat([p.detach().reshape(-1) for p in [*result.model.student_backbone.parameters(),
                                                                    *result.model.student_head.parameters()]])}
    every = distributed.gather_objects({k: v.cpu() for k, v in mine.items()})
    if distributed.is_main():
        diffs = {k: max(float((r[k] - every[0][k]).abs().max()) for r in every) for k in mine}
        moved = float((every[0]["center"]).abs().max())  # the centre left its zero start
        with open(out, "w") as f:
            json.dump({"ranks": len(every), "max_diff": diffs, "center_abs_max": moved, "run_id": result.run_id}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
