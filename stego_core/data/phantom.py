"""Synthetic TOF-MRA phantoms: branching vessel trees in a head, with a known vessel label.

No real MRA data can be downloaded where this project is developed, so the pipeline is exercised on phantoms
that look, to first order, like a bright-blood time-of-flight angiogram:

- a head (truncated ellipsoid with a smoothly perturbed surface) holding, from outside in, a bright scalp/fat
  shell with a thin skin layer, a dark skull, a dark CSF rim, and brain tissue with grey-level texture, sulci,
  an interhemispheric fissure and two lateral ventricles (CSF, dark); air outside is ~0;
- arterial trees that enter from the skull base and branch following Murray's law
  (``r0**3 = r1**3 + r2**3``, so a symmetric split gives ``r0 / 2**(1/3)``), with bifurcation angles of
  30-75 degrees, segments 4-10 radii long and radii from ~4 voxels down to under one voxel, plus a superior
  sagittal sinus under the skull vertex (the real case's label includes the venous sinuses);
- vessels drawn as tubes with partial-volume edges: the fractional occupancy of each voxel is a linear ramp,
  one voxel wide, of the distance to the centreline, scaled by the cross-section area for sub-voxel radii
  (thin vessels are faint, as partial volume makes them); the label is ``occupancy >= 0.5``;
- a multiplicative smooth bias field and Rician noise (magnitude of complex Gaussian noise).

Geometry is built in millimetres, so an anisotropic ``spacing_mm`` shows in the voxel grid. Every random draw
comes from ``np.random.default_rng(seed)``: a seed fixes the phantom bit for bit.

Murray, C. D. (1926). The physiological principle of minimum work. PNAS 12(3), 207-214.
:DOI:`10.1073/pnas.12.3.207`
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from stego_core._checks import check_range
from stego_core.data.io import save_volume


@dataclass(frozen=True)
class PhantomConfig:
    """Synthetic TOF-MRA phantoms: how many, their seed, and every generation parameter (:mod:`stego_core.data.phantom`).

    Lengths named ``*_vox`` are in units of the finest voxel spacing (``min(spacing_mm)``), those named
    ``*_mm`` in millimetres. Intensities are on a 0-255 scale like the real 8-bit case.

    Attributes
    ----------
    n_volumes : int
        How many phantoms ``source: phantom`` generates (``phantom_000``, ``phantom_001``, ...).
    seed : int
        Seed of the first phantom; phantom ``i`` uses ``seed + i``.
    shape : (3,) tuple of int
        Grid size (I, J, K); K is the axial (inferior -> superior) axis.
    spacing_mm : (3,) tuple of float
        Voxel size along each axis, in mm.
    n_trees : int
        Number of arterial trees entering from the skull base.
    max_depth : int
        Maximum number of bifurcation generations per tree.
    root_radius_vox : (2,) tuple of float
        Range (low, high) of root radii.
    min_radius_vox : float
        Branches thinner than this are not grown.
    segment_length_radii : (2,) tuple of float
        Range of segment lengths between bifurcations, in radii of the segment.
    bifurcation_angle_deg : (2,) tuple of float
        Range of the angle between the two children of a bifurcation, in degrees.
    murray_jitter : float
        Share of ``r0**3`` given to the first child is drawn from ``0.5 +/- murray_jitter``.
    tortuosity_deg : float
        Standard deviation of the random turn per step along a segment, in degrees.
    sinus : bool
        Draw a superior sagittal sinus (part of the vessel label, as in the real case).
    sinus_radius_vox : float
        Radius of the sinus.
    head_fill : float
        Fraction of the field of view spanned by the head in-plane.
    scalp_mm, skull_mm, csf_rim_mm : float
        Thickness of the scalp/fat shell, of the skull and of the CSF rim around the brain.
    vessel_intensity, brain_intensity, csf_intensity, scalp_intensity, skull_intensity, skin_intensity : float
        Mean intensities of the tissues before bias and noise. The vessel value may exceed 255: the image is
        clipped to [0, 255], so thick vessels saturate as they do in 8-bit TOF data.
    texture : float
        Relative amplitude of the smooth brain and scalp texture.
    noise_sigma : float
        Standard deviation of the Gaussian noise in each of the real and imaginary channels (Rician noise).
    bias_strength : float
        The bias field spans ``1 +/- bias_strength``.
    """

    n_volumes: int = 3
    seed: int = 0
    shape: tuple[int, int, int] = (96, 96, 64)
    spacing_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    n_trees: int = 5
    max_depth: int = 9
    root_radius_vox: tuple[float, float] = (1.3, 2.5)
    min_radius_vox: float = 0.3
    segment_length_radii: tuple[float, float] = (4.0, 10.0)
    bifurcation_angle_deg: tuple[float, float] = (30.0, 75.0)
    murray_jitter: float = 0.15
    tortuosity_deg: float = 15.0
    sinus: bool = True
    sinus_radius_vox: float = 2.2
    head_fill: float = 0.94
    scalp_mm: float = 4.0
    skull_mm: float = 3.5
    csf_rim_mm: float = 1.5
    vessel_intensity: float = 290.0
    brain_intensity: float = 125.0
    csf_intensity: float = 45.0
    scalp_intensity: float = 175.0
    skull_intensity: float = 25.0
    skin_intensity: float = 120.0
    texture: float = 0.08
    noise_sigma: float = 10.0
    bias_strength: float = 0.2

    def __post_init__(self) -> None:
        check_range(self.n_volumes, "phantom.n_volumes", 1)
        if len(self.shape) != 3 or any(int(s) != s for s in self.shape) or min(self.shape) < 24:
            raise ValueError(f"phantom.shape={self.shape!r} must be three sizes >= 24 (integers)")
        if len(self.spacing_mm) != 3 or not all(np.isfinite(s) and s > 0 for s in self.spacing_mm):
            raise ValueError(f"phantom.spacing_mm={self.spacing_mm!r} must be 3 positive finite numbers")
        for name in ("root_radius_vox", "segment_length_radii", "bifurcation_angle_deg"):
            pair = getattr(self, name)
            if len(pair) != 2 or not pair[0] <= pair[1]:
                raise ValueError(f"{name}={pair!r} must be a (low, high) pair with low <= high")
        check_range(self.n_trees, "n_trees", 1, 16)
        check_range(self.max_depth, "max_depth", 0, 12)
        check_range(self.root_radius_vox[0], "root_radius_vox", 0.5, None)
        check_range(self.root_radius_vox[1], "root_radius_vox", None, 8.0)
        check_range(self.min_radius_vox, "min_radius_vox", 0.1, self.root_radius_vox[0])
        check_range(self.segment_length_radii[0], "segment_length_radii", 1.0, None)
        check_range(self.segment_length_radii[1], "segment_length_radii", None, 40.0)
        check_range(self.bifurcation_angle_deg[0], "bifurcation_angle_deg", 0.0, None, low_inclusive=False)
        check_range(self.bifurcation_angle_deg[1], "bifurcation_angle_deg", None, 180.0, high_inclusive=False)
        check_range(self.murray_jitter, "murray_jitter", 0.0, 0.45)
        check_range(self.tortuosity_deg, "tortuosity_deg", 0.0, 45.0)
        check_range(self.sinus_radius_vox, "sinus_radius_vox", 0.5, 8.0)
        check_range(self.head_fill, "head_fill", 0.5, 1.0)
        for name in ("scalp_mm", "skull_mm", "csf_rim_mm"):
            check_range(getattr(self, name), name, 0.0, 30.0)
        check_range(self.vessel_intensity, "vessel_intensity", 0.0, 400.0)
        for name in ("brain_intensity", "csf_intensity", "scalp_intensity",
                     "skull_intensity", "skin_intensity"):
            check_range(getattr(self, name), name, 0.0, 255.0)
        check_range(self.texture, "texture", 0.0, 0.5)
        check_range(self.noise_sigma, "noise_sigma", 0.0, 100.0)
        check_range(self.bias_strength, "bias_strength", 0.0, 0.9)
        # the brain must be left with room once the shells are peeled off the head
        half_min_mm = 0.5 * self.head_fill * min(n * s for n, s in zip(self.shape[:2], self.spacing_mm[:2]))
        shells = self.scalp_mm + self.skull_mm + self.csf_rim_mm
        if shells > 0.6 * half_min_mm:
            raise ValueError(f"scalp_mm + skull_mm + csf_rim_mm = {shells:g} mm leaves no room for a brain in a "
                             f"head of in-plane half-width {half_min_mm:g} mm; use a larger shape or thinner shells")



__all__ = ["PhantomConfig", "Phantom", "make_phantom", "write_phantom_cases"]


@dataclass
class Phantom:
    """A synthetic TOF-MRA volume with its ground truth.

    Attributes
    ----------
    image : (I, J, K) float32 ndarray
        Intensities on a 0-255 scale (bias field and Rician noise applied).
    label : (I, J, K) uint8 ndarray
        1 where the vessel occupancy is >= 0.5, else 0.
    brain_mask : (I, J, K) uint8 ndarray
        1 inside the skull (brain, CSF, vessels), else 0.
    head_mask : (I, J, K) uint8 ndarray
        1 inside the head (scalp included), else 0.
    occupancy : (I, J, K) float32 ndarray
        Fraction of each voxel filled by vessel, in [0, 1].
    affine : (4, 4) float64 ndarray
        Voxel-to-world transform, ``diag(spacing_mm + (1,))``.
    """

    image: np.ndarray
    label: np.ndarray
    brain_mask: np.ndarray
    head_mask: np.ndarray
    occupancy: np.ndarray
    affine: np.ndarray
    config: PhantomConfig = field(default_factory=PhantomConfig)
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# smooth random fields


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> np.ndarray:
    """Zero-mean, unit-max-abs random field varying over about ``shape / cells`` voxels."""
    coarse = rng.standard_normal(tuple(max(2, cells) for _ in shape))
    zoom = [n / c for n, c in zip(shape, coarse.shape)]
    fine = ndi.zoom(coarse, zoom, order=3, mode="nearest", grid_mode=True)[tuple(slice(0, n) for n in shape)]
    fine = fine - fine.mean()
    return (fine / max(np.abs(fine).max(), 1e-12)).astype(np.float32)


def _band_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: np.ndarray) -> np.ndarray:
    """Band-pass Gaussian noise (difference of Gaussians) scaled to unit standard deviation."""
    white = rng.standard_normal(shape).astype(np.float32)
    band = ndi.gaussian_filter(white, sigma_vox) - ndi.gaussian_filter(white, 2.0 * sigma_vox)
    return band / max(float(band.std()), 1e-12)


# ----------------------------------------------------------------------------------------------------------------
# anatomy


def _head_geometry(cfg: PhantomConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Tissue maps of the head: masks and depth maps in mm."""
    shape = tuple(int(s) for s in cfg.shape)
    sp = np.asarray(cfg.spacing_mm, dtype=np.float64)
    extent = np.asarray(shape) * sp
    # the head is cut by the bottom of the field of view, like a brain MRA slab
    centre = np.array([0.5, 0.5, 0.40]) * extent
    semi = np.array([0.5 * cfg.head_fill * extent[0], min(0.52 * cfg.head_fill, 0.48) * extent[1],
                     0.55 * extent[2]])
    coords = [(np.arange(n) + 0.0) * s - c for n, s, c in zip(shape, sp, centre)]
    x, y, z = np.meshgrid(*coords, indexing="ij", sparse=True)
    rho = np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2)
    bumps = _smooth_field(rng, shape, 4)
    head = rho * (1.0 + 0.03 * bumps) <= 1.0
    depth_head = ndi.distance_transform_edt(head, sampling=sp).astype(np.float32)
    inner = depth_head >= cfg.scalp_mm + cfg.skull_mm  # intracranial
    depth_ic = ndi.distance_transform_edt(inner, sampling=sp).astype(np.float32)
    return {"head": head, "intracranial": inner, "depth_head": depth_head, "depth_ic": depth_ic,
            "centre": centre, "semi": semi, "x": x, "y": y, "z": z}


def _background(cfg: PhantomConfig, geo: dict, rng: np.random.Generator) -> np.ndarray:
    """Noise-free tissue intensities without vessels, with softened (partial-volume) edges."""
    shape = tuple(int(s) for s in cfg.shape)
    sp = np.asarray(cfg.spacing_mm, dtype=np.float64)
    fine = sp.min()
    head, inner = geo["head"], geo["intracranial"]
    depth_head, depth_ic = geo["depth_head"], geo["depth_ic"]
    x, y, z, semi = geo["x"], geo["y"], geo["z"], geo["semi"]

    texture = _smooth_field(rng, shape, 10)
    img = np.zeros(shape, dtype=np.float32)
    skin = head & (depth_head < min(1.0, 0.3 * cfg.scalp_mm))
    scalp = head & ~skin & (depth_head < cfg.scalp_mm)
    skull = head & (depth_head >= cfg.scalp_mm) & ~inner
    img[skin] = cfg.skin_intensity
    img[scalp] = cfg.scalp_intensity * (1.0 + 1.5 * cfg.texture * texture[scalp])
    img[skull] = cfg.skull_intensity

    brain = inner & (depth_ic >= cfg.csf_rim_mm)
    # sulci: a band-passed random field cut near the cortex, deeper where it is stronger
    sulcal = _band_noise(rng, shape, 2.5 / sp)
    sulci = brain & (depth_ic < cfg.csf_rim_mm + 7.0) & (sulcal > 0.9 + 0.12 * (depth_ic - cfg.csf_rim_mm))
    # interhemispheric fissure above the ventricles
    fissure = brain & (np.abs(x) < 0.8 * fine) & (z > 0.15 * semi[2])
    # lateral ventricles: two tilted ellipsoids beside the midline
    vents = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        vx = (x - side * 0.13 * semi[0]) / (0.09 * semi[0])
        vy = (y + 0.05 * semi[1]) / (0.40 * semi[1])
        vz = (z - 0.10 * semi[2] - 0.10 * y * semi[2] / semi[1]) / (0.14 * semi[2])
        vents |= vx ** 2 + vy ** 2 + vz ** 2 <= 1.0
    csf = (inner & ~brain) | sulci | fissure | (vents & brain)
    tissue = brain & ~csf
    grey = 1.0 + cfg.texture * texture[tissue] + 0.04 * np.tanh(sulcal[tissue])
    img[tissue] = cfg.brain_intensity * grey
    img[csf] = cfg.csf_intensity
    # partial-volume edges: a box-like blur of about one voxel
    return ndi.gaussian_filter(img, 0.45 * fine / sp).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# vessel trees


def _random_perpendicular(u: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    w = rng.standard_normal(3)
    w -= w.dot(u) * u
    n = np.linalg.norm(w)
    if n < 1e-9:
        w = np.cross(u, [1.0, 0.0, 0.0] if abs(u[0]) < 0.9 else [0.0, 1.0, 0.0])
        n = np.linalg.norm(w)
    return w / n


class VesselField:
    """Nearest-voxel lookup of the intracranial depth (mm) and its gradient at a point in mm."""

    def __init__(self, depth: np.ndarray, spacing: np.ndarray):
        self.depth = depth
        self.spacing = spacing
        self.grad = np.stack(np.gradient(depth, *spacing), axis=-1).astype(np.float32)
        self.upper = np.asarray(depth.shape) - 1

    def index(self, p: np.ndarray) -> tuple[int, int, int] | None:
        idx = np.rint(p / self.spacing).astype(int)
        if (idx < 0).any() or (idx > self.upper).any():
            return None
        return tuple(idx)

    def depth_at(self, p: np.ndarray) -> float:
        idx = self.index(p)
        return -1.0 if idx is None else float(self.depth[idx])

    def inward(self, p: np.ndarray) -> np.ndarray:
        idx = self.index(p)
        g = np.zeros(3) if idx is None else self.grad[idx].astype(np.float64)
        n = np.linalg.norm(g)
        return g / n if n > 1e-9 else np.zeros(3)


def grow_tree(root: np.ndarray, direction: np.ndarray, radius_mm: float, cfg: PhantomConfig,
               fld: VesselField, rng: np.random.Generator, unit_mm: float, out: list,
               splits: list | None = None) -> None:
    """Append capsules ``(p0, p1, r_mm)`` of one tree to ``out`` (depth-first, deterministic given rng).

    ``splits``, when given, receives one ``(r0, r1, r2, angle_deg, parent_length_radii)`` per bifurcation.
    """
    min_r = cfg.min_radius_vox * unit_mm
    tort = np.deg2rad(cfg.tortuosity_deg)
    cfg_steer_mm = 2.0
    stack = [(root, direction / np.linalg.norm(direction), radius_mm, 0)]
    while stack:
        p, u, r, gen = stack.pop()
        length = rng.uniform(*cfg.segment_length_radii) * r
        step = max(1.5 * r, 1.5 * unit_mm)
        n_steps = max(1, int(np.ceil(length / step)))
        step = length / n_steps
        alive = True
        for _ in range(n_steps):
            # random turn, then steer away from the skull when close to it
            u = u + np.tan(rng.normal(0.0, tort)) * _random_perpendicular(u, rng)
            u /= np.linalg.norm(u)
            q = p + step * u
            clearance = fld.depth_at(q) - r - 0.5 * unit_mm
            if clearance < cfg_steer_mm * unit_mm:
                # a gentle turn away from the skull; branches that still reach it end there
                u = u + 0.6 * (1.0 - max(clearance, 0.0) / (cfg_steer_mm * unit_mm)) * fld.inward(p)
                u /= np.linalg.norm(u)
                q = p + step * u
            if fld.depth_at(q) < r + 0.5 * unit_mm:
                alive = False
                break
            out.append((p, q, r))
            p = q
        if not alive or gen >= cfg.max_depth:
            continue
        # Murray's law: r0^3 = r1^3 + r2^3 with a jittered split of r0^3
        share = rng.uniform(0.5 - cfg.murray_jitter, 0.5 + cfg.murray_jitter)
        r1, r2 = r * share ** (1.0 / 3.0), r * (1.0 - share) ** (1.0 / 3.0)
        theta = np.deg2rad(rng.uniform(*cfg.bifurcation_angle_deg))
        # the thicker child deviates less from the parent's direction
        th1 = theta * r2 ** 2 / (r1 ** 2 + r2 ** 2)
        th2 = theta - th1
        if splits is not None:
            splits.append((r, r1, r2, float(np.rad2deg(theta)), length / r))
        w = _random_perpendicular(u, rng)
        for rc, uc in ((r1, np.cos(th1) * u + np.sin(th1) * w), (r2, np.cos(th2) * u - np.sin(th2) * w)):
            if rc >= min_r:
                stack.append((p, uc / np.linalg.norm(uc), rc, gen + 1))


def _sinus_path(cfg: PhantomConfig, fld: VesselField, geo: dict, radius_mm: float) -> list:
    """Capsules of a superior sagittal sinus: the midline curve just under the skull, front to back."""
    sp = np.asarray(cfg.spacing_mm, dtype=np.float64)
    centre, semi = geo["centre"], geo["semi"]
    i_mid = int(round(centre[0] / sp[0]))
    depth = fld.depth[i_mid]  # (J, K) midsagittal plane
    points = []
    for j in range(depth.shape[0]):
        col = np.nonzero(depth[j] >= radius_mm + 0.5 * sp.min())[0]
        if col.size == 0:
            continue
        k = col.max()
        if k * sp[2] < centre[2] + 0.1 * semi[2]:
            continue  # keep to the upper part of the head
        points.append(np.array([centre[0], j * sp[1], k * sp[2]]))
    capsules = []
    # one capsule every ~radius, smooth enough for a tube
    stride = max(1, int(round(radius_mm / sp[1])))
    points = points[::stride] + ([points[-1]] if points and (len(points) - 1) % stride else [])
    for a, b in zip(points[:-1], points[1:]):
        capsules.append((a, b, radius_mm))
    return capsules


def _draw_capsules(capsules: list, shape: tuple[int, ...], spacing: np.ndarray) -> np.ndarray:
    """Union (max) of the fractional occupancies of the capsules, float32 in [0, 1]."""
    occ = np.zeros(shape, dtype=np.float32)
    upper = np.asarray(shape)
    for p0, p1, r in capsules:
        v = p1 - p0
        vv = float(v.dot(v))
        vn = v / np.sqrt(vv) if vv > 0 else np.array([0.0, 0.0, 1.0])
        # projected area of one voxel on the plane normal to the tube: partial-volume scale of thin tubes
        area = spacing[1] * spacing[2] * abs(vn[0]) + spacing[0] * spacing[2] * abs(vn[1]) \
            + spacing[0] * spacing[1] * abs(vn[2])
        thin = min(1.0, np.pi * r * r / area)
        pad = r + spacing.max()
        lo = np.maximum(np.floor((np.minimum(p0, p1) - pad) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((np.maximum(p0, p1) + pad) / spacing).astype(int) + 1, upper)
        if (hi <= lo).any():
            continue
        dx = (np.arange(lo[0], hi[0]) * spacing[0] - p0[0])[:, None, None]
        dy = (np.arange(lo[1], hi[1]) * spacing[1] - p0[1])[None, :, None]
        dz = (np.arange(lo[2], hi[2]) * spacing[2] - p0[2])[None, None, :]
        t = (dx * v[0] + dy * v[1] + dz * v[2]) / vv if vv > 0 else np.zeros((1, 1, 1))
        t = np.clip(t, 0.0, 1.0)
        ex, ey, ez = dx - t * v[0], dy - t * v[1], dz - t * v[2]
        d = np.sqrt(ex * ex + ey * ey + ez * ez)
        # width of a voxel measured along the direction from the centreline: one-voxel ramp in any spacing
        width = np.where(d > 1e-6, (np.abs(ex) * spacing[0] + np.abs(ey) * spacing[1]
                                    + np.abs(ez) * spacing[2]) / np.maximum(d, 1e-6), spacing.mean())
        val = (np.clip((r - d) / width + 0.5, 0.0, 1.0) * thin).astype(np.float32)
        view = occ[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        np.maximum(view, val, out=view)
    return occ


def _vessels(cfg: PhantomConfig, geo: dict, rng: np.random.Generator) -> np.ndarray:
    """Vessel occupancy, float32 in [0, 1], zero outside the intracranial mask."""
    shape = tuple(int(s) for s in cfg.shape)
    sp = np.asarray(cfg.spacing_mm, dtype=np.float64)
    unit = float(sp.min())
    fld = VesselField(geo["depth_ic"], sp)
    centre, semi = geo["centre"], geo["semi"]
    inner = geo["intracranial"]
    # skull-base entry points: spread around an ellipse low in the head
    k_idx = np.nonzero(inner.any(axis=(0, 1)))[0]
    z_floor = max(k_idx.min() * sp[2], 0.0)
    capsules: list = []
    phase = rng.uniform(0.0, 2.0 * np.pi)
    for t in range(cfg.n_trees):
        angle = phase + 2.0 * np.pi * (t + rng.uniform(-0.2, 0.2)) / cfg.n_trees
        radius = rng.uniform(*cfg.root_radius_vox) * unit
        root = None
        for frac in (0.2, 0.1, 0.0):
            cand = np.array([centre[0] + frac * semi[0] * np.cos(angle),
                             centre[1] + frac * semi[1] * np.sin(angle),
                             z_floor + radius + 1.5 * unit])
            # climb until the root has clearance inside the skull
            for _ in range(int(0.5 * semi[2] / unit)):
                if fld.depth_at(cand) >= radius + unit:
                    root = cand
                    break
                cand = cand + np.array([0.0, 0.0, unit])
            if root is not None:
                break
        if root is None:
            continue
        # up and outwards, like the cerebral arteries leaving the circle of Willis
        outward = np.array([np.cos(angle), np.sin(angle), 0.0])
        direction = rng.uniform(0.6, 1.6) * np.array([0.0, 0.0, 1.0]) + outward
        grow_tree(root, direction, radius, cfg, fld, rng, unit, capsules)
    if cfg.sinus:
        capsules += _sinus_path(cfg, fld, geo, cfg.sinus_radius_vox * unit)
    occ = _draw_capsules(capsules, shape, sp)
    occ[~inner] = 0.0
    return occ


# ----------------------------------------------------------------------------------------------------------------
# public API


def make_phantom(config: PhantomConfig | None = None, *, seed: int) -> Phantom:
    """Build one synthetic TOF-MRA phantom.

    Parameters
    ----------
    config : PhantomConfig, optional
        Geometry, tissue and noise parameters (defaults: a 96 x 96 x 64 grid at 1 mm).
    seed : int
        Seed of ``np.random.default_rng``; the same seed gives the same bytes.

    Returns
    -------
    Phantom
        ``image`` (I, J, K) float32 on a 0-255 scale, ``label`` and ``brain_mask`` and ``head_mask``
        (I, J, K) uint8 {0, 1}, ``occupancy`` (I, J, K) float32 in [0, 1], ``affine`` (4, 4) float64.

    Examples
    --------
    >>> ph = make_phantom(PhantomConfig(shape=(48, 48, 32), n_trees=1, max_depth=3), seed=0)
    >>> ph.image.shape, ph.image.dtype.name, ph.label.dtype.name
    ((48, 48, 32), 'float32', 'uint8')
    >>> bool((ph.label <= ph.brain_mask).all())
    True
    """
    cfg = PhantomConfig() if config is None else config
    if not isinstance(cfg, PhantomConfig):
        raise TypeError(f"config must be a PhantomConfig; got {type(cfg).__name__}")
    if int(seed) != seed:
        raise ValueError(f"seed={seed!r} must be an integer")
    rng = np.random.default_rng(int(seed))
    shape = tuple(int(s) for s in cfg.shape)
    sp = np.asarray(cfg.spacing_mm, dtype=np.float64)

    geo = _head_geometry(cfg, rng)
    background = _background(cfg, geo, rng)
    occupancy = _vessels(cfg, geo, rng)

    clean = background * (1.0 - occupancy) + cfg.vessel_intensity * occupancy
    bias = 1.0 + cfg.bias_strength * _smooth_field(rng, shape, 3)
    clean = clean * bias
    if cfg.noise_sigma > 0:
        re = clean + rng.normal(0.0, cfg.noise_sigma, shape).astype(np.float32)
        im = rng.normal(0.0, cfg.noise_sigma, shape).astype(np.float32)
        image = np.sqrt(re * re + im * im)
    else:
        image = clean
    image = np.clip(image, 0.0, 255.0).astype(np.float32)

    affine = np.diag(np.r_[sp, 1.0]).astype(np.float64)
    return Phantom(image=image, label=(occupancy >= 0.5).astype(np.uint8),
                   brain_mask=geo["intracranial"].astype(np.uint8), head_mask=geo["head"].astype(np.uint8),
                   occupancy=occupancy.astype(np.float32), affine=affine, config=cfg, seed=int(seed))


def _header(shape: tuple[int, ...], spacing_mm: tuple[float, float, float]) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_zooms(tuple(float(s) for s in spacing_mm))
    header.set_xyzt_units("mm")
    return header


def write_phantom_cases(out_dir: str | Path, n_volumes: int, config: PhantomConfig | None = None, *,
                        seed: int, overwrite: bool = False) -> list[Path]:
    """Write ``n_volumes`` phantoms as case folders ``<out_dir>/phantom_<i:03d>/``.

    Each folder holds ``image.nii.gz`` (float32), ``label.nii.gz`` and ``brain_mask.nii.gz`` (uint8 {0, 1}),
    all with the affine ``diag(spacing_mm)`` and zooms in mm. Phantom ``i`` uses seed ``seed + i``.

    Parameters
    ----------
    out_dir : str or Path
        Parent folder; created if missing.
    n_volumes : int
        Number of phantoms, >= 1.
    config : PhantomConfig, optional
        Shared by every phantom.
    seed : int
        Base seed.
    overwrite : bool
        Replace existing files; otherwise an existing case raises ``FileExistsError`` before anything is
        written.

    Returns
    -------
    list of Path
        The case folders, in order.
    """
    check_range(n_volumes, "n_volumes", 1, None)
    if int(n_volumes) != n_volumes:
        raise ValueError(f"n_volumes={n_volumes!r} must be an integer")
    cfg = PhantomConfig() if config is None else config
    out_dir = Path(out_dir)
    names = ("image.nii.gz", "label.nii.gz", "brain_mask.nii.gz")
    folders = [out_dir / f"phantom_{i:03d}" for i in range(int(n_volumes))]
    if not overwrite:
        for folder in folders:
            for name in names:
                if (folder / name).exists():
                    raise FileExistsError(f"{folder / name} already exists; pass overwrite=True to replace it")
    header = _header(tuple(int(n) for n in cfg.shape), cfg.spacing_mm)
    for i, folder in enumerate(folders):
        ph = make_phantom(cfg, seed=int(seed) + i)
        for name, data in zip(names, (ph.image, ph.label, ph.brain_mask)):
            save_volume(folder / name, data, ph.affine, header, overwrite=overwrite)
    return folders


# ------------------------------------------------------------------------------- two-photon-like stacks


def twophoton_stack(shape: tuple[int, int, int] = (128, 128, 10), spacing_um: tuple[float, float, float] = (1.0, 1.0, 5.0),
                    *, n_vessels: int = 14, radius_um: tuple[float, float] = (2.5, 6.0), noise: float = 4.0,
                    seed: int = 0) -> Phantom:
    """A small synthetic stand-in for a two-photon microscopy stack of cortical vessels (tests, CI without data).

    Straight, gently tilted bright tubes cross the field in-plane (dense: 10-30 % of the voxels), on a dark
    background with Gaussian noise and a loss of brightness with depth, sampled on an anisotropic grid (z, the
    optical-section axis, coarser). Not a model of real 2PM images: it has the profile of one (a thin slab, a dark
    field with a long bright tail), which is what the domain guard and ``preset: auto`` look at.

    Parameters
    ----------
    shape : (3,) tuple of int
        (X, Y, Z) voxels; Z is the optical-section axis.
    spacing_um : (3,) tuple of float
        Voxel size in micrometres.
    n_vessels : int
        Number of tubes.
    radius_um : (2,) tuple of float
        Range of tube radii in micrometres.
    noise : float
        Standard deviation of the background noise (intensities on a 0-255 scale).
    seed : int

    Returns
    -------
    Phantom
        ``image`` float32, ``label`` uint8 (occupancy >= 0.5), ``brain_mask`` all ones, ``affine`` in mm
        (micrometres / 1000, the NIfTI convention of :func:`write_twophoton_case`).
    """
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_um, dtype=np.float64)
    extent = np.asarray(shape) * spacing
    capsules = []
    for _ in range(int(n_vessels)):
        angle = rng.uniform(0, np.pi)
        direction = np.array([np.cos(angle), np.sin(angle), rng.uniform(-0.05, 0.05)])
        centre = rng.uniform(0.1, 0.9, 3) * extent
        half = 1.5 * extent.max()
        capsules.append((centre - half * direction, centre + half * direction, float(rng.uniform(*radius_um))))
    occupancy = _draw_capsules(capsules, tuple(shape), spacing)
    depth = np.linspace(1.0, 0.6, shape[2])[None, None, :]
    image = 20.0 + 150.0 * occupancy * depth + rng.normal(0.0, noise, shape)
    image = np.clip(image, 0.0, 255.0).astype(np.float32)
    affine = np.diag([*(spacing / 1000.0), 1.0])
    return Phantom(image=image, label=(occupancy >= 0.5).astype(np.uint8),
                   brain_mask=np.ones(shape, np.uint8), head_mask=np.ones(shape, np.uint8),
                   occupancy=occupancy.astype(np.float32), affine=affine, config=PhantomConfig(), seed=int(seed))


def write_twophoton_case(folder: str | Path, phantom: Phantom, spacing_um: tuple[float, float, float]) -> Path:
    """Write a :func:`twophoton_stack` as a case folder (``image.nii.gz``, ``label.nii.gz``), its header in
    micrometres (NIfTI unit ``micron``), as a microscope's export would be."""
    folder = Path(folder)
    header = nib.Nifti1Header()
    header.set_data_shape(phantom.image.shape)
    header.set_zooms(tuple(float(s) for s in spacing_um))
    header.set_xyzt_units("micron")
    affine = np.diag([*spacing_um, 1.0])
    save_volume(folder / "image.nii.gz", phantom.image, affine, header)
    save_volume(folder / "label.nii.gz", phantom.label, affine, header)
    return folder
