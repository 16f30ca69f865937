"""Domain-randomized synthetic vessel patches for zero-shot vessel segmentation (issue 31).

One call of :func:`generate` turns one integer seed into one training pair ``(image, label)``: a 3D patch
(default 64^3 voxels) holding

- vessel geometry (:func:`vessel_occupancy`): either sparse arterial trees grown by the project's
  Murray's-law tree grower (:func:`stego_core.data.phantom.grow_tree`, radii from sub-voxel to ~10 voxels, random
  bifurcation angles, segment lengths and tortuosity) or a dense capillary bed of tortuous, branching
  random-walk tubes filling up to ~40 % of the patch; tubes are drawn with partial-volume edges by the
  project's :func:`stego_core.data.phantom._draw_capsules` on a grid whose voxels may be anisotropic (z step
  1-3x the in-plane step);
- label transforms (:func:`transform_occupancy`): flips, in-plane 90-degree rotations, small in-plane
  rotations, zoom, elastic deformation, dilation; the label is ``occupancy >= 0.5`` afterwards, and an
  optional smoothing blurs only the rendered foreground (a point-spread function), never the label;
- a background (:func:`background`): a base level, smooth fields, band-pass noise textures, tissue
  compartments, dark/bright blobs, and bright non-vessel structures (skull/scalp-like curved shells,
  sinus-like thin sheets), sometimes inverted;
- foreground/background merging (:func:`merge`): paint (the vessel replaces the background in proportion to
  its occupancy) or add/subtract (the vessel adds to the background);
- image-level intensity transforms from MONAI (:func:`intensity_transforms`): bias field, Gaussian smoothing,
  sharpening, gamma, histogram shift, Gibbs ringing, k-space spikes, Gaussian and Rician noise, and polarity
  inversion; then a robust percentile normalisation to about [0, 1] (:func:`robust_normalize`), the same
  one zero-shot inference applies to a real volume.

Inspired by vesselFM's domain randomization (Wittmann et al., CVPR 2025); the probabilities of the image-level
transforms are vesselFM's published ones (see :class:`SynthSettings`). Every draw comes from
``np.random.default_rng(seed)`` (MONAI transforms are re-seeded from it), so one seed gives the same bytes.

Units: lengths named ``*_vox`` are in in-plane voxels; z voxels are ``anisotropy`` times longer. Arrays are
``(X, Y, Z)`` with Z the (possibly coarse) slice axis.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from stego_core._checks import check_range
from stego_core.data.phantom import PhantomConfig, _draw_capsules, _random_perpendicular, grow_tree

__all__ = ["SynthSettings", "generate", "vessel_occupancy", "transform_occupancy", "background", "merge",
           "intensity_transforms", "robust_normalize", "sample_grid", "draw_tubes", "LABEL_MIN_RADIUS"]

Range = tuple[float, float]

#: Sub-voxel vessels are labelled as if their radius were this (in-plane voxels): a one-voxel-wide centreline.
LABEL_MIN_RADIUS = 0.55


@dataclass(frozen=True)
class SynthSettings:
    """Every setting of the generator, with its default stated once here.

    Probabilities are named ``p_*``; ranges ``(low, high)`` are drawn uniformly unless said otherwise.

    Attributes
    ----------
    shape : (3,) tuple of int
        Patch size (X, Y, Z) in voxels.
    p_empty : float
        Probability of a vessel-free patch (background, distractors and noise only; label all 0).
    p_dense : float
        Probability that a patch holds a dense capillary bed rather than sparse trees.
    p_both : float
        Probability that a sparse-tree patch also gets a sparse capillary bed (mixed sizes).
    p_anisotropic : float
        Probability of an anisotropic grid; its z step is ``anisotropy`` in-plane steps.
    anisotropy : (2,) float
        Range of the z / in-plane voxel size ratio when anisotropic.
    n_trees : (2,) int
        Range (inclusive) of the number of trees in a sparse patch.
    root_radius_vox : (2,) float
        Range of the root radius of a tree (log-uniform), in-plane voxels.
    min_radius_vox : (2,) float
        Range of the radius below which a tree stops branching.
    max_depth : (2,) int
        Range (inclusive) of bifurcation generations of a tree.
    segment_length_radii : (2,) float
        Segment length between bifurcations, in radii of the segment (the project's phantom: 4-10).
    bifurcation_angle_deg : (2,) float
        Angle between the two children of a bifurcation.
    tortuosity_deg : (2,) float
        Range of the per-step random-turn standard deviation of a tree (one value per patch).
    bed_radius_vox : (2,) float
        Range of the mean capillary radius of a dense bed (log-uniform).
    bed_fill : (2,) float
        Target vessel fraction of a dense bed (before label transforms; log-uniform).
    bed_tortuosity_deg : (2,) float
        Per-step turn of the capillaries.
    p_flip : float
        Flip along each axis, independently.
    p_rot90 : float
        A random in-plane multiple of 90 degrees.
    p_rotate : float
        A small random in-plane rotation (up to ``rotate_deg``).
    rotate_deg : float
    p_zoom, zoom : float, (2,) float
        Isotropic zoom of the geometry (changes radii), then centre crop / pad.
    p_elastic : float
        Smooth random elastic deformation of the geometry (displacements of 1-4 voxels; a torch
        ``grid_sample`` re-implementation: MONAI's ``Rand3DElastic`` costs 0.9 s per 64^3 patch on one core).
    p_dilate : float
        Grey dilation of the occupancy by one voxel (thicker vessels).
    p_fg_smooth, fg_smooth_sigma : float, (2,) float
        Gaussian blur of the rendered foreground only (the label keeps its edges).
    p_compartments : float
        Background split into 2-3 tissue classes of different level along a smooth field.
    p_blobs, n_blobs, blob_radius_vox : float, (2,) int, (2,) float
        Dark or bright ellipsoids (cells, plaques, lesions; never vessel).
    p_organ, organ_radius_vox : float, (2,) float
        1-3 large non-vessel ellipsoids (brain-, organ- or tissue-like masses, radius 12-48 voxels, textured) at
        ``contrast`` x 0.3-1.0. Default 0 (the final model was trained without them); the ``big_blobs``
        variant sets 0.5 after the final model marked a uniform 48^3 cube at 0.5 on 0.1 as vessel (58 %) and
        21 % of a phantom head.
    p_shell : float
        A curved bright shell (scalp / skull / dura-like), 2-12 voxels thick, sometimes doubled.
    p_sheet : float
        Thin bright sheets (sinus walls, meninges, tissue borders seen edge-on), 1-4 voxels thick.
    distractor_level : (2,) float
        Intensity of shells / sheets / bright blobs relative to the vessel contrast.
    p_bg_invert : float
        Background inverted (vesselFM: 0.3).
    p_fg_paint : float
        Paint merge (vessel replaces background) rather than add / subtract (vesselFM: 0.5).
    p_vessel_darker : float
        The vessel is darker than its background (subtract, or paint below the background level). 0 by default:
        with 0.1 (and ``p_invert`` 0.1) the first models marked the dark ventricles of real MRA as vessels.
    contrast : (2,) float
        Absolute vessel contrast (see :func:`merge`); bright distractors scale with it.
    p_bias, bias_coeff : float, (2,) float
        MONAI ``RandBiasField`` (vesselFM: p 0.7).
    p_noise, noise_std : float, float
        MONAI ``RandGaussianNoise`` (std drawn in [0, noise_std]; vesselFM: p 0.6).
    p_spike : float
        MONAI ``RandKSpaceSpikeNoise`` (vesselFM: p 0.2).
    p_gamma, gamma : float, (2,) float
        MONAI ``RandAdjustContrast`` (vesselFM: p 0.2, gamma 0.5-1.5).
    p_smooth, smooth_sigma : float, (2,) float
        MONAI ``RandGaussianSmooth`` per axis, z sigma scaled down by the anisotropy (vesselFM: p 0.9,
        0.25-1.5).
    p_rician, rician_std : float, float
        MONAI ``RandRicianNoise``, std relative to the image std (vesselFM: p 0.2).
    p_gibbs, gibbs_alpha : float, (2,) float
        MONAI ``RandGibbsNoise`` (vesselFM: p 0.1, alpha <= 0.75).
    p_sharpen : float
        MONAI ``RandGaussianSharpen`` (vesselFM: p 0.2).
    p_hist_shift : float
        MONAI ``RandHistogramShift`` (vesselFM: p 0.1).
    p_invert : float
        Whole-image polarity inversion at the end (dark vessels); kept rare (0.05) since both target modalities
        are bright-vessel.
    p_saturate : float
        8-bit-like saturation and quantisation (TOF lumen clipped at the top grey level).
    intensity : bool
        Apply the image-level MONAI transforms at all (ablation switch).
    distractors : bool
        Background blobs, shells and sheets, compartments and textures (ablation switch: False gives a
        smooth field and a flat level only).
    merge_modes : bool
        Randomize the merging (ablation switch: False always paints a brighter vessel on a non-inverted
        background).
    dense : bool
        Allow dense capillary beds (ablation switch).
    """

    shape: tuple[int, int, int] = (64, 64, 64)
    # geometry
    p_empty: float = 0.1
    p_dense: float = 0.35
    p_both: float = 0.25
    p_anisotropic: float = 0.5
    anisotropy: Range = (1.5, 3.0)
    n_trees: tuple[int, int] = (1, 5)
    root_radius_vox: Range = (1.0, 16.0)
    min_radius_vox: Range = (0.3, 1.2)
    max_depth: tuple[int, int] = (3, 9)
    segment_length_radii: Range = (3.0, 12.0)
    bifurcation_angle_deg: Range = (30.0, 90.0)
    tortuosity_deg: Range = (3.0, 25.0)
    bed_radius_vox: Range = (0.8, 8.0)
    bed_fill: Range = (0.03, 0.40)
    bed_tortuosity_deg: Range = (10.0, 35.0)
    # label transforms
    p_flip: float = 0.5
    p_rot90: float = 0.5
    p_rotate: float = 0.2
    rotate_deg: float = 30.0
    p_zoom: float = 0.2
    zoom: Range = (0.8, 1.25)
    p_elastic: float = 0.2
    p_dilate: float = 0.1
    p_fg_smooth: float = 0.2
    fg_smooth_sigma: Range = (0.3, 1.0)
    # background
    p_compartments: float = 0.4
    p_blobs: float = 0.4
    n_blobs: tuple[int, int] = (1, 30)
    blob_radius_vox: Range = (1.5, 8.0)
    p_organ: float = 0.0
    organ_radius_vox: Range = (12.0, 48.0)
    p_shell: float = 0.3
    p_sheet: float = 0.25
    distractor_level: Range = (0.5, 1.3)
    p_bg_invert: float = 0.3
    # merging
    p_fg_paint: float = 0.5
    p_vessel_darker: float = 0.0
    contrast: Range = (0.2, 1.2)
    # image-level intensity (MONAI), vesselFM's probabilities
    p_bias: float = 0.7
    bias_coeff: Range = (0.0, 0.1)
    p_noise: float = 0.6
    noise_std: float = 0.1
    p_spike: float = 0.2
    p_gamma: float = 0.2
    gamma: Range = (0.5, 1.5)
    p_smooth: float = 0.9
    smooth_sigma: Range = (0.25, 1.5)
    p_rician: float = 0.2
    rician_std: float = 0.3
    p_gibbs: float = 0.1
    gibbs_alpha: Range = (0.0, 0.75)
    p_sharpen: float = 0.2
    p_hist_shift: float = 0.1
    p_invert: float = 0.05
    p_saturate: float = 0.2
    # ablation switches
    intensity: bool = True
    distractors: bool = True
    merge_modes: bool = True
    dense: bool = True

    def __post_init__(self) -> None:
        if len(self.shape) != 3 or any(int(n) != n or n < 16 for n in self.shape):
            raise ValueError(f"synth.shape={self.shape!r} must be three integer sizes >= 16")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_"):
                check_range(value, f"synth.{f.name}", 0.0, 1.0)
            elif isinstance(value, tuple) and len(value) == 2 and f.name != "shape":
                if not value[0] <= value[1]:
                    raise ValueError(f"synth.{f.name}={value!r} must be a (low, high) pair with low <= high")
        for name in ("root_radius_vox", "min_radius_vox", "bed_radius_vox", "bed_fill", "organ_radius_vox",
                     "blob_radius_vox", "anisotropy"):
            if getattr(self, name)[0] <= 0:
                raise ValueError(f"synth.{name}={getattr(self, name)!r} must be positive")
        if self.bed_fill[1] >= 1.0:
            raise ValueError(f"synth.bed_fill={self.bed_fill!r} must stay below 1")

    def replace(self, **changes: Any) -> "SynthSettings":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Zero-mean, unit-max-abs random field varying over about ``shape / cells`` voxels.

    The same field as :func:`stego_core.data.phantom._smooth_field` (coarse Gaussian grid upsampled) but trilinear
    upsampling with torch (about 20x faster than the cubic ``ndimage.zoom`` on a 64^3 patch).
    """
    import torch

    coarse = torch.as_tensor(rng.standard_normal((1, 1) + tuple(max(2, cells) + 1 for _ in shape)),
                             dtype=torch.float32)
    fine = torch.nn.functional.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]
    fine = fine.numpy()
    fine = fine - fine.mean()
    return (fine / max(float(np.abs(fine).max()), 1e-12)).astype(np.float32)


def _elastic(vol: np.ndarray, rng: np.random.Generator, magnitude: float, cells: int = 4) -> np.ndarray:
    """Smooth random elastic deformation of a (C, X, Y, Z) stack (displacements up to ``magnitude`` voxels),
    trilinear resampling, the same deformation for every channel."""
    import torch

    shape = vol.shape[1:]
    disp = torch.as_tensor(rng.standard_normal((1, 3) + (cells,) * 3) * magnitude / 2.0, dtype=torch.float32)
    disp = torch.nn.functional.interpolate(disp, size=shape, mode="trilinear", align_corners=True)[0]
    grid = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"))
    pos = grid + disp
    # grid_sample wants (x, y, z) = (last, middle, first) axes, normalised to [-1, 1]
    norm = torch.stack([2 * pos[i] / (shape[i] - 1) - 1 for i in (2, 1, 0)], dim=-1)[None]
    out = torch.nn.functional.grid_sample(torch.as_tensor(vol, dtype=torch.float32)[None], norm,
                                          mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[0].numpy()


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _loguniform(rng: np.random.Generator, r: Range) -> float:
    return float(np.exp(rng.uniform(np.log(r[0]), np.log(r[1]))))


# ----------------------------------------------------------------------------------------------------------------
# geometry


class _BoxField:
    """Duck-typed :class:`stego_core.data.phantom.VesselField` of a box: depth = distance to the nearest face.

    Trees grown with it stop when they reach the box's faces; the box is the patch plus a margin, so vessels
    enter and leave the patch as they do in a crop of a larger volume.
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray):
        self.lo, self.hi = np.asarray(lo, float), np.asarray(hi, float)

    def depth_at(self, p: np.ndarray) -> float:
        return float(min((p - self.lo).min(), (self.hi - p).min()))

    def inward(self, p: np.ndarray) -> np.ndarray:
        d = np.concatenate([p - self.lo, self.hi - p])
        i = int(np.argmin(d))
        u = np.zeros(3)
        u[i % 3] = 1.0 if i < 3 else -1.0
        return u


def _tree_capsules(rng: np.random.Generator, s: SynthSettings, extent: np.ndarray) -> list:
    """Capsules ``(p0, p1, r)`` (in-plane voxel units) of 1-5 Murray trees rooted on the margin box."""
    margin = 0.25 * extent.max()
    lo, hi = -margin * np.ones(3), extent + margin
    fld = _BoxField(lo, hi)
    cfg = PhantomConfig(min_radius_vox=_uniform(rng, s.min_radius_vox),
                        max_depth=int(rng.integers(s.max_depth[0], s.max_depth[1] + 1)),
                        segment_length_radii=s.segment_length_radii,
                        bifurcation_angle_deg=s.bifurcation_angle_deg,
                        tortuosity_deg=_uniform(rng, s.tortuosity_deg))
    capsules: list = []
    for _ in range(int(rng.integers(s.n_trees[0], s.n_trees[1] + 1))):
        r0 = _loguniform(rng, s.root_radius_vox)
        # a root on a random face of the margin box, aimed at a random point of the patch
        face = int(rng.integers(6))
        root = rng.uniform(lo + r0 + 1.5, hi - r0 - 1.5)
        root[face % 3] = (lo if face < 3 else hi)[face % 3] + (1 if face < 3 else -1) * (r0 + 1.5)
        target = rng.uniform(0.2 * extent, 0.8 * extent)
        grow_tree(root, target - root, r0, cfg, fld, rng, 1.0, capsules)
    return capsules


def _bed_capsules(rng: np.random.Generator, s: SynthSettings, extent: np.ndarray, fill: float) -> list:
    """Capsules of a capillary bed: tortuous random-walk tubes of similar radius, branching from each other,
    added until their summed volume inside the patch reaches ``-log(1 - fill)`` of it (overlap-corrected)."""
    r_mean = _loguniform(rng, s.bed_radius_vox)
    tort = np.deg2rad(_uniform(rng, s.bed_tortuosity_deg))
    need = -np.log(1.0 - min(fill, 0.9)) * float(np.prod(extent))
    have = 0.0
    capsules: list = []
    points: list = []
    max_capsules = 6000
    while have < need and len(capsules) < max_capsules:
        r = float(np.clip(r_mean * rng.lognormal(0.0, 0.25), 0.5, 12.0))
        if points and rng.random() < 0.6:  # branch off an existing tube
            p = points[int(rng.integers(len(points)))].copy()
        else:
            p = rng.uniform(0.0, extent)
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        step = max(1.5 * r, 2.0)
        length = rng.uniform(8.0, 30.0) * max(r, 1.5)
        for _ in range(max(1, int(length / step))):
            u = u + np.tan(rng.normal(0.0, tort)) * _random_perpendicular(u, rng)
            u /= np.linalg.norm(u)
            q = p + step * u
            mid = 0.5 * (p + q)
            if (mid < -step).any() or (mid > extent + step).any():
                break
            capsules.append((p, q, r))
            if (mid >= 0).all() and (mid <= extent).all():
                have += np.pi * r * r * step
            points.append(q)
            p = q
    return capsules


def vessel_occupancy(rng: np.random.Generator, s: SynthSettings) -> tuple[np.ndarray, dict]:
    """Vessel occupancy of one patch.

    Parameters
    ----------
    rng : numpy.random.Generator
    s : SynthSettings

    Returns
    -------
    occupancy : (2, X, Y, Z) float32 ndarray
        Channel 0: fraction of each voxel filled by vessel, in [0, 1] (partial-volume edges, thin vessels
        faint): what the image shows. Channel 1: the same with every radius raised to at least
        ``LABEL_MIN_RADIUS`` voxels: what the label is cut from (``>= 0.5``), so a faint sub-voxel vessel
        is still labelled along its centreline, as tree labels of real angiograms do.
    info : dict
        ``mode`` ("trees", "bed", "trees+bed"), ``anisotropy`` (z / in-plane voxel size), ``n_capsules``.
    """
    shape = np.asarray(s.shape)
    aniso = _uniform(rng, s.anisotropy) if rng.random() < s.p_anisotropic else 1.0
    spacing = np.array([1.0, 1.0, aniso])
    extent = shape * spacing
    empty = rng.random() < s.p_empty
    dense = s.dense and rng.random() < s.p_dense
    if empty:
        caps, mode = [], "empty"
    elif dense:
        caps, mode = _bed_capsules(rng, s, extent, _loguniform(rng, s.bed_fill)), "bed"
    else:
        caps, mode = _tree_capsules(rng, s, extent), "trees"
        if s.dense and rng.random() < s.p_both:
            caps += _bed_capsules(rng, s.replace(bed_radius_vox=(0.6, 2.0)), extent, _loguniform(rng, (0.01, 0.06)))
            mode = "trees+bed"
    return draw_tubes(caps, tuple(int(n) for n in shape), aniso), {"mode": mode, "anisotropy": aniso,
                                                                   "n_capsules": len(caps)}


def draw_tubes(capsules: list, shape: tuple[int, int, int], anisotropy: float = 1.0) -> np.ndarray:
    """Image and label occupancies of tubes (capsules).

    Parameters
    ----------
    capsules : list of (p0, p1, r)
        End points (3,) and radius of each capsule in in-plane voxel units (z positions in in-plane voxels too:
        a z voxel spans ``anisotropy`` units).
    shape : (3,) tuple of int
    anisotropy : float
        z / in-plane voxel size.

    Returns
    -------
    (2, X, Y, Z) float32 ndarray in [0, 1]
        Channel 0: partial-volume occupancy (what the image shows); channel 1: the same with radii raised to
        ``LABEL_MIN_RADIUS`` (the label is ``channel 1 >= 0.5``; a sub-voxel vessel keeps a one-voxel centreline).

    Examples
    --------
    >>> tube = [(np.array([10.0, 10.0, -2.0]), np.array([10.0, 10.0, 40.0]), 3.0)]
    >>> int((draw_tubes(tube, (20, 20, 32))[1] >= 0.5).sum())  # pi r^2 x 32 slices = 905
    928
    """
    spacing = np.array([1.0, 1.0, float(anisotropy)])
    occ = _draw_capsules(capsules, shape, spacing) if capsules else np.zeros(shape, np.float32)
    thin = [(p, q, LABEL_MIN_RADIUS) for p, q, r in capsules if r < LABEL_MIN_RADIUS]
    lab = np.maximum(occ, _draw_capsules(thin, shape, spacing)) if thin else occ.copy()
    return np.stack([occ, lab])


# ----------------------------------------------------------------------------------------------------------------
# label transforms


def _fit(vol: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Centre-crop or zero-pad ``vol`` to ``shape``."""
    out = np.zeros(shape, vol.dtype)
    src, dst = [], []
    for n, m in zip(vol.shape, shape):
        if n >= m:
            a = (n - m) // 2
            src.append(slice(a, a + m))
            dst.append(slice(0, m))
        else:
            a = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(a, a + n))
    out[tuple(dst)] = vol[tuple(src)]
    return out


def transform_occupancy(occ: np.ndarray, rng: np.random.Generator, s: SynthSettings) -> np.ndarray:
    """Random geometric label transforms of an occupancy map (the label is ``result >= 0.5``).

    Parameters
    ----------
    occ : (C, X, Y, Z) float32 ndarray in [0, 1]
        Channels transformed alike (image occupancy and label occupancy).
    rng : numpy.random.Generator
    s : SynthSettings
        ``p_flip``, ``p_rot90``, ``p_rotate``, ``p_zoom``, ``p_elastic``, ``p_dilate``.

    Returns
    -------
    (C, X, Y, Z) float32 ndarray in [0, 1]
        Same shape. Rotations stay in-plane (X, Y) so the anisotropic Z axis keeps its meaning.
    """
    shape = occ.shape
    for ax in (1, 2, 3):
        if rng.random() < s.p_flip:
            occ = np.flip(occ, ax)
    if rng.random() < s.p_rot90:
        occ = np.rot90(occ, int(rng.integers(1, 4)), axes=(1, 2))
    occ = np.ascontiguousarray(occ)
    if rng.random() < s.p_rotate:
        occ = ndi.rotate(occ, rng.uniform(-s.rotate_deg, s.rotate_deg), axes=(1, 2), reshape=False, order=1,
                         mode="constant")
    if rng.random() < s.p_zoom:
        z = _uniform(rng, s.zoom)
        occ = _fit(ndi.zoom(occ, (1.0, z, z, z), order=1), shape)
    if rng.random() < s.p_elastic:
        occ = _elastic(occ, rng, rng.uniform(1.0, 4.0))
    if rng.random() < s.p_dilate:
        occ = ndi.grey_dilation(occ, size=(1, 3, 3, 3))
    return np.clip(occ, 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# background


def _band_texture(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, spacing: np.ndarray) -> np.ndarray:
    white = rng.standard_normal(shape).astype(np.float32)
    sig = sigma / spacing
    band = ndi.gaussian_filter(white, sig) - ndi.gaussian_filter(white, 2.0 * sig)
    return band / max(float(band.std()), 1e-6)


def _soft(d: np.ndarray) -> np.ndarray:
    """Partial-volume occupancy of a signed distance (negative inside), a one-voxel ramp."""
    return np.clip(0.5 - d, 0.0, 1.0).astype(np.float32)


def background(rng: np.random.Generator, s: SynthSettings, anisotropy: float,
               contrast: float = 0.6) -> tuple[np.ndarray, dict]:
    """A random non-vessel background on [0, ~1.5].

    Parameters
    ----------
    rng : numpy.random.Generator
    s : SynthSettings
    anisotropy : float
        z / in-plane voxel size of the patch (distances are measured in in-plane voxels).
    contrast : float
        The vessel contrast of this patch (see :func:`merge`): bright distractors get ``contrast`` times
        ``distractor_level``, so they are about as bright as the vessels and only shape tells them apart.

    Returns
    -------
    image : (X, Y, Z) float32 ndarray
        Background intensities: level (0-0.4) + smooth field (+-0.25) + texture + compartments, blobs (dark or
        bright) and bright shells / sheets.
    info : dict
        Which components were drawn.
    """
    shape = tuple(int(n) for n in s.shape)
    sp = np.array([1.0, 1.0, anisotropy])
    info: dict = {}
    img = np.full(shape, rng.uniform(0.0, 0.4), np.float32)
    img += rng.uniform(0.0, 0.25) * _smooth_field(rng, shape, int(rng.integers(2, 6)))
    if not s.distractors:
        return img, info
    if rng.random() < 0.7:
        sigma = _loguniform(rng, (0.5, 6.0))
        img += rng.uniform(0.0, 0.12) * _band_texture(rng, shape, sigma, sp)
        info["texture"] = round(sigma, 2)
    coords = np.meshgrid(*[np.arange(n) * a for n, a in zip(shape, sp)], indexing="ij", sparse=True)
    if rng.random() < s.p_compartments:
        f = _smooth_field(rng, shape, int(rng.integers(2, 5)))
        cuts = np.sort(rng.uniform(-0.5, 0.5, int(rng.integers(1, 3))))
        cls = np.digitize(f, cuts)
        levels = rng.uniform(-0.3, 0.3, len(cuts) + 1).astype(np.float32)
        img += ndi.gaussian_filter(levels[cls], 0.7 / sp)
        info["compartments"] = len(cuts) + 1
    if s.p_organ and rng.random() < s.p_organ:
        tex = 1.0 + 0.15 * _smooth_field(rng, shape, 6)
        for _ in range(int(rng.integers(1, 4))):
            c = rng.uniform(-0.2, 1.2, 3) * np.asarray(shape) * sp
            rad = _loguniform(rng, s.organ_radius_vox) * rng.uniform(0.6, 1.4, 3)
            rho = np.sqrt(sum(((coords[i] - c[i]) / rad[i]) ** 2 for i in range(3)))
            img += contrast * rng.uniform(0.3, 1.0) * tex * _soft((rho - 1.0) * rad.min())
        info["organ"] = True
    if rng.random() < s.p_blobs:
        n = int(rng.integers(s.n_blobs[0], s.n_blobs[1] + 1))
        bright = rng.random() < 0.5
        for _ in range(n):
            c = rng.uniform(0, 1, 3) * np.asarray(shape) * sp
            rad = _loguniform(rng, s.blob_radius_vox) * rng.uniform(0.6, 1.4, 3)
            lo = np.maximum(((c - rad - 2) / sp).astype(int), 0)
            hi = np.minimum(((c + rad + 2) / sp).astype(int) + 1, shape)
            if (hi <= lo).any():
                continue
            sub = tuple(slice(a, b) for a, b in zip(lo, hi))
            rho = sum(((coords[i][tuple(sub[j] if j == i else slice(None) for j in range(3))] - c[i]) / rad[i]) ** 2
                      for i in range(3))
            d = (np.sqrt(rho) - 1.0) * rad.min()
            lvl = (contrast * _uniform(rng, s.distractor_level) if bright else -rng.uniform(0.1, 0.4))
            img[sub] += lvl * _soft(d)
        info["blobs"] = (n, "bright" if bright else "dark")
    if rng.random() < s.p_shell:
        # a sphere of large radius whose centre lies outside the patch: a curved shell crossing it
        ext = np.asarray(shape) * sp
        big = rng.uniform(0.8, 3.0) * ext.max()
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        centre = 0.5 * ext + direction * (big + rng.uniform(-0.4, 0.4) * ext.max())
        rr = np.sqrt(sum((coords[i] - centre[i]) ** 2 for i in range(3)))
        depth = big - rr  # > 0 inside the sphere
        thick = rng.uniform(2.0, 12.0)
        lvl = contrast * _uniform(rng, s.distractor_level)
        img += lvl * _soft(np.abs(depth - 0.5 * thick) - 0.5 * thick) * (1 + 0.2 * _smooth_field(rng, shape, 6))
        if rng.random() < 0.5:  # a dark layer (skull) then a second bright layer (skin / dura) beyond it
            gap = rng.uniform(2.0, 8.0)
            thick2 = rng.uniform(1.0, 4.0)
            img -= rng.uniform(0.0, 0.3) * _soft(np.abs(depth + 0.5 * gap) - 0.5 * gap)
            img += 0.8 * lvl * _soft(np.abs(depth + gap + 0.5 * thick2) - 0.5 * thick2)
        info["shell"] = round(thick, 1)
    if rng.random() < s.p_sheet:
        for _ in range(int(rng.integers(1, 3))):
            nrm = rng.standard_normal(3)
            nrm /= np.linalg.norm(nrm)
            ext = np.asarray(shape) * sp
            off = float(nrm.dot(rng.uniform(0.2, 0.8, 3) * ext))
            bend = rng.uniform(0.0, 8.0) * _smooth_field(rng, shape, 3)
            dist = sum(coords[i] * nrm[i] for i in range(3)) - off + bend
            thick = rng.uniform(1.0, 4.0)
            img += contrast * _uniform(rng, s.distractor_level) * _soft(np.abs(dist) - 0.5 * thick)
        info["sheet"] = True
    return img.astype(np.float32), info


# ----------------------------------------------------------------------------------------------------------------
# merging


def merge(bg: np.ndarray, occ: np.ndarray, rng: np.random.Generator, s: SynthSettings,
          contrast: float = 0.6) -> tuple[np.ndarray, dict]:
    """Put the vessels into the background.

    Parameters
    ----------
    bg : (X, Y, Z) float32 ndarray
        Background from :func:`background`.
    occ : (X, Y, Z) float32 ndarray in [0, 1]
        Foreground occupancy (possibly blurred: ``p_fg_smooth``).
    rng : numpy.random.Generator
    s : SynthSettings
        ``p_bg_invert``, ``p_fg_paint``, ``p_vessel_darker``.
    contrast : float
        Absolute vessel contrast (the background's base level spans 0-0.4 and its smooth field +-0.25): paint
        sets the vessel to the background's 99th percentile plus ``contrast`` (or its 1st minus it), add
        adds (subtracts) ``contrast`` times the occupancy.

    Returns
    -------
    image : (X, Y, Z) float32 ndarray
    info : dict
        ``merge`` ("paint" or "add"), ``darker``, ``bg_inverted``.
    """
    info: dict = {}
    if s.merge_modes and rng.random() < s.p_bg_invert:
        bg = float(bg.max()) + float(bg.min()) - bg
        info["bg_inverted"] = True
    lo, hi = np.percentile(bg, [1, 99])
    c = contrast
    darker = s.merge_modes and rng.random() < s.p_vessel_darker
    # vessel intensity varies smoothly along the tree (flow, coil sensitivity, dye concentration)
    var = 1.0 + rng.uniform(0.0, 0.3) * _smooth_field(rng, bg.shape, int(rng.integers(2, 6)))
    paint = (not s.merge_modes) or rng.random() < s.p_fg_paint
    if paint:
        level = (lo - c) if darker else (hi + c)
        img = bg * (1.0 - occ) + level * var * occ
    else:
        img = bg + (-c if darker else c) * var * occ
    info.update(merge="paint" if paint else "add", darker=bool(darker))
    return img.astype(np.float32), info


# ----------------------------------------------------------------------------------------------------------------
# image-level intensity transforms (MONAI)


def robust_normalize(img: np.ndarray, low: float = 0.5, high: float = 99.9, *, clip: bool = True) -> np.ndarray:
    """Map the ``low`` and ``high`` percentiles to 0 and 1 (clipped to [0, 1] when ``clip``).

    Parameters
    ----------
    img : ndarray, any shape
    low, high : float
        Percentiles in [0, 100].
    clip : bool

    Returns
    -------
    float32 ndarray, same shape
    """
    a, b = np.percentile(img, [low, high])
    out = (img - a) / max(float(b - a), 1e-6)
    return (np.clip(out, 0.0, 1.0) if clip else out).astype(np.float32)


def intensity_transforms(img: np.ndarray, rng: np.random.Generator, s: SynthSettings,
                         anisotropy: float = 1.0) -> tuple[np.ndarray, list[str]]:
    """vesselFM-style image-level randomization with MONAI transforms, then robust normalisation.

    Parameters
    ----------
    img : (X, Y, Z) float32 ndarray
        The merged image (any range; min-max scaled to [0, 1] first).
    rng : numpy.random.Generator
        Each MONAI transform is seeded from it.
    s : SynthSettings
    anisotropy : float
        z / in-plane voxel size: the z sigma of the smoothing is divided by it (the PSF is set in in-plane
        voxels; an anisotropic stack is still often blurrier along z, so z gets an extra random factor).

    Returns
    -------
    image : (X, Y, Z) float32 ndarray
        Robustly normalised (0.5 / 99.9 percentiles to [0, 1], clipped).
    applied : list of str
        Names of the transforms that fired.
    """
    import torch
    from monai import transforms as T

    x = (img - img.min()) / max(float(img.max() - img.min()), 1e-6)
    t = torch.as_tensor(x[None].astype(np.float32))
    applied: list[str] = []
    if not s.intensity:
        return robust_normalize(t[0].numpy()), applied
    zf = rng.uniform(0.7, 2.0) / anisotropy
    sig = s.smooth_sigma
    steps = [
        ("bias", s.p_bias, lambda: T.RandBiasField(degree=3, coeff_range=s.bias_coeff, prob=1.0)),
        ("smooth", s.p_smooth, lambda: T.RandGaussianSmooth(sigma_x=sig, sigma_y=sig,
                                                            sigma_z=(sig[0] * zf, sig[1] * zf), prob=1.0)),
        ("sharpen", s.p_sharpen, lambda: T.RandGaussianSharpen(prob=1.0)),
        ("gamma", s.p_gamma, lambda: T.RandAdjustContrast(gamma=s.gamma, prob=1.0)),
        ("hist_shift", s.p_hist_shift, lambda: T.RandHistogramShift(num_control_points=(5, 15), prob=1.0)),
        ("gibbs", s.p_gibbs, lambda: T.RandGibbsNoise(alpha=s.gibbs_alpha, prob=1.0)),
        ("spike", s.p_spike, lambda: T.RandKSpaceSpikeNoise(prob=1.0, intensity_range=(8.0, 11.0))),
        ("noise", s.p_noise, lambda: T.RandGaussianNoise(std=s.noise_std, prob=1.0)),
        ("rician", s.p_rician, lambda: T.RandRicianNoise(std=s.rician_std, relative=True, prob=1.0)),
    ]
    for name, p, make in steps:
        if rng.random() < p:
            tr = make()
            tr.set_random_state(seed=int(rng.integers(2 ** 31)))
            t = torch.as_tensor(np.asarray(tr(t)), dtype=torch.float32)
            if name in ("spike", "gibbs"):
                t = t.abs() if name == "gibbs" else t
            applied.append(name)
    out = t[0].numpy().astype(np.float32)
    if rng.random() < s.p_invert:
        out = -out
        applied.append("invert")
    if rng.random() < s.p_saturate:
        # 8-bit TOF: the brightest lumen voxels clip at the top grey level, then 256 levels
        top = np.percentile(out, rng.uniform(99.0, 99.95))
        bot = np.percentile(out, 0.1)
        out = np.round(255 * np.clip((out - bot) / max(top - bot, 1e-6), 0, 1)) / 255.0
        applied.append("saturate")
    return robust_normalize(out), applied


# ----------------------------------------------------------------------------------------------------------------
# the whole sample


def generate(seed: int, settings: SynthSettings = SynthSettings()) -> tuple[np.ndarray, np.ndarray, dict]:
    """One synthetic training pair, deterministic in ``seed``.

    Parameters
    ----------
    seed : int
        Seed of ``np.random.default_rng``; the same seed and settings give the same bytes.
    settings : SynthSettings

    Returns
    -------
    image : (X, Y, Z) float32 ndarray
        In [0, 1] (robust percentile normalisation), ``settings.shape``.
    label : (X, Y, Z) uint8 ndarray
        1 where the transformed vessel occupancy is >= 0.5.
    info : dict
        What was drawn: geometry mode, anisotropy, vessel fraction, background parts, merge, transforms.
    """
    s = settings
    rng = np.random.default_rng(int(seed))
    occ2, info = vessel_occupancy(rng, s)
    occ2 = transform_occupancy(occ2, rng, s)
    occ, label = occ2[0], (occ2[1] >= 0.5).astype(np.uint8)
    fg = occ
    if rng.random() < s.p_fg_smooth:
        fg = ndi.gaussian_filter(occ, _uniform(rng, s.fg_smooth_sigma) / np.array([1, 1, info["anisotropy"]]))
    contrast = _uniform(rng, s.contrast)
    bg, binfo = background(rng, s, info["anisotropy"], contrast)
    img, minfo = merge(bg, fg, rng, s, contrast)
    minfo["contrast"] = round(contrast, 2)
    img, applied = intensity_transforms(img, rng, s, info["anisotropy"])
    info.update(binfo, **minfo, transforms=applied, fraction=float(label.mean()), seed=int(seed))
    return img, label, info


def sample_grid(seeds: list[int], path: str | Path, settings: SynthSettings = SynthSettings(),
                samples: list[tuple[np.ndarray, np.ndarray, dict]] | None = None) -> Path:
    """A PNG grid: per sample, the middle z slice, a maximum-intensity projection along z, the label's slice.

    Parameters
    ----------
    seeds : list of int
        Three panels (image slice, image MIP, label slice) per seed, four samples per figure row.
    path : str or Path
        Output PNG.
    settings : SynthSettings
    samples : list, optional
        Pre-generated ``generate`` outputs for ``seeds`` (else generated here).

    Returns
    -------
    Path
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = samples or [generate(sd, settings) for sd in seeds]
    cols = 4
    rows = int(np.ceil(len(samples) / cols))
    fig, axes = plt.subplots(rows, 3 * cols, figsize=(3 * cols * 1.6, rows * 1.9), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for n, (img, lab, info) in enumerate(samples):
        r, c = divmod(n, cols)
        z = img.shape[2] // 2
        panels = [(img[:, :, z], "gray"), (img.max(2), "gray"), (lab[:, :, z], "magma")]
        for k, (pic, cmap) in enumerate(panels):
            ax = axes[r, 3 * c + k]
            ax.imshow(pic.T, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        t = f"#{info['seed']} {info['mode']} a{info['anisotropy']:.1f} f{100 * info['fraction']:.1f}%"
        t2 = f"{info['merge']}{' dark' if info['darker'] else ''}{' inv' if 'invert' in info['transforms'] else ''}"
        axes[r, 3 * c].set_title(t, fontsize=6, loc="left")
        axes[r, 3 * c + 1].set_title(t2, fontsize=6, loc="left")
    fig.tight_layout(pad=0.2)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
