"""Where the classical baselines spend their time on a whole volume, and the 2D Frangi fast path against
skimage's per-slice filter, side by side in one run.

    python benchmarks/bench_baselines.py --image ../shared/data/mra_mni_0656/image.nii.gz
    python benchmarks/bench_baselines.py --methods frangi sato --slices 32

Prints each method's wall time through the engine (whole axial slices), the top three functions by own time
(cProfile), then skimage's ``frangi`` per slice against :func:`stego_core.methods.vesselness.frangi_slices` on the same
slices with the max |difference|; the last line is ``frangi_speedup=<ratio>``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import numpy as np

from stego_core.data.io import load_volume
from stego_core.data.phantom import PhantomConfig, make_phantom
from stego_core.data.preprocess import skull_strip, standardize
from stego_core.engine.reconstruction import EngineConfig, predict_volume
from stego_core.methods.classical import available_segmenters, build_segmenter
from stego_core.methods.vesselness import frangi_slices


def top_costs(profile: cProfile.Profile, n: int = 3) -> list[str]:
    """The ``n`` functions with the largest own time, as ``"<seconds> s <function>"``."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:n]  # (file, line, name) -> (cc, nc, tt, ct, ..)
    return [f"{tt:6.1f} s  {name} ({file.split('/')[-1]}:{line})" for (file, line, name), (_, _, tt, _, _) in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=None, help="a NIfTI volume (default: a 160x160x96 phantom)")
    parser.add_argument("--methods", nargs="*", default=list(available_segmenters()))
    parser.add_argument("--slices", type=int, default=16, help="slices for the Frangi side-by-side comparison")
    args = parser.parse_args()

    raw = (load_volume(args.image).data.astype(np.float32) if args.image
           else make_phantom(PhantomConfig(shape=(160, 160, 96)), seed=0).image)
    t0 = time.perf_counter()
    mask = skull_strip(raw)
    image = np.where(mask, standardize(raw, mask), 0).astype(np.float32)
    print(f"volume {raw.shape} ({args.image or 'phantom'}): skull strip + standardise {time.perf_counter() - t0:.1f} s")
    engine = EngineConfig(axis=2, patch_size=None, batch_size=16, blend="constant")
    for name in args.methods:
        segmenter = build_segmenter(name)
        profile = cProfile.Profile()
        t0 = time.perf_counter()
        profile.enable()
        predict_volume(segmenter, image, mask, engine, progress=False)
        profile.disable()
        print(f"{name:<10} {time.perf_counter() - t0:7.1f} s; top costs:")
        for line in top_costs(profile):
            print(f"           {line}")

    from skimage.filters import frangi

    mid = image.shape[2] // 2
    slices = np.ascontiguousarray(np.moveaxis(image[:, :, mid - args.slices // 2: mid + args.slices // 2], 2, 0))
    sigmas, gamma = (1.0, 2.0, 3.0), 0.5
    t0 = time.perf_counter()
    plain = np.stack([frangi(s, sigmas=sigmas, gamma=gamma, black_ridges=False, mode="reflect") for s in slices])
    plain_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fast = frangi_slices(slices, sigmas, gamma=gamma)
    fast_s = time.perf_counter() - t0
    print(f"2D Frangi on {len(slices)} slices: skimage per slice {plain_s:.2f} s, batched {fast_s:.2f} s; "
          f"max |difference| {np.abs(fast - plain).max():.2e}")
    print(f"frangi_speedup={plain_s / fast_s:.2f}")


if __name__ == "__main__":
    main()
