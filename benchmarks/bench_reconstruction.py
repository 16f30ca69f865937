r"""Reconstruction throughput: the batched engine against the seed's one-crop-at-a-time loop.

Same segmenter (a STEGO model: backbone + head + cluster probe; random weights, since speed does not depend
on them), same volume, same slices, measured side by side in one run. Prints slices/s of both, the ratio, and
each path's achieved FLOP/s as a fraction of a GEMM peak measured in the same run (:mod:`benchmarks.peak`);
the last lines are machine-readable (``engine_fraction_of_peak=...``).
With ``--naive-slices 0`` only the engine runs (e.g. a full 320x320x247 volume on a GPU).

    python benchmarks/bench_reconstruction.py                                  # CPU defaults
    python benchmarks/bench_reconstruction.py --backbone vit_small_patch8_dino --res 224 --shape 320 320 247 \
        --device cuda --amp --naive-slices 2
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

from stego_core.data.io import load_volume
from stego_core.data.phantom import PhantomConfig, make_phantom
from stego_core.data.preprocess import skull_strip, standardize
from stego_core.data.slicing import CropBlender, crop_index, take_crops
from stego_core.engine.reconstruction import EngineConfig, predict_volume
from stego_core.features.backbones import build_backbone
from stego_core.methods.stego.inference import StegoSegmenterModel, TorchSegmenter
from stego_core.methods.stego.model import ClusterProbe, StegoHead


def naive_reconstruction(model: StegoSegmenterModel, image: np.ndarray, mask: np.ndarray, *, axis: int,
                         patch: int, stride: int, device: str) -> np.ndarray:
    """The seed's way: one crop through the model at a time."""
    index = crop_index(image.shape, axis=axis, patch_size=patch, stride=stride, brain_mask=mask)
    blender = CropBlender(image.shape, axis=axis, patch_size=patch, blend="gaussian")
    for row in index:
        crop = take_crops(image, row[None], axis=axis, patch_size=patch, pad_value=0.0)
        with torch.no_grad():
            prob = model(torch.from_numpy(crop)[:, None].to(device))[:, 0].cpu().numpy()
        blender.add(prob, row[None])
    return blender.result()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="vit_small_patch16_dino")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 160, 48), help="phantom size (voxels)")
    parser.add_argument("--image", default=None, help="a NIfTI volume to use instead of a phantom")
    parser.add_argument("--patch", type=int, default=32)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256, help="engine batch: crops cut and blended at once")
    parser.add_argument("--forward-batch", type=int, default=None,
                        help="crops per forward pass (default: chosen from the model and memory)")
    parser.add_argument("--fixed-forward", action="store_true",
                        help="also time forward passes of the whole engine batch (before the batch was chosen)")
    parser.add_argument("--naive-slices", type=int, default=4, help="slices the naive loop runs on (0: skip)")
    parser.add_argument("--repeats", type=int, default=3, help="engine runs timed; the best counts (noisy hosts)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile fast path")
    args = parser.parse_args()

    t0 = time.perf_counter()
    raw = load_volume(args.image).data.astype(np.float32) if args.image else \
        make_phantom(PhantomConfig(shape=tuple(args.shape)), seed=0).image
    args.shape = raw.shape
    mask = skull_strip(raw)
    image = np.where(mask, standardize(raw, mask), 0).astype(np.float32)
    print(f"volume {raw.shape} ({args.image or 'phantom'}) read and preprocessed in {time.perf_counter() - t0:.1f} s, "
          f"brain {mask.mean():.1%}")

    backbone = build_backbone(args.backbone, weights="random", res=args.res)
    model = StegoSegmenterModel(backbone, StegoHead(backbone.feature_dim, 70), ClusterProbe(70, 2),
                                torch.tensor([False, True]), patch_size=args.patch, alpha=100.0).to(args.device).eval()
    segmenter = TorchSegmenter(model, device=args.device, amp=args.amp, batch_size=args.forward_batch)
    engine = EngineConfig(axis=2, patch_size=args.patch, stride=args.stride, batch_size=args.batch)
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; {args.backbone} res {args.res}; crops {args.patch}/{args.stride}; "
          f"engine batch {args.batch}, forward batch {segmenter.batch_size}"
          f"{'; bf16' if args.amp else '; fp32'}")

    # The same brain slices for both: a slab around the middle of the volume.
    n_slices = args.shape[2] if args.naive_slices == 0 else args.naive_slices
    mid = args.shape[2] // 2
    lo = max(0, mid - n_slices // 2)
    slab = (slice(None), slice(None), slice(lo, lo + n_slices))
    def timed(seg: TorchSegmenter) -> tuple[np.ndarray, float]:
        """Probabilities of the slab and the best of ``--repeats`` wall times (seconds)."""
        predict_volume(seg, image[slab][..., :1], mask[slab][..., :1], engine, progress=False)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            sync(args.device)
            t0 = time.perf_counter()
            out = predict_volume(seg, image[slab], mask[slab], engine, progress=args.naive_slices == 0)
            sync(args.device)
            best = min(best, time.perf_counter() - t0)
        return out, best

    prob, batched_s = timed(segmenter)
    n_crops = len(crop_index(image[slab].shape, axis=2, patch_size=args.patch, stride=args.stride,
                             brain_mask=mask[slab]))
    print(f"batched engine : {n_slices / batched_s:9.2f} slices/s  ({n_crops / batched_s:9.1f} crops/s, "
          f"{batched_s:.2f} s for {n_slices} slices, {n_crops} crops)")
    dtype = torch.bfloat16 if args.amp else torch.float32
    peak = gemm_peak(args.device, dtype=dtype)
    one = torch.zeros(1, 1, args.patch, args.patch, device=args.device)
    with torch.no_grad():
        flops_per_crop = count_flops(lambda: model(one))
    print(f"model: {flops_per_crop / 1e9:.3f} GFLOP per crop")
    lines = [machine_line("engine", report("batched engine", flops_per_crop * n_crops, batched_s, peak))]
    if args.fixed_forward:
        fixed_prob, fixed_s = timed(TorchSegmenter(model, device=args.device, amp=args.amp, batch_size=args.batch))
        print(f"forward batch {args.batch}: {n_slices / fixed_s:9.2f} slices/s; the chosen batch is "
              f"{fixed_s / batched_s:.2f}x faster; max |difference| {np.abs(fixed_prob - prob).max():.2e}")
        lines.append(machine_line("fixed_batch_engine", report(f"forward batch {args.batch}", flops_per_crop * n_crops,
                                                               fixed_s, peak)))
    if args.compile:
        fast = TorchSegmenter(model, device=args.device, amp=args.amp, compile=True)
        fast.predict_slices(np.zeros((args.batch, args.patch, args.patch), np.float32))  # compiles once
        sync(args.device)
        t0 = time.perf_counter()
        fast_prob = predict_volume(fast, image[slab], mask[slab], engine, progress=False)
        sync(args.device)
        compiled_s = time.perf_counter() - t0
        print(f"compiled engine: {n_slices / compiled_s:9.2f} slices/s; max |difference| to the plain engine "
              f"{np.abs(fast_prob - prob).max():.2e}")
        lines.append(machine_line("compiled_engine", report("compiled engine", flops_per_crop * n_crops,
                                                            compiled_s, peak)))
    if args.naive_slices:
        t0 = time.perf_counter()
        naive = naive_reconstruction(model, image[slab], mask[slab], axis=2, patch=args.patch, stride=args.stride,
                                     device=args.device)
        sync(args.device)
        naive_s = time.perf_counter() - t0
        naive[~mask[slab]] = 0
        print(f"one crop a time: {n_slices / naive_s:9.2f} slices/s  ({n_crops / naive_s:9.1f} crops/s)")
        lines.append(machine_line("naive", report("one crop a time", flops_per_crop * n_crops, naive_s, peak)))
        print(f"max |difference| of the two probability maps: {np.abs(naive - prob).max():.2e}")
        print(f"speed-up of the batched engine: {naive_s / batched_s:.1f}x")
        lines.append(f"engine_speedup={naive_s / batched_s:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
