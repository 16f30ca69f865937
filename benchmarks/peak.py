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
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gemm_peak(device: str = "cpu", *, sizes: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float32,
              repeats: int = 10) -> float:
    """The best FLOP/s of square ``n x n`` matmuls (2 n^3 FLOPs each) on ``device`` in ``dtype``: best of
    ``repeats`` calls for each ``n`` in ``sizes``. By default 1024 and 2048 on a CPU (on a 2-core EPYC both
    reach ~190 GFLOP/s in fp32, and 4096 no more), 4096 and 8192 on a GPU."""
    best_rate = 0.0
    for n in sizes or ((4096, 8192) if str(device).startswith("cuda") else (1024, 2048)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        _sync(device)
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best_rate = max(best_rate, 2.0 * n ** 3 / (time.perf_counter() - t0))
    return best_rate


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:  # noqa: ARG001
    """FLOPs of the CPU's fused attention kernel, counted as torch counts the CUDA ones (torch's counter has no
    formula for it and would count ViT attention as free)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:  # noqa: ARG001
    """FLOPs of the CPU attention kernel's backward pass (training: DINO pretraining)."""
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


#: Ops torch's flop counter leaves out, with their formulas.
_EXTRA_FLOP_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
                        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn``: matmuls, convolutions and fused attention, as torch's flop counter counts
    them (plus the CPU attention kernel it leaves out)."""
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
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
