"""NIfTI volume I/O and case manifests.

A *case* is a folder holding ``image.nii.gz`` (or ``.nii``) and optionally ``label.nii.gz`` (1 = vessel)
and ``brain_mask.nii.gz``. A data root is either one case folder or a folder of case folders::

    data/
      case_000/ image.nii.gz  label.nii.gz  brain_mask.nii.gz
      case_001/ image.nii.gz  label.nii.gz

Every volume keeps its affine and header, and every volume written carries the source geometry.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from stego_core._checks import as_binary, check_finite

IMAGE_NAMES = ("image.nii.gz", "image.nii")
LABEL_NAMES = ("label.nii.gz", "label.nii")
MASK_NAMES = ("brain_mask.nii.gz", "brain_mask.nii")


@dataclass
class Volume:
    """A 3D volume with its geometry.

    Attributes
    ----------
    data : (I, J, K) ndarray
        Voxel values in nibabel's voxel order.
    affine : (4, 4) float64 ndarray
        Voxel-to-world transform.
    header : nibabel.Nifti1Header or None
        The source header, reused when derived volumes are written.
    path : Path or None
        Where the volume was read from.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | None = None
    path: Path | None = None

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along each axis (header zooms; 1.0 when unknown)."""
        if self.header is not None:
            return tuple(float(z) for z in self.header.get_zooms()[:3])
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))


def load_volume(path: str | Path) -> Volume:
    """Read a 3D NIfTI file, keeping affine and header.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for an unreadable
    file, a 4D (or 2D) volume, or NaN/Inf values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"volume {path} does not exist")
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise ValueError(f"cannot read NIfTI volume {path}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"volume {path} has shape {data.shape}; expected a 3D volume")
    check_finite(data, f"volume {path}")
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy(), path=path)


def save_volume(path: str | Path, data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None,
                *, overwrite: bool = False) -> Path:
    """Write ``data`` as NIfTI with the given geometry; refuse to overwrite unless ``overwrite``.

    Parameters
    ----------
    path : str or Path
        Output file (``.nii`` or ``.nii.gz``); parent folders are created.
    data : (I, J, K) ndarray
        Voxel values; bool is stored as uint8.
    affine : (4, 4) ndarray
        Voxel-to-world transform, normally the source volume's.
    header : Nifti1Header, optional
        Source header to keep (zooms, units, orientation codes); its data type is updated to ``data``'s.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite it")
    data = np.asarray(data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), header=header)
    img.set_data_dtype(data.dtype)
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    nib.save(img, str(path))
    return path


def file_digest(path: str | Path, *, length: int = 16) -> str:
    """SHA-256 of a file's bytes, shortened to ``length`` hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


@dataclass(frozen=True)
class Case:
    """One entry of a data manifest: paths plus a content digest of the image (and label)."""

    case_id: str
    image: str
    label: str | None = None
    mask: str | None = None
    digest: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _first_existing(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


def make_case(folder: str | Path, case_id: str | None = None) -> Case:
    """Build a :class:`Case` from a case folder, with digests of its files."""
    folder = Path(folder)
    image = _first_existing(folder, IMAGE_NAMES)
    if image is None:
        raise FileNotFoundError(f"case folder {folder} has no {' or '.join(IMAGE_NAMES)}")
    label = _first_existing(folder, LABEL_NAMES)
    mask = _first_existing(folder, MASK_NAMES)
    digest = "-".join(file_digest(p, length=12) for p in (image, label) if p is not None)
    return Case(case_id=case_id or folder.name, image=str(image), label=str(label) if label else None,
                mask=str(mask) if mask else None, digest=digest)


def discover_cases(root: str | Path, *, require_labels: bool = False) -> list[Case]:
    """List the cases under ``root`` (one case folder, or a folder of case folders), sorted by id.

    Raises ``FileNotFoundError`` when ``root`` is missing or holds no case, and ``ValueError`` when
    ``require_labels`` and a case has no label, naming the case.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    if _first_existing(root, IMAGE_NAMES) is not None:
        cases = [make_case(root)]
    else:
        cases = [make_case(d) for d in sorted(root.iterdir()) if d.is_dir() and _first_existing(d, IMAGE_NAMES)]
    if not cases:
        raise FileNotFoundError(f"no cases under {root}: expected {IMAGE_NAMES[0]} in it or in its sub-folders")
    if require_labels:
        missing = [c.case_id for c in cases if c.label is None]
        if missing:
            raise ValueError(f"cases without {LABEL_NAMES[0]} under {root}: {', '.join(missing)}")
    return cases


@dataclass
class LoadedCase:
    """A case read from disk: image, optional binary label and brain mask, all on one grid."""

    case: Case
    image: Volume
    label: np.ndarray | None = None  # (I, J, K) bool
    mask: np.ndarray | None = None  # (I, J, K) bool


def load_case(case: Case, *, atol: float = 1e-3) -> LoadedCase:
    """Read and validate a case: label and mask must match the image's shape and affine and be binary."""
    image = load_volume(case.image)
    out = LoadedCase(case=case, image=image)
    for attr, path in (("label", case.label), ("mask", case.mask)):
        if path is None:
            continue
        vol = load_volume(path)
        if vol.data.shape != image.data.shape:
            raise ValueError(f"{attr} {path} has shape {vol.data.shape} but image {case.image} has shape "
                             f"{image.data.shape}")
        if not np.allclose(vol.affine, image.affine, atol=atol):
            raise ValueError(f"{attr} {path} has a different affine from image {case.image}:\n"
                             f"{vol.affine}\nvs\n{image.affine}")
        setattr(out, attr, as_binary(vol.data, f"{attr} {path}"))
    return out


def write_manifest(cases: list[Case], path: str | Path) -> Path:
    """Write the manifest as JSON (a list of case records)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([c.to_dict() for c in cases], indent=2))
    return path


def read_manifest(path: str | Path) -> list[Case]:
    """Read a manifest written by :func:`write_manifest`."""
    return [Case(**rec) for rec in json.loads(Path(path).read_text())]
