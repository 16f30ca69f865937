"""Training steps per second: head on cached features vs. recomputing the frozen backbone every step.

Same batch, same head, same loss, measured side by side in one run (the machine is noisy, so the ratio is the
number to read). Default: ViT-S/8 at 224 (random weights: speed does not depend on the weights), batch 24.

    python benchmarks/bench_training.py [--backbone vit_small_patch8_dino] [--res 224] [--batch 24] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import count_flops, gemm_peak, machine_line, report  # noqa: E402

from stego_core.features.backbones import build_backbone
from stego_core.methods.stego.model import (
    ClusterProbe,
    LossConfig,
    StegoHead,
    correspondence_loss,
)


def step(head, probe, opt, feats, knn_feats, cfg, gen) -> float:
    codes, knn_codes = head(feats), head(knn_feats)
    loss, _ = correspondence_loss(feats, codes, knn_feats, knn_codes, cfg, generator=gen)
    cluster_loss, _ = probe(codes.detach())
    opt.zero_grad()
    (loss + cluster_loss).backward()
    opt.step()
    return float(loss.detach())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch8_dino")
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--patch", type=int, default=32, help="crop side in voxels")
    parser.add_argument("--cached-steps", type=int, default=20)
    parser.add_argument("--uncached-steps", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the backbone (GPU)")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    crops = torch.from_numpy(rng.random((args.batch, 1, args.patch, args.patch), dtype=np.float32)).to(args.device)
    knn_crops = crops.flip(0)
    backbone = build_backbone(args.backbone, weights="random", res=args.res).to(args.device)
    cfg = LossConfig()
    head = StegoHead(backbone.feature_dim, 70).to(args.device)
    probe = ClusterProbe(70, 2).to(args.device)
    opt = torch.optim.Adam([*head.parameters(), *probe.parameters()], lr=5e-4)
    gen = torch.Generator(device=args.device).manual_seed(0)

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=args.amp and args.device == "cuda"):
            return backbone(x).float()

    cached, cached_knn = features(crops).half(), features(knn_crops).half()  # what the cache stores
    step(head, probe, opt, cached.float(), cached_knn.float(), cfg, gen)  # warm-up
    step(head, probe, opt, features(crops), features(knn_crops), cfg, gen)
    sync(args.device)

    t0 = time.perf_counter()
    for _ in range(args.cached_steps):
        step(head, probe, opt, cached.float(), cached_knn.float(), cfg, gen)
    sync(args.device)
    cached_s = (time.perf_counter() - t0) / args.cached_steps

    t0 = time.perf_counter()
    for _ in range(args.uncached_steps):
        step(head, probe, opt, features(crops), features(knn_crops), cfg, gen)
    sync(args.device)
    uncached_s = (time.perf_counter() - t0) / args.uncached_steps

    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; backbone {args.backbone} res {args.res}, batch {args.batch}, crops {args.patch}px"
          f"{', bf16 backbone' if args.amp else ''}")
    print(f"cached features : {cached_s * 1000:8.1f} ms/step  ({1 / cached_s:7.2f} steps/s)")
    print(f"backbone per step: {uncached_s * 1000:8.1f} ms/step  ({1 / uncached_s:7.2f} steps/s)")
    print(f"speed-up with the cache: {uncached_s / cached_s:.1f}x")
    peak = gemm_peak(args.device, dtype=torch.bfloat16 if args.amp else torch.float32)
    cached_flops = count_flops(lambda: step(head, probe, opt, cached.float(), cached_knn.float(), cfg, gen))
    uncached_flops = count_flops(lambda: step(head, probe, opt, features(crops), features(knn_crops), cfg, gen))
    lines = [machine_line("cached_step", report("cached step", cached_flops, cached_s, peak)),
             machine_line("backbone_step", report("backbone step", uncached_flops, uncached_s, peak)),
             f"cache_speedup={uncached_s / cached_s:.2f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
