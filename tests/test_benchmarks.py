"""The yardstick of benchmarks/: FLOPs counted (fused attention included) and a GEMM peak measured in-run."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _peak_module():
    return _bench_module("peak")


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


def test_ablation_degenerate_flag_is_noise_or_everything_not_a_high_recall():
    """A row marking noise (precision < .2) or nearly everything (recall > .98 at precision < .5) is degenerate;
    a near-complete recall at a useful precision (the percentile row on mra_mni_0656: .998 / .69) is not."""
    flag = _bench_module("ablation_stego").is_degenerate
    assert flag(0.15, 0.5) and flag(0.3, 0.99)
    assert not flag(0.69, 0.998) and not flag(0.81, 0.988) and not flag(0.35, 0.65)


@pytest.mark.slow
def test_gpu_stego_dry_run_returns_weights_curves_and_the_rotation(tmp_path, mlflow_store):
    """``benchmarks/gpu_stego.sh --dry-run``: the GPU session's script end to end on CPU at tiny sizes
    (calibration, DINO pretraining through the pretrain entry point, the curves, the rotation on the returned
    teacher weights), leaving under ``$OUT`` the files the device tool brings back."""
    from stego_core.features.backbones import build_backbone
    from stego_core.platform import tracking

    root = Path(__file__).resolve().parents[1]
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": mlflow_store}
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_stego.sh"), "--dry-run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["teacher_backbone.safetensors", "spec.json", "curves.csv", "curves.png", "rotation.md", "rotation.json",
         "summary.json", "log.txt"])  # the device tool returns at most 8 files
    weights = out / "teacher_backbone.safetensors"
    build_backbone("mra_vit_t4_p2", weights=str(weights))  # a teacher backbone the engine loads by file
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == summary["max_steps"] >= 2  # the calibrated number of steps ran
    with open(out / "curves.csv") as fh:
        curves = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in curves] == list(range(1, summary["max_steps"] + 1))
    assert all(float(r["pretrain/loss"]) > 0 and float(r["pretrain/teacher_entropy"]) >= 0 for r in curves)
    rows = json.loads((out / "rotation.json").read_text())
    assert {(r["dataset"], r["variant"]) for r in rows} == {("rotate-phantom_002", "stego-dino-none"),
                                                            ("rotate-phantom_002", "percentile")}
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    (dino,) = [r for r in rows if r["variant"] == "stego-dino-none"]
    assert tracking.client().get_run(dino["run_id"]).data.params["model.weights"] == str(weights)
    assert "stego-dino-none" in (out / "rotation.md").read_text()
