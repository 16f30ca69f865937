"""The yardstick of benchmarks/: FLOPs counted (fused attention included) and a GEMM peak measured in-run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F

_PEAK = Path(__file__).resolve().parents[1] / "benchmarks" / "peak.py"


def _peak_module():
    spec = importlib.util.spec_from_file_location("bench_peak", _PEAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_count_flops_counts_the_cpu_attention_kernel():
    """Torch's counter has no formula for the CPU's fused attention; ours counts it as the CUDA kernels are
    counted (4 B H N^2 d: QK^T and PV), so a ViT's attention is not counted as free."""
    peak = _peak_module()
    b, h, n, d = 2, 3, 17, 8
    q = torch.randn(b, h, n, d)
    assert peak.count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 4 * b * h * n * n * d
    w = q.clone().requires_grad_(True)  # backward: dQ, dK, dV and the recomputed scores, 2.5x the forward
    assert peak.count_flops(lambda: F.scaled_dot_product_attention(w, w, w).sum().backward()) == 14 * b * h * n * n * d
    a = torch.randn(5, 7)
    assert peak.count_flops(lambda: a @ a.T) == 2 * 5 * 7 * 5


def test_gemm_peak_and_machine_line():
    peak = _peak_module()
    rate = peak.gemm_peak("cpu", sizes=(64,), repeats=2)
    assert 1e6 < rate < 1e14  # FLOP/s
    assert peak.machine_line("engine", 0.8123) == "engine_fraction_of_peak=0.812"
