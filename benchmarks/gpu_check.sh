#!/usr/bin/env bash
# One prepared GPU session: checks and times the GPU path. Usage: bash benchmarks/gpu_check.sh [real_image.nii.gz]
# Prints: device, ViT-S/8 feature throughput fp32/bf16, training steps/s cached vs backbone-per-step,
# a Lightning bf16 training check, DINO pretraining crops/s (bf16 and fp32), and full-volume reconstruction of a
# 320x320x247 volume fp32 and bf16; every figure also as a fraction of a GEMM peak measured in the same run.
set -u
export PYTHONUNBUFFERED=1
IMG=${1:-}
IMGARG="--shape 320 320 247"; [ -n "$IMG" ] && IMGARG="--image $IMG"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - <<'PY'
import time, torch
from stego_core.backbones import build_backbone
b = build_backbone("vit_small_patch8_dino", weights="random", res=224).cuda()
x = torch.rand(256, 1, 32, 32, device="cuda")
for amp in (False, True):
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        b(x); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(5): b(x)
        torch.cuda.synchronize()
    print(f"ViT-S/8 @224 features, batch 256, {'bf16' if amp else 'fp32'}: {5 * 256 / (time.perf_counter() - t):.0f} crops/s")
PY
python3 benchmarks/bench_training.py --device cuda --cached-steps 30 --uncached-steps 5
python3 benchmarks/bench_training.py --device cuda --cached-steps 30 --uncached-steps 5 --amp
python3 - <<'PY'
import time, torch, lightning as L
from torch.utils.data import DataLoader, TensorDataset
from stego_core.config import LossConfig
from stego_core.stego import StegoHead, ClusterProbe, LinearProbe
from stego_core.module import StegoModule
class DS(torch.utils.data.Dataset):
    def __init__(s): s.f = torch.randn(480, 384, 28, 28)
    def __len__(s): return len(s.f)
    def __getitem__(s, i): return {"features": s.f[i], "knn_features": s.f[(i + 1) % len(s.f)]}
m = StegoModule(StegoHead(384, 70), ClusterProbe(70, 2), LinearProbe(70, 2), LossConfig(), lr_head=5e-4, lr_cluster=5e-3, lr_linear=1e-3)
t = L.Trainer(max_steps=60, accelerator="gpu", devices=1, precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
t0 = time.perf_counter(); t.fit(m, DataLoader(DS(), batch_size=24, shuffle=True, drop_last=True))
print(f"Lightning bf16-mixed on GPU: {t.global_step} steps in {time.perf_counter() - t0:.1f} s, final loss {float(t.callback_metrics.get('loss', float('nan'))):.4f}")
PY
python3 benchmarks/bench_pretrain.py --device cuda --amp --batch 256 --steps 20
python3 benchmarks/bench_pretrain.py --device cuda --batch 256 --steps 10
python3 benchmarks/bench_reconstruction.py --backbone vit_small_patch8_dino --res 224 $IMGARG --device cuda --naive-slices 0 --batch 1024 --repeats 1 --amp
timeout 240 python3 benchmarks/bench_reconstruction.py --backbone vit_small_patch8_dino --res 224 $IMGARG --device cuda --naive-slices 0 --batch 1024 --repeats 1
python3 benchmarks/bench_reconstruction.py --backbone vit_small_patch8_dino --res 224 $IMGARG --device cuda --naive-slices 2 --batch 1024 --amp --fixed-forward
