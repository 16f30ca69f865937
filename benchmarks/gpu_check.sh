#!/usr/bin/env bash
# One prepared GPU session: checks and times the GPU path. Usage: bash benchmarks/gpu_check.sh [real_image.nii.gz]
# Prints: device, ViT-S/8 feature throughput fp32/bf16, training steps/s cached vs backbone-per-step,
# a Lightning bf16 training check, DINO pretraining crops/s (bf16 and fp32), and full-volume reconstruction of a
# 320x320x247 volume fp32 and bf16; every figure also as a fraction of a GEMM peak measured in the same run.
#
# DEVICE=cpu bash benchmarks/gpu_check.sh runs the same scripts on the CPU at small sizes: a dry run that checks
# the script end to end before a GPU session is spent on it (its numbers are not the GPU figures).
set -u
export PYTHONUNBUFFERED=1
DEVICE=${DEVICE:-cuda}
IMG=${1:-}
if [ "$DEVICE" = cpu ]; then
    SHAPE="--shape 32 32 24"; FEAT_BATCH=2; BATCH=64; PRE_BATCH=8; STEPS=1; NAIVE=1; TRAIN_BATCH=4
    TRAIN=(--res 64 --cached-steps 2 --uncached-steps 1)
else
    SHAPE="--shape 320 320 247"; FEAT_BATCH=256; BATCH=1024; PRE_BATCH=256; STEPS=20; NAIVE=2; TRAIN_BATCH=24
    TRAIN=(--cached-steps 30 --uncached-steps 5)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
IMGARG=$SHAPE; [ -n "$IMG" ] && IMGARG="--image $IMG"
export DEVICE FEAT_BATCH TRAIN_BATCH
python3 - <<'PY'
import os, time, torch
from stego_core.features.backbones import build_backbone
dev, n = os.environ["DEVICE"], int(os.environ["FEAT_BATCH"])
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
b = build_backbone("vit_small_patch8_dino", weights="random", res=224).to(dev)
x = torch.rand(n, 1, 32, 32, device=dev)
for amp in (False, True) if dev == "cuda" else (False,):
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        b(x); sync(); t = time.perf_counter()
        for _ in range(5): b(x)
        sync()
    print(f"ViT-S/8 @224 features, batch {n}, {'bf16' if amp else 'fp32'}: {5 * n / (time.perf_counter() - t):.0f} crops/s")
PY
python3 benchmarks/bench_training.py --device "$DEVICE" --batch "$TRAIN_BATCH" "${TRAIN[@]}"
[ "$DEVICE" = cuda ] && python3 benchmarks/bench_training.py --device cuda "${TRAIN[@]}" --amp
python3 - <<'PY'
import os, time, torch, lightning as L
from torch.utils.data import DataLoader
from stego_core.methods.stego.model import LossConfig
from stego_core.methods.stego.model import StegoHead, ClusterProbe, LinearProbe
from stego_core.methods.stego.module import StegoModule
cpu = os.environ["DEVICE"] == "cpu"
class DS(torch.utils.data.Dataset):
    def __init__(s): s.f = torch.randn(48 if cpu else 480, 384, 28, 28)
    def __len__(s): return len(s.f)
    def __getitem__(s, i): return {"features": s.f[i], "knn_features": s.f[(i + 1) % len(s.f)]}
m = StegoModule(StegoHead(384, 70), ClusterProbe(70, 2), LinearProbe(70, 2), LossConfig(), lr_head=5e-4, lr_cluster=5e-3, lr_linear=1e-3)
t = L.Trainer(max_steps=2 if cpu else 60, accelerator="cpu" if cpu else "gpu", devices=1, precision="bf16-mixed", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
t0 = time.perf_counter(); t.fit(m, DataLoader(DS(), batch_size=24, shuffle=True, drop_last=True))
print(f"Lightning bf16-mixed on {'CPU' if cpu else 'GPU'}: {t.global_step} steps in {time.perf_counter() - t0:.1f} s, final loss {float(t.callback_metrics.get('loss', float('nan'))):.4f}")
PY
AMP=(); [ "$DEVICE" = cuda ] && AMP=(--amp)
python3 benchmarks/bench_pretrain.py --device "$DEVICE" "${AMP[@]}" --batch "$PRE_BATCH" --steps "$STEPS"
[ "$DEVICE" = cuda ] && python3 benchmarks/bench_pretrain.py --device cuda --batch "$PRE_BATCH" --steps 10
python3 benchmarks/bench_reconstruction.py --backbone vit_small_patch8_dino --res 224 $IMGARG --device "$DEVICE" --naive-slices 0 --batch "$BATCH" --repeats 1 "${AMP[@]}"
[ "$DEVICE" = cuda ] && timeout 240 python3 benchmarks/bench_reconstruction.py --backbone vit_small_patch8_dino --res 224 $IMGARG --device cuda --naive-slices 0 --batch "$BATCH" --repeats 1
python3 benchmarks/bench_reconstruction.py --backbone vit_small_patch8_dino --res 224 $IMGARG --device "$DEVICE" --naive-slices "$NAIVE" --batch "$BATCH" --repeats 1 "${AMP[@]}" --fixed-forward
