"""What STEGO's feature cache costs: bytes per crop, per volume and per 20 volumes, and what ``train.cache_max_gb``
keeps.

Crops per volume are counted as training counts them (``slicing.crop_index`` along axis 2 with the default
patch 32 / stride 16 and ``min_brain_fraction``) on a real case when ``--case`` is given, else on a 320 x 320 x 247
volume whose brain is a centred ellipsoid. Nothing is computed on a GPU: the numbers are shapes times bytes.

    python benchmarks/cache_budget.py --case ../shared/data/mra_mni_0656

Last lines are machine-readable: ``<backbone>_bytes_per_crop=...``, ``<backbone>_gb_per_volume=...``.
"""

from __future__ import annotations

import argparse

import numpy as np

from stego_core.data.cases import DataConfig
from stego_core.data.slicing import SlicingConfig, crop_index
from stego_core.features.backbones import build_backbone
from stego_core.features.cache import feature_bytes_per_crop

BACKBONES = (("vit_small_patch8_dino", 224), ("mra_vit_t4_p2", None), ("mra_vit_s12_p8", None), ("classical", 16))


def crops_per_volume(case: str | None, slicing: SlicingConfig) -> tuple[int, str]:
    if case:
        from stego_core.data.cases import preprocess_case
        from stego_core.data.io import make_case

        prepared = preprocess_case(make_case(case), DataConfig(source="folder", root=case))
        shape, mask, what = prepared.image.shape, prepared.brain_mask, case
    else:
        shape = (320, 320, 247)
        grid = np.ogrid[tuple(slice(0, s) for s in shape)]
        mask = sum(((g - s / 2) / (0.4 * s)) ** 2 for g, s in zip(grid, shape)) <= 1.0
        what = "320x320x247 synthetic ellipsoid brain"
    index = crop_index(shape, axis=slicing.axis, patch_size=slicing.patch_size, stride=slicing.stride,
                       brain_mask=mask, min_brain_fraction=slicing.min_brain_fraction)
    return len(index), what


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--case", default=None, help="a case folder (image.nii.gz) to count crops on")
    p.add_argument("--volumes", type=int, default=20)
    p.add_argument("--cache-max-gb", type=float, default=20.0)
    p.add_argument("--crops-per-volume-cap", type=int, default=1000, help="the original project's subsample")
    args = p.parse_args()
    slicing = SlicingConfig()
    n, what = crops_per_volume(args.case, slicing)
    print(f"crops per volume: {n} ({what}; patch {slicing.patch_size}, stride {slicing.stride}, axis "
          f"{slicing.axis})")
    print(f"| backbone | features per crop | bytes per crop | GB per volume | GB for {args.volumes} volumes | "
          f"crops in {args.cache_max_gb:g} GB | GB at {args.crops_per_volume_cap} crops/volume x {args.volumes} |")
    print("|---|---|---|---|---|---|---|")
    lines = []
    for name, res in BACKBONES:
        backbone = build_backbone(name, weights="random", res=res)
        per_crop = feature_bytes_per_crop(backbone, slicing.patch_size)
        shape = "x".join(str(s) for s in backbone.output_shape(slicing.patch_size))
        print(f"| {name} | {shape} float16 | {per_crop:,} | {n * per_crop / 1e9:.2f} | "
              f"{args.volumes * n * per_crop / 1e9:.1f} | {int(args.cache_max_gb * 1e9 // per_crop):,} | "
              f"{args.crops_per_volume_cap * args.volumes * per_crop / 1e9:.2f} |")
        lines += [f"{name}_bytes_per_crop={per_crop}", f"{name}_gb_per_volume={n * per_crop / 1e9:.3f}"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
