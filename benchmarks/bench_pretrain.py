"""DINO pretraining throughput: crops/s of :func:`stego_core.features.dino.dino_step`, as a fraction of a GEMM peak.

The step ``run_pretrain`` runs (multi-crop augmentation on the CPU, teacher on the global views, student on all
views, lightly's DINO loss, AdamW, EMA) on random crops with :class:`~stego_core.steps.pretrain.PretrainConfig`'s
defaults (batch 64, 2 global + 6 local views), random weights (speed does not depend on them). FLOPs of one
step (forward and backward) are counted with ``torch.utils.flop_counter``; the yardstick is a GEMM measured in
the same run (:mod:`benchmarks.peak`). The last lines are machine-readable (``pretrain_fraction_of_peak=...``).

    python benchmarks/bench_pretrain.py                                   # CPU, mra_vit_t4_p2
    python benchmarks/bench_pretrain.py --device cuda --amp --batch 256   # a GPU, bf16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from peak import count_flops, gemm_peak, machine_line, report  # noqa: E402

from stego_core.features.backbones import get_spec
from stego_core.features.base import normalize_input
from stego_core.features.vit import create_vit
from stego_core.features.dino import DinoModel, dino_step, multi_crop
from stego_core.steps.pretrain import PretrainConfig


def main() -> None:
    cfg = PretrainConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=cfg.backbone)
    parser.add_argument("--batch", type=int, default=cfg.batch_size)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up step)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    args = parser.parse_args()

    spec = get_spec(args.backbone)
    torch.manual_seed(0)
    model = DinoModel(create_vit(spec, seed=0, dynamic_img_size=True), spec.embed_dim, out_dim=cfg.out_dim,
                      hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                      to_input=lambda v: normalize_input(v, spec)).to(args.device)
    from lightly.loss import DINOLoss

    criterion = DINOLoss(output_dim=cfg.out_dim, warmup_teacher_temp=cfg.teacher_temp_start,
                         teacher_temp=cfg.teacher_temp, student_temp=cfg.student_temp,
                         center_momentum=cfg.center_momentum).to(args.device)
    optimizer = torch.optim.AdamW([*model.student_backbone.parameters(), *model.student_head.parameters()],
                                  lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    crops = torch.rand(args.batch, 1, cfg.slicing.patch_size, cfg.slicing.patch_size, generator=generator)
    bf16 = args.amp and args.device.startswith("cuda")

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def views() -> list[torch.Tensor]:
        return [v.to(args.device, non_blocking=True) for v in multi_crop(crops, cfg.augment, generator)]

    def one_step(vs: list[torch.Tensor], step: int) -> None:
        dino_step(model, criterion, optimizer, vs, n_global=cfg.augment.n_global, step=step,
                  teacher_temp=cfg.teacher_temp, momentum=cfg.momentum, clip_grad=cfg.clip_grad, bf16=bf16)

    model.train()
    one_step(views(), 0)  # warm-up
    sync()
    augment_s = step_s = 0.0
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        vs = views()
        sync()
        t1 = time.perf_counter()
        one_step(vs, step)
        sync()
        augment_s += t1 - t0
        step_s += time.perf_counter() - t1
    total_s = augment_s + step_s
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({torch.get_num_threads()} threads)"
    a = cfg.augment
    print(f"device: {name}; {args.backbone}; batch {args.batch}; {a.n_global} global views of {a.global_size} px + "
          f"{a.n_local} local of {a.local_size} px; {'bf16' if bf16 else 'fp32'}")
    crops_per_s = args.steps * args.batch / total_s
    print(f"pretraining: {crops_per_s:.1f} crops/s ({total_s / args.steps * 1000:.0f} ms per step, of which "
          f"augmentation {augment_s / total_s:.0%})")
    vs = views()
    flops = count_flops(lambda: one_step(vs, args.steps + 1))
    print(f"{flops / 1e9:.2f} GFLOP per step (forward and backward)")
    peak = gemm_peak(args.device, dtype=torch.bfloat16 if bf16 else torch.float32)
    lines = [machine_line("pretrain", report("pretraining step", flops * args.steps, step_s, peak)),
             machine_line("pretrain_with_augmentation", report("with augmentation", flops * args.steps, total_s,
                                                               peak)),
             f"pretrain_crops_per_s={crops_per_s:.1f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
