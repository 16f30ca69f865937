"""Size and build time of the HTML slice viewer (:func:`stego_core.report.viewer.viewer_html`) on a 320 x 320 x 247 volume.

Target: <= 5 MB per page. Measured for one method (an evaluation run's ``viewer/<case>.html``) and for several
methods (the pipeline run's page, one method selector), with the bytes split into the image slices (lossy WebP)
and the overlays (lossless PNG, per method). The "methods" are thresholds of the image at high percentiles,
labelled against the label: speckled false positives all over the head, as a weak classical baseline makes
them, which is the expensive case for the overlays' compression.

The volume is ``--image`` / ``--label`` (e.g. ``../shared/data/mra_mni_0656/image.nii.gz`` and its
``label.nii.gz``) or, when absent, a synthetic phantom of ``--shape``.

Usage::

    python benchmarks/bench_viewer.py [--image PATH --label PATH] [--shape 320 320 247] [--methods 9]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time

import numpy as np

from stego_core.report.viewer import viewer_html


def _volume(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], str]:
    if args.image:
        from stego_core.data.io import load_volume

        image = load_volume(args.image)
        label = load_volume(args.label).data > 0
        return image.data.astype(np.float32), label, image.spacing_mm, args.image
    from stego_core.data.phantom import PhantomConfig, make_phantom

    phantom = make_phantom(PhantomConfig(shape=tuple(args.shape)), seed=0)
    return phantom.image, phantom.label > 0, (1.0, 1.0, 1.0), f"phantom {tuple(args.shape)}"


def _split(page: str) -> dict[str, float]:
    """MB of the page, of its WebP images and of its PNG overlays (base64 included)."""
    webp = sum(len(m) for m in re.findall(r"data:image/webp;base64,[A-Za-z0-9+/=]+", page))
    png = sum(len(m) for m in re.findall(r"data:image/png;base64,[A-Za-z0-9+/=]+", page))
    return {"total_mb": len(page.encode()) / 1e6, "webp_mb": webp / 1e6, "png_mb": png / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=None)
    parser.add_argument("--label", default=None)
    parser.add_argument("--shape", type=int, nargs=3, default=(320, 320, 247))
    parser.add_argument("--methods", type=int, default=9)
    parser.add_argument("--max-size", type=int, default=160)
    parser.add_argument("--quality", type=int, default=75)
    args = parser.parse_args()
    if bool(args.image) != bool(args.label):
        parser.error("--image and --label go together")

    image, label, spacing, source = _volume(args)
    print(f"volume: {source}, shape {image.shape}, label {int(label.sum())} voxels; {platform.processor() or platform.machine()}")
    qs = np.linspace(99.0, 99.8, args.methods)
    levels = np.percentile(image, qs)
    predictions = {f"p{q:.1f}": image > level for q, level in zip(qs, levels)}
    results = {}
    for n in (1, args.methods):
        chosen = dict(list(predictions.items())[:n])
        start = time.perf_counter()
        page = viewer_html(image, chosen, label, spacing_mm=spacing, max_size=args.max_size, quality=args.quality,
                           title="bench")
        elapsed = time.perf_counter() - start
        results[n] = {**_split(page), "build_s": elapsed}
        print(f"{n} method(s): {results[n]['total_mb']:.2f} MB (WebP slices {results[n]['webp_mb']:.2f}, "
              f"overlays {results[n]['png_mb']:.2f}), built in {elapsed:.1f} s")
    print("viewer_results=" + json.dumps({str(k): {a: round(b, 3) for a, b in v.items()} for k, v in results.items()}))


if __name__ == "__main__":
    main()
