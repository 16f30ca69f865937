"""Achieved FLOP/s as a fraction of the machine's own measured peak, for every benchmark in this folder.

The yardstick is measured in the same run as the figure it judges (these machines are shared and noisy): a
square fp32 GEMM on the CPU (or a bf16 / fp32 one on a GPU), FLOPs of the measured work counted with
``torch.utils.flop_counter.FlopCounterMode``. Each benchmark ends with one machine-readable line per figure,
``<name>_fraction_of_peak=0.62``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_peak(device: str = "cpu", *, n: int = 2048, dtype: torch.dtype = torch.float32, repeats: int = 5
              ) -> float:
    """Best-of-``repeats`` FLOP/s of an ``n x n`` matmul (2 n^3 FLOPs) on ``device`` in ``dtype``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls and convolutions, as torch's flop counter counts them)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def report(name: str, flops: float, seconds: float, peak: float) -> float:
    """Print achieved FLOP/s against ``peak`` and the machine-readable line; return the fraction."""
    achieved = flops / seconds
    fraction = achieved / peak
    print(f"{name}: {achieved / 1e9:.1f} GFLOP/s of a measured GEMM peak {peak / 1e9:.1f} GFLOP/s "
          f"({fraction:.0%})")
    return fraction


def machine_line(name: str, fraction: float) -> str:
    """``<name>_fraction_of_peak=<fraction>``, the last line(s) a benchmark prints."""
    return f"{name}_fraction_of_peak={fraction:.3f}"
