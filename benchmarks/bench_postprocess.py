"""Wall time of each post-processing step on a 320 x 320 x 247 volume, 3D Frangi, and tri-planar fusion.

Everything is measured side by side in one run (read the ratios: the CPU machines are shared and noisy):

- ``cc`` (target < 2 s), ``largest``, ``fill_holes`` and ``smooth`` on the thresholded GMM prediction of the
  volume; ``crf`` on a few slices, reported per slice and extrapolated to the volume;
- the 3D Frangi segmenter (``frangi3d``, 3 scales) on the whole volume: time and peak memory (tracemalloc peak,
  numpy buffers included);
- tri-planar fusion (``engine.axes: [0, 1, 2]``) against one axis, for a voxel-wise method (``gmm``, the
  engine's overhead) and for the 2D Frangi filter on a sub-volume.

The volume is ``--image`` (e.g. ``../shared/data/mra_mni_0656/image.nii.gz``; auto skull strip) or, when absent,
a synthetic phantom of the same size.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_postprocess.py [--image PATH] [--crf-slices 4] [--fusion-crop 128]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stego_core.data.phantom import PhantomConfig
from stego_core.engine.postprocess import (
    crf_refine,
    fill_small_holes,
    keep_largest_trees,
    remove_small_components,
    smooth_probability,
)
from stego_core.engine.reconstruction import EngineConfig, predict_volume
from stego_core.methods.classical import build_segmenter

SHAPE = (320, 320, 247)
CC_TARGET_S = 2.0


def _timed(fn: Callable[[], object], *, memory: bool = False) -> tuple[object, float, float]:
    """(result, seconds, tracemalloc peak MiB or nan)."""
    if memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    peak = float("nan")
    if memory:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return out, seconds, peak


def load_volume(image_path: str | None) -> tuple[np.ndarray, np.ndarray, str]:
    """A preprocessed (image in [0, 1], brain mask) pair of shape ~320 x 320 x 247."""
    from stego_core.data.preprocess import brain_mask_for, standardize

    if image_path and Path(image_path).is_file():
        from stego_core.data.io import load_volume as load

        raw = load(image_path).data.astype(np.float32)
        source = image_path
    else:
        from stego_core.data.phantom import make_phantom

        raw = make_phantom(PhantomConfig(shape=SHAPE), seed=0).image.astype(np.float32)
        source = "synthetic phantom"
    mask = brain_mask_for(raw, "auto")
    image = np.where(mask, standardize(raw, mask), 0.0).astype(np.float32)
    return image, mask, source


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"
                                               / "mra_mni_0656" / "image.nii.gz"))
    parser.add_argument("--crf-slices", type=int, default=4)
    parser.add_argument("--fusion-crop", type=int, default=128)
    args = parser.parse_args(argv)

    image, brain, source = load_volume(args.image)
    print(f"volume {image.shape} from {source}; brain {brain.mean():.1%}; "
          f"{platform.processor() or platform.machine()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    engine = EngineConfig(patch_size=None, batch_size=16, blend="constant")
    prob, t_gmm, _ = _timed(lambda: predict_volume(build_segmenter("gmm"), image, brain, engine, progress=False))
    mask = (prob > 0.5) & brain
    print(f"\nreference: gmm prediction {t_gmm:.2f} s, {int(mask.sum())} voxels")

    rows = []
    _, t, _ = _timed(lambda: remove_small_components(mask, min_size_vox=10))
    verdict = "met" if t < CC_TARGET_S else "MISSED"
    rows.append(("cc (min 10 voxels, 26-conn)", t, f"target < {CC_TARGET_S:g} s: {verdict}"))
    _, t, _ = _timed(lambda: remove_small_components(mask, min_size_mm3=10.0, spacing=(0.6, 0.6, 1.2)))
    rows.append(("cc (min 10 mm^3, anisotropic)", t, ""))
    _, t, _ = _timed(lambda: keep_largest_trees(mask, min_fraction=0.05))
    rows.append(("largest (>= 5 % of largest)", t, ""))
    _, t, _ = _timed(lambda: fill_small_holes(mask, max_size_vox=64))
    rows.append(("fill_holes (<= 64 voxels)", t, ""))
    _, t, _ = _timed(lambda: smooth_probability(prob, sigma_vox=0.5))
    rows.append(("smooth (sigma 0.5 voxel)", t, ""))
    try:
        k = image.shape[2] // 2
        sub = slice(k, k + args.crf_slices)
        _, t, _ = _timed(lambda: crf_refine(prob[..., sub], image[..., sub], axis=2))
        per = t / args.crf_slices
        rows.append((f"crf ({args.crf_slices} slices)", t, f"{per:.2f} s/slice -> ~{per * image.shape[2]:.0f} s "
                                                              "for the volume"))
    except ImportError as exc:
        rows.append(("crf", float("nan"), f"skipped: {exc}"))
    print("\n| step | wall time (s) | note |\n|---|---|---|")
    for name, t, note in rows:
        print(f"| {name} | {t:.2f} | {note} |")

    seg = build_segmenter("frangi3d")
    _, t3d, peak = _timed(lambda: seg.predict_volume(image, brain), memory=True)
    print(f"\nfrangi3d, 3 scales (1, 2, 3 voxels), whole volume: {t3d:.1f} s, tracemalloc peak {peak:.0f} MiB "
          f"({peak / (image.nbytes / 2**20):.1f}x the float32 volume); {t3d / t_gmm:.0f}x the gmm prediction")

    print("\ntri-planar fusion (axes 0, 1, 2, mean) against one axis (axis 2):")
    tri = EngineConfig(patch_size=None, batch_size=16, blend="constant", axes=(0, 1, 2), fusion="mean")
    _, t1, _ = _timed(lambda: predict_volume(build_segmenter("gmm"), image, brain, engine, progress=False))
    _, t3, _ = _timed(lambda: predict_volume(build_segmenter("gmm"), image, brain, tri, progress=False))
    print(f"| gmm (voxel-wise), full volume | one axis {t1:.2f} s | three axes {t3:.2f} s | ratio {t3 / t1:.2f}x |")
    c = args.fusion_crop
    centre = [s // 2 for s in image.shape]
    box = tuple(slice(max(0, m - c // 2), max(0, m - c // 2) + c) for m in centre)
    img_c, brain_c = image[box], brain[box]
    _, t1, _ = _timed(lambda: predict_volume(build_segmenter("frangi"), img_c, brain_c, engine, progress=False))
    _, t3, _ = _timed(lambda: predict_volume(build_segmenter("frangi"), img_c, brain_c, tri, progress=False))
    print(f"| frangi 2D, {img_c.shape} crop | one axis {t1:.2f} s | three axes {t3:.2f} s | ratio {t3 / t1:.2f}x |")


if __name__ == "__main__":
    main()
