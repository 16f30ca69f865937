"""Run by ``torchrun`` from tests/test_distributed.py (not a test module): STEGO training (``experiments.train``) as
one process of a launched job, with a fault on one rank.

``python tests/torchrun_train_fault.py <fail|signal> <rank> <folder> <overrides...>``: every rank writes its pid to
``<folder>/rank<r>.pid``; rank ``<rank>`` writes the index of each training batch it starts to
``<folder>/rank<r>.step`` and, in ``fail`` mode, raises ``RuntimeError`` at batch 2 (in ``signal`` mode the test
sends it SIGTERM instead). Exits with ``experiments.train``'s exit code.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
from pathlib import Path
from typing import Any

from stego_core.methods.stego.module import StegoModule


def inject(mode: str, rank: int, folder: Path) -> None:
    """Wrap this process's ``StegoModule.training_step`` to record progress and, in ``fail`` mode, fail."""
    step = StegoModule.training_step

    def faulty(self: StegoModule, batch: Any, batch_idx: int) -> Any:
        (folder / f"rank{rank}.step").write_text(str(batch_idx))
        if mode == "fail" and batch_idx == 2:
            raise RuntimeError(f"injected failure on rank {rank} at batch {batch_idx}")
        return step(self, batch, batch_idx)

    StegoModule.training_step = faulty  # type: ignore[method-assign]


def main(mode: str, target: str, folder: str, overrides: list[str]) -> int:
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>` prints every thread's stack
    rank = int(os.environ["RANK"])
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.pid").write_text(str(os.getpid()))
    if rank == int(target):
        inject(mode, rank, out)
    from experiments.train import main as train

    return train(overrides)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]))
