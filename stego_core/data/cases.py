"""From a data config to preprocessed volumes and 2D crop sets (no tracking here).

``volumes -> preprocessed volumes -> crops``: :func:`ensure_cases` finds (or generates) the cases,
:func:`preprocess_case` masks and standardises one, :func:`make_crop_set` cuts crops, and
:func:`split_cases` decides which volumes train and which are held out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from stego_core._checks import check_choice
from stego_core.config import to_dict
from stego_core.data.io import Case, discover_cases, load_case
from stego_core.data.phantom import PhantomConfig
from stego_core.data.preprocess import SKULL_STRIP_MODES, STANDARDIZE_METHODS
from stego_core.data.slicing import SlicingConfig, crop_index, take_crops
from stego_core.runtime.faults import file_lock


@dataclass(frozen=True)
class DataConfig:
    """Where volumes come from and how they are preprocessed.

    ``source`` is ``phantom`` (generated into ``root``) or ``folder`` (existing case folders under ``root``).
    """

    source: str = "phantom"
    root: str = "data/phantoms"
    skull_strip: str = "auto"
    standardize: str = "zscore_minmax"
    phantom: PhantomConfig = field(default_factory=PhantomConfig)

    def plan_fields(self) -> list[str]:
        """The fields a plan shows: ``phantom`` only when phantoms are generated."""
        return [f.name for f in dataclasses.fields(self) if f.name != "phantom" or self.source == "phantom"]

    def __post_init__(self) -> None:
        check_choice(self.source, "data.source", ("phantom", "folder"))
        check_choice(self.skull_strip, "data.skull_strip", SKULL_STRIP_MODES)
        check_choice(self.standardize, "data.standardize", STANDARDIZE_METHODS)




@dataclass
class PreparedCase:
    """A preprocessed volume.

    Attributes
    ----------
    image : (I, J, K) float32 ndarray
        Standardised to [0, 1]; voxels outside the brain mask are 0.
    brain_mask : (I, J, K) bool ndarray
    label : (I, J, K) bool ndarray or None
        The full vessel label (not masked): metrics are computed against it, so voxels lost by skull stripping
        count as misses. ``label_retention`` says how much of it the mask keeps.
    """

    case: Case
    image: np.ndarray
    brain_mask: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    header: nib.Nifti1Header | None
    label_retention: float | None = None
    #: set when the automatic brain mask is implausible for a head (see :func:`mask_plausibility`)
    mask_warning: str | None = None
    #: how it was preprocessed (``skull_strip``, ``standardize``): a learned model checks it against its own
    preprocessing: dict = field(default_factory=dict)
    #: its label-free profile (:func:`stego_core.data.profile.case_profile` of the image as stored)
    profile: dict = field(default_factory=dict)

    @property
    def case_id(self) -> str:
        return self.case.case_id

    @property
    def spacing_mm(self) -> tuple[float, float, float] | None:
        """:attr:`spacing` when the header says its unit is mm (or m / um), else None: a header whose spatial
        unit is 'unknown' holds a placeholder, and distances in mm would be made up."""
        unit = None if self.header is None else self.header.get_xyzt_units()[0]
        scale = {"mm": 1.0, "meter": 1000.0, "micron": 0.001}.get(unit)
        if scale is None:
            return None
        return None if self.spacing is None else tuple(s * scale for s in self.spacing)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The voxel size in mm from the header, or None when the header has none."""
        if self.header is None:
            return None
        zooms = tuple(float(z) for z in self.header.get_zooms()[:3])
        return zooms if len(zooms) == 3 and all(z > 0 for z in zooms) else None  # type: ignore[return-value]


@dataclass
class CropSet:
    """2D crops of several volumes.

    Attributes
    ----------
    crops : (N, P, P) float32 ndarray in [0, 1]
    labels : (N, P, P) bool ndarray or None
        Vessel labels inside the brain mask (None when no volume has labels).
    index : (N, 3) int64 ndarray
        ``(slice, row, col)`` of each crop in its volume.
    case_ids : (N,) str ndarray
    """

    crops: np.ndarray
    labels: np.ndarray | None
    index: np.ndarray
    case_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.crops)


def ensure_cases(data: DataConfig, *, require_labels: bool = False) -> list[Case]:
    """The cases of ``data``; for ``source: phantom`` they are generated into ``data.root`` first if missing.

    Generation holds a file lock beside ``data.root`` so concurrent runs (sweep workers) make the phantoms once.
    An existing phantom folder is reused only when it was generated with the same settings; otherwise a
    ``FileExistsError`` names the folder (nothing is overwritten).
    """
    root = Path(data.root)
    if data.source == "phantom":
        with file_lock(root.parent / f".{root.name}.lock"):  # concurrent runs generate the phantoms once
            _ensure_phantoms(root, data)
    return discover_cases(root, require_labels=require_labels)


def _ensure_phantoms(root: Path, data: DataConfig) -> None:
    """Generate the phantoms of ``data`` into ``root`` unless that folder already holds them."""
    from stego_core.data.phantom import write_phantom_cases

    settings = to_dict(data.phantom)
    stamp = root / "phantom_settings.json"
    if stamp.is_file():
        # stamps written before every generation parameter was recorded hold only some keys: the rest were
        # the defaults
        if {**to_dict(PhantomConfig()), **json.loads(stamp.read_text())} != settings:
            raise FileExistsError(f"{root} holds phantoms made with other settings ({stamp}); "
                                  "choose another data.root or delete that folder")
    else:
        if root.exists() and any(root.iterdir()):
            raise FileExistsError(f"{root} exists and is not a phantom folder; choose another data.root")
        # write into a temporary folder and rename it into place: a killed generation leaves no half-made root
        # (we hold the generation lock, so any leftover temporary folder is a dead process's)
        for leftover in root.parent.glob(f".{root.name}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        write_phantom_cases(tmp, data.phantom.n_volumes, data.phantom, seed=data.phantom.seed)
        (tmp / stamp.name).write_text(json.dumps(settings))
        if root.exists():
            root.rmdir()  # empty (checked above)
        os.replace(tmp, root)


def preprocess_case(case: Case, data: DataConfig) -> PreparedCase:
    """Load ``case``, compute its brain mask (``data.skull_strip``), mask and standardise the image."""
    from stego_core.data.preprocess import (
        apply_brain_mask,
        brain_mask_for,
        label_retention,
        standardize,
    )

    from stego_core.data.profile import case_profile

    loaded = load_case(case)
    header = loaded.image.header
    unit = header.get_xyzt_units()[0] if header is not None else None
    zooms = tuple(float(z) for z in header.get_zooms()[:3]) if header is not None else None
    profile = case_profile(loaded.image.data, zooms, unit)
    image = loaded.image.data.astype(np.float32)
    mode = data.skull_strip
    if mode == "given" and loaded.mask is None:
        raise ValueError(f"data.skull_strip='given' but case {case.case_id} has no brain_mask.nii.gz "
                         f"(folder {Path(case.image).parent})")
    mask = brain_mask_for(image, mode, given=loaded.mask, spacing_mm=loaded.image.spacing_mm)
    if not mask.any():
        raise ValueError(f"case {case.case_id}: the brain mask (data.skull_strip={mode!r}) is empty for "
                         f"{case.image}; is the image constant or not a head? try data.skull_strip=none")
    warning = mask_plausibility(image, mask, case, mode) if mode in ("auto", "head") else None
    masked, _ = apply_brain_mask(image, mask)
    image01 = standardize(masked, mask, method=data.standardize)
    image01 = np.where(mask, image01, 0.0).astype(np.float32)
    retention = label_retention(mask, loaded.label) if loaded.label is not None else None
    return PreparedCase(case=case, image=image01, brain_mask=mask, label=loaded.label,
                        affine=loaded.image.affine, header=loaded.image.header, label_retention=retention,
                        mask_warning=warning,
                        preprocessing={"skull_strip": data.skull_strip, "standardize": data.standardize},
                        profile=profile)


#: A head's automatic brain mask keeps between these fractions of the volume / of its brightest voxels.
PLAUSIBLE_MASK_FRACTION = (0.05, 0.95)
PLAUSIBLE_BRIGHT_FRACTION = 0.1
_SAID: set[tuple[str, str, float]] = set()  # the masks already reported in this process


def mask_plausibility(image: np.ndarray, mask: np.ndarray, case: Case, mode: str = "auto") -> str | None:
    """Log the fraction of the volume and of its bright voxels (top 5 %) the automatic mask keeps; return a
    warning when either is implausible for a head (e.g. a microscopy stack keeps a sliver), else ``None``.

    ``mode`` (``data.skull_strip``) names the mask in the line: ``auto`` is the intracranial (brain) mask,
    ``head`` the whole head's, so two presets' lines for one case do not read as one mask with two sizes."""
    import logging

    log = logging.getLogger(__name__)
    fraction = float(mask.mean())
    bright = image > np.percentile(image, 95)
    bright_kept = float(mask[bright].mean()) if bright.any() else 1.0
    what = f"{'head' if mode == 'head' else 'brain'} mask (data.skull_strip={mode})"
    said = (str(case.image), mode, round(fraction, 4))
    log.log(logging.DEBUG if said in _SAID else logging.INFO,  # once per case and process: every step reloads it
            "case %s: %s keeps %.1f%% of the volume and %.1f%% of its bright voxels", case.case_id, what,
            100 * fraction, 100 * bright_kept)
    _SAID.add(said)
    low, high = PLAUSIBLE_MASK_FRACTION
    if low <= fraction <= high and bright_kept >= PLAUSIBLE_BRIGHT_FRACTION:
        return None
    warning = (f"case {case.case_id}: the automatic {what} keeps {100 * fraction:.1f}% of the volume and "
               f"{100 * bright_kept:.1f}% of its bright voxels: implausible for a head ({case.image}); "
               "if this is not a head scan use data.skull_strip=none")
    log.warning(warning)
    return warning


def make_crop_set(cases: list[PreparedCase], slicing: SlicingConfig) -> CropSet:
    """Cut every volume into crops of ``slicing.patch_size`` along ``slicing.axis``, skipping crops without brain."""
    crops, labels, index, ids = [], [], [], []
    with_labels = any(c.label is not None for c in cases)
    for c in cases:
        idx = crop_index(c.image.shape, axis=slicing.axis, patch_size=slicing.patch_size, stride=slicing.stride,
                         brain_mask=c.brain_mask, min_brain_fraction=slicing.min_brain_fraction)
        crops.append(take_crops(c.image, idx, axis=slicing.axis, patch_size=slicing.patch_size, pad_value=0.0))
        if with_labels:
            lab = (c.label & c.brain_mask) if c.label is not None else np.zeros(c.image.shape, bool)
            labels.append(take_crops(lab, idx, axis=slicing.axis, patch_size=slicing.patch_size, pad_value=False))
        index.append(idx)
        ids.append(np.full(len(idx), c.case.case_id))
    if not crops or sum(len(i) for i in index) == 0:
        raise ValueError("no crops: every crop was skipped (check the brain masks and slicing.min_brain_fraction)")
    return CropSet(crops=np.concatenate(crops).astype(np.float32),
                   labels=np.concatenate(labels) if with_labels else None,
                   index=np.concatenate(index), case_ids=np.concatenate(ids))


def subset_crop_set(crop_set: CropSet, pick: np.ndarray) -> CropSet:
    """The crops ``pick`` (indices) of ``crop_set``, with their labels, index rows and case ids."""
    pick = np.asarray(pick, dtype=np.int64)
    return CropSet(crops=crop_set.crops[pick],
                   labels=crop_set.labels[pick] if crop_set.labels is not None else None,
                   index=crop_set.index[pick], case_ids=crop_set.case_ids[pick])


def split_cases(cases: list[Case], test_fraction: float, *, seed: int = 0,
                test_ids: tuple[str, ...] | list[str] = ()) -> tuple[list[Case], list[Case]]:
    """Split cases into (train, test) by a seeded shuffle; at least one case each.

    ``test_ids`` names the held-out cases instead (every other case trains); an id that is not among the cases
    is refused, naming the ones there are. With a single case both lists hold it (transductive use: training
    never sees labels, so this is legitimate for unsupervised methods, but label-based cluster mapping must not
    use it; see :func:`stego_core.steps.training` for how that is recorded).
    """
    if test_ids:
        known = {c.case_id for c in cases}
        missing = sorted(set(test_ids) - known)
        if missing:
            raise ValueError(f"test_cases={list(test_ids)}: no case {missing} among {sorted(known)}")
        held = set(test_ids)
        test = sorted((c for c in cases if c.case_id in held), key=lambda c: c.case_id)
        train = sorted((c for c in cases if c.case_id not in held), key=lambda c: c.case_id)
        return (train or list(test)), test
    if len(cases) == 1:
        return list(cases), list(cases)
    order = np.random.default_rng(seed).permutation(len(cases))
    n_test = min(len(cases) - 1, max(1, round(test_fraction * len(cases)))) if test_fraction > 0 else 0
    test = sorted((cases[i] for i in order[:n_test]), key=lambda c: c.case_id)
    train = sorted((cases[i] for i in order[n_test:]), key=lambda c: c.case_id)
    return train, test
