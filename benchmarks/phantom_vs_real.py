"""Compare a synthetic TOF-MRA phantom with the real case: a statistics table and MIP pictures.

Usage::

    python benchmarks/phantom_vs_real.py --out /tmp/phantom_vs_real [--real ../shared/data/mra_mni_0656]
        [--seed 0] [--shape 96 96 64] [--spacing 1 1 1]

Prints, for the phantom and (when found) the real case, side by side: vessel fraction of the volume, of the
head mask and of the brain mask (the phantom's own brain mask; :func:`skull_strip` for the real case), mean
intensities inside and outside the label, vessel radii from the label's distance transform sampled on its
skeleton, connected components, intensity percentiles, and what :func:`skull_strip` keeps of each label.
Writes ``phantom_mip.png``, ``real_mip.png`` (image and label MIPs along the three axes) and
``phantom_vs_real_mip.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import ndimage as ndi  # noqa: E402
from skimage.morphology import skeletonize  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from stego_core.data.io import load_volume  # noqa: E402
from stego_core.data.phantom import PhantomConfig, make_phantom  # noqa: E402
from stego_core.data.preprocess import head_mask, label_retention, skull_strip  # noqa: E402

DEFAULT_REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "mra_mni_0656"
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def skeleton_radii(label: np.ndarray, spacing_mm: tuple[float, float, float]) -> np.ndarray:
    """Distance-transform radii (in voxels of the finest axis) sampled on the label's 3D skeleton."""
    if not label.any():
        return np.zeros(0)
    box = ndi.find_objects(label.astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    crop = label[box]
    rel = np.asarray(spacing_mm) / min(spacing_mm)
    dist = ndi.distance_transform_edt(crop, sampling=rel)
    return dist[skeletonize(crop)]


def case_stats(image: np.ndarray, label: np.ndarray, brain: np.ndarray, head: np.ndarray,
               spacing_mm: tuple[float, float, float], *, shell_depth_vox: float) -> dict[str, str]:
    """The rows of the comparison table for one volume, formatted.

    The scalp shell is the bright (> 150) unlabelled voxels of the head within ``shell_depth_vox`` of its
    surface; the table says how much of it :func:`skull_strip` removes.
    """
    label = label.astype(bool)
    radii = skeleton_radii(label, spacing_mm)
    comps, n = ndi.label(label, structure=np.ones((3, 3, 3)))
    sizes = np.bincount(comps.ravel())[1:]
    t0 = time.perf_counter()
    auto = skull_strip(image, spacing_mm=spacing_mm)
    strip_s = time.perf_counter() - t0
    rel = np.asarray(spacing_mm) / min(spacing_mm)
    shell = (image > 150) & ~label & head & (ndi.distance_transform_edt(head, sampling=rel) <= shell_depth_vox)
    bright = (image > 150) & ~label
    pct = np.percentile(image, PERCENTILES)
    pct_head = np.percentile(image[head], PERCENTILES)
    rows = {
        "shape": "x".join(str(s) for s in image.shape),
        "spacing (mm)": "x".join(f"{s:g}" for s in spacing_mm),
        "vessel % of volume": f"{100 * label.mean():.3f}",
        "vessel % of head mask": f"{100 * label.sum() / max(head.sum(), 1):.3f}",
        "vessel % of brain mask": f"{100 * label.sum() / max(brain.sum(), 1):.3f}",
        "head mask % of volume": f"{100 * head.mean():.1f}",
        "brain mask % of volume": f"{100 * brain.mean():.1f}",
        "mean intensity in label": f"{image[label].mean():.1f}",
        "mean intensity outside label": f"{image[~label].mean():.1f}",
        "mean in brain, outside label": f"{image[brain & ~label].mean():.1f}",
        "skeleton radius median (vox)": f"{np.median(radii):.2f}" if radii.size else "-",
        "skeleton radius p95 (vox)": f"{np.percentile(radii, 95):.2f}" if radii.size else "-",
        "skeleton radius max (vox)": f"{radii.max():.2f}" if radii.size else "-",
        "components (26-conn)": str(n),
        "largest component %": f"{100 * sizes.max() / sizes.sum():.1f}" if n else "-",
        "intensity p1/5/25/50/75/95/99": "/".join(f"{v:.0f}" for v in pct),
        "... inside head mask": "/".join(f"{v:.0f}" for v in pct_head),
        "skull_strip mask % of volume": f"{100 * auto.mean():.1f}",
        "skull_strip label retention %": f"{100 * label_retention(auto, label):.2f}",
        "head_mask label retention %": f"{100 * label_retention(head, label):.2f}",
        "skull_strip bright(>150) removed %": f"{100 * (bright & ~auto).sum() / max(bright.sum(), 1):.1f}",
        "skull_strip bright shell removed %": f"{100 * (shell & ~auto).sum() / max(shell.sum(), 1):.1f}",
        "bright shell depth (vox)": f"{shell_depth_vox:g}",
        "skull_strip time (s)": f"{strip_s:.2f}",
    }
    return rows


def save_mips(path: Path, image: np.ndarray, label: np.ndarray, spacing_mm: tuple[float, float, float],
              title: str) -> Path:
    """Image and label maximum-intensity projections along the three axes (superior up)."""
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    names = ("sagittal (max over I)", "coronal (max over J)", "axial (max over K)")
    for axis in range(3):
        other = [a for a in range(3) if a != axis]
        aspect = spacing_mm[other[1]] / spacing_mm[other[0]]
        for row, (vol, cmap, vmax) in enumerate(((image, "gray", 255), (label.astype(np.uint8), "gray", 1))):
            ax = axes[row, axis]
            ax.imshow(vol.max(axis=axis).T, cmap=cmap, vmin=0, vmax=vmax, origin="lower", aspect=aspect,
                      interpolation="nearest")
            ax.set_title(f"{'image' if row == 0 else 'label'} MIP, {names[axis]}", fontsize=9)
            ax.set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def save_side_by_side(path: Path, cases: list[tuple[str, np.ndarray, tuple[float, float, float]]]) -> Path:
    """Image MIPs of several volumes, one row each."""
    fig, axes = plt.subplots(len(cases), 3, figsize=(12, 4 * len(cases)), squeeze=False)
    for row, (name, image, spacing) in enumerate(cases):
        for axis in range(3):
            other = [a for a in range(3) if a != axis]
            ax = axes[row, axis]
            ax.imshow(image.max(axis=axis).T, cmap="gray", vmin=0, vmax=255, origin="lower",
                      aspect=spacing[other[1]] / spacing[other[0]], interpolation="nearest")
            ax.set_title(f"{name}: MIP over axis {axis}", fontsize=9)
            ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--real", type=Path, default=DEFAULT_REAL,
                        help="real case folder with image.nii.gz and label.nii.gz (skipped when absent)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="phantom grid (default 96 96 64)")
    parser.add_argument("--spacing", type=float, nargs=3, default=None, help="phantom spacing in mm")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    overrides = {}
    if args.shape:
        overrides["shape"] = tuple(args.shape)
    if args.spacing:
        overrides["spacing_mm"] = tuple(args.spacing)
    config = PhantomConfig(**overrides)
    t0 = time.perf_counter()
    ph = make_phantom(config, seed=args.seed)
    make_s = time.perf_counter() - t0
    columns = {"phantom": case_stats(ph.image, ph.label > 0, ph.brain_mask > 0, ph.head_mask > 0,
                                     config.spacing_mm, shell_depth_vox=config.scalp_mm / min(config.spacing_mm))}
    columns["phantom"]["generation time (s)"] = f"{make_s:.2f}"
    pictures = [save_mips(args.out / "phantom_mip.png", ph.image, ph.label, config.spacing_mm,
                          f"phantom seed {args.seed} (brain mask: the phantom's own)")]
    side = [("phantom", ph.image, config.spacing_mm)]

    if (args.real / "image.nii.gz").is_file() and (args.real / "label.nii.gz").is_file():
        vol = load_volume(args.real / "image.nii.gz")
        image = vol.data.astype(np.float32)
        label = load_volume(args.real / "label.nii.gz").data > 0
        spacing = vol.spacing_mm
        brain = skull_strip(image, spacing_mm=spacing)
        head = head_mask(image, spacing_mm=spacing)
        columns["real"] = case_stats(image, label, brain, head, spacing, shell_depth_vox=12.0)
        columns["real"]["generation time (s)"] = "-"
        pictures.append(save_mips(args.out / "real_mip.png", image, label, spacing,
                                  f"{args.real.name} (brain mask: skull_strip)"))
        side.append((args.real.name, image, spacing))
    else:
        print(f"real case not found at {args.real}; showing the phantom only")
    pictures.append(save_side_by_side(args.out / "phantom_vs_real_mip.png", side))

    names = list(columns)
    keys = list(columns[names[0]])
    width = max(len(k) for k in keys)
    print(f"{'':{width}}  " + "  ".join(f"{n:>24}" for n in names))
    for key in keys:
        print(f"{key:{width}}  " + "  ".join(f"{columns[n].get(key, '-'):>24}" for n in names))
    for path in pictures:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
