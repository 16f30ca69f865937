"""Time and memory of Dice + clDice on a full-size synthetic vessel volume pair (target: < 5 s).

Builds a 320 x 320 x 247 reference of random tortuous tubes (radii 0.8-4 voxels) and a prediction that
differs the way segmentations do (radii off by up to 30 %, 15 % of the tubes missed, spurious tubes, salt
noise), then times ``dice``, ``cldice`` and the full ``evaluate_segmentation``. Peak memory is reported as
the tracemalloc peak of each call (numpy buffers included) and the process's maximum resident set size.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_metrics.py [--shape 320 320 247] [--tubes 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
import tracemalloc
from collections.abc import Callable

import numpy as np

from stego_core.evaluation.metrics import cldice, dice, evaluate_segmentation

TARGET_S = 5.0


def _ball(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    grid = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1]
    return (grid**2).sum(axis=0) <= radius**2


def random_tubes(shape: tuple[int, int, int], n_tubes: int, rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    """Random tortuous centrelines (points every 0.5 voxel) with one radius each, in voxels."""
    tubes = []
    for _ in range(n_tubes):
        start = rng.uniform(0.1, 0.9, 3) * np.array(shape)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        length = rng.uniform(40, 200)
        points = [start]
        for _ in range(int(length / 0.5)):
            direction = direction + rng.normal(scale=0.08, size=3)
            direction /= np.linalg.norm(direction)
            points.append(points[-1] + 0.5 * direction)
        tubes.append((np.array(points), float(rng.uniform(0.8, 4.0))))
    return tubes


def render(shape: tuple[int, int, int], tubes: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Stamp a ball of each tube's radius at every centreline point."""
    volume = np.zeros(shape, dtype=bool)
    bound = np.array(shape)
    for points, radius in tubes:
        ball = _ball(radius)
        r = ball.shape[0] // 2
        for centre in np.unique(np.round(points).astype(int), axis=0):
            lo, hi = centre - r, centre + r + 1
            clo, chi = np.maximum(lo, 0), np.minimum(hi, bound)
            if np.any(chi <= clo):
                continue
            region = tuple(slice(a, b) for a, b in zip(clo, chi))
            sub = tuple(slice(a - l, b - l) for a, b, l in zip(clo, chi, lo))
            volume[region] |= ball[sub]
    return volume


def make_pair(shape: tuple[int, int, int], n_tubes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    tubes = random_tubes(shape, n_tubes, rng)
    target = render(shape, tubes)
    kept = [(p, r * rng.uniform(0.7, 1.3)) for p, r in tubes if rng.uniform() > 0.15]
    spurious = random_tubes(shape, max(1, n_tubes // 10), rng)
    pred = render(shape, kept + spurious)
    salt = rng.integers(0, np.array(shape), size=(5000, 3))
    pred[tuple(salt.T)] = True
    return pred, target


def measure(func: Callable, *args) -> tuple[object, float, float]:
    """Result, wall seconds, tracemalloc peak in MiB."""
    tracemalloc.start()
    start = time.perf_counter()
    result = func(*args)
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(320, 320, 247))
    parser.add_argument("--tubes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    shape = tuple(args.shape)

    start = time.perf_counter()
    pred, target = make_pair(shape, args.tubes, args.seed)
    build_s = time.perf_counter() - start
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"volume {shape}: target {int(target.sum())} voxels ({100 * target.mean():.3f} %), "
          f"pred {int(pred.sum())} voxels; built in {build_s:.1f} s")

    d, dice_s, dice_mib = measure(dice, pred, target)
    c, cldice_s, cldice_mib = measure(cldice, pred, target)
    full, full_s, full_mib = measure(evaluate_segmentation, pred, target)
    total = dice_s + cldice_s
    print(f"{'call':<24}{'value':>10}{'time_s':>10}{'peak_MiB':>10}")
    print(f"{'dice':<24}{d:>10.4f}{dice_s:>10.3f}{dice_mib:>10.1f}")
    print(f"{'cldice':<24}{c:>10.4f}{cldice_s:>10.3f}{cldice_mib:>10.1f}")
    print(f"{'evaluate_segmentation':<24}{full['cldice']:>10.4f}{full_s:>10.3f}{full_mib:>10.1f}")
    print(f"dice + cldice: {total:.2f} s (target < {TARGET_S:.0f} s: {'OK' if total < TARGET_S else 'TOO SLOW'})")
    print(f"components pred/gt: {full['n_components_pred']:.0f}/{full['n_components_gt']:.0f}; "
          f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
