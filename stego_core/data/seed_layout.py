"""The original project's 2D dataset layout, as a writer and a reader.

::

    dataset/<name>/
      imgs/<id>.png            8-bit crops
      gt/<id>.png | <id>.mat   labels (``.mat`` files hold the key ``imageData``)
      all.txt  labelled_train.txt  labelled_test.txt  unlabelled_train.txt   (ids without extension)

Labels are normalised to 1 = vessel whatever the files used: {0, 1}, {0, 255}, or the seed's inverted
convention (vessel stored as 0 on a 255 background), told apart by ``polarity``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SPLIT_FILES = ("all", "labelled_train", "labelled_test", "unlabelled_train")
POLARITIES = ("auto", "vessel_high", "vessel_low")


@dataclass
class SeedDataset:
    """A seed-layout dataset in memory.

    Attributes
    ----------
    ids : list of str
        Crop ids (file names without extension), in ``all.txt`` order.
    images : (N, H, W) float32 ndarray
        Crops scaled to [0, 1].
    labels : dict of id -> (H, W) bool ndarray
        Vessel masks of the crops that have one.
    splits : dict of split name -> list of ids
    """

    ids: list[str]
    images: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    splits: dict[str, list[str]] = field(default_factory=dict)


def write_seed_dataset(root: str | Path, name: str, ids: list[str], images: np.ndarray,
                       labels: np.ndarray | None = None, *, splits: dict[str, list[str]] | None = None,
                       label_format: str = "png") -> Path:
    """Write crops (N, H, W) in [0, 1] and optional labels (N, H, W) as ``<root>/<name>/``.

    Labels are written with vessel = 255 (``png``) or 1 (``mat``, key ``imageData``). ``splits`` maps split
    names to id lists; ``all`` defaults to ``ids``. Refuses to write into an existing dataset folder.
    """
    out = Path(root) / name
    if out.exists():
        raise FileExistsError(f"dataset folder {out} already exists; refusing to overwrite it")
    images = np.asarray(images)
    if images.ndim != 3 or len(images) != len(ids):
        raise ValueError(f"images must be (N, H, W) with N = len(ids) = {len(ids)}; got shape {images.shape}")
    if labels is not None and np.shape(labels) != images.shape:
        raise ValueError(f"labels have shape {np.shape(labels)} but images have shape {images.shape}")
    if label_format not in ("png", "mat"):
        raise ValueError(f"label_format={label_format!r} must be 'png' or 'mat'")
    splits = dict(splits or {})
    splits.setdefault("all", list(ids))
    unknown = set(splits) - set(SPLIT_FILES)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; valid: {', '.join(SPLIT_FILES)}")
    (out / "imgs").mkdir(parents=True)
    for i, crop_id in enumerate(ids):
        grey = np.clip(np.rint(images[i] * 255), 0, 255).astype(np.uint8)
        Image.fromarray(grey).save(out / "imgs" / f"{crop_id}.png")
    if labels is not None:
        (out / "gt").mkdir()
        for i, crop_id in enumerate(ids):
            mask = np.asarray(labels[i]) > 0
            if label_format == "png":
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / "gt" / f"{crop_id}.png")
            else:
                from scipy.io import savemat

                savemat(out / "gt" / f"{crop_id}.mat", {"imageData": mask.astype(np.uint8)})
    for split in SPLIT_FILES:
        (out / f"{split}.txt").write_text("".join(f"{i}\n" for i in splits.get(split, [])))
    return out


def _read_ids(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _read_label(path: Path) -> np.ndarray:
    if path.suffix == ".mat":
        from scipy.io import loadmat

        content = loadmat(path)
        if "imageData" not in content:
            keys = [k for k in content if not k.startswith("__")]
            raise ValueError(f"label file {path} has no key 'imageData' (keys: {keys})")
        array = np.asarray(content["imageData"])
    else:
        array = np.asarray(Image.open(path).convert("L"))
    values = set(np.unique(array).tolist())
    if not (values <= {0, 1} or values <= {0, 255}):
        raise ValueError(f"label file {path} has values {sorted(values)[:6]}; expected {{0,1}} or {{0,255}}")
    return array > 0


def read_seed_dataset(root: str | Path, name: str, *, polarity: str = "auto") -> SeedDataset:
    """Read ``<root>/<name>/`` in the seed layout; labels come back as bool masks with True = vessel.

    Parameters
    ----------
    polarity : {"auto", "vessel_high", "vessel_low"}
        How labels store vessels. ``vessel_low`` is the seed's inverted files (vessel = 0). ``auto`` picks
        ``vessel_low`` when most labelled pixels are non-zero (vessels are a small minority of any MRA crop).
    """
    folder = Path(root) / name
    if not (folder / "imgs").is_dir():
        raise FileNotFoundError(f"{folder} is not a seed-layout dataset: no imgs/ folder")
    if polarity not in POLARITIES:
        raise ValueError(f"polarity={polarity!r} is not valid; choose one of {', '.join(POLARITIES)}")
    ids = _read_ids(folder / "all.txt") or sorted(p.stem for p in (folder / "imgs").glob("*.png"))
    images = []
    for crop_id in ids:
        path = folder / "imgs" / f"{crop_id}.png"
        if not path.is_file():
            raise FileNotFoundError(f"{folder / 'all.txt'} lists {crop_id} but {path} does not exist")
        images.append(np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0)
    labels: dict[str, np.ndarray] = {}
    for crop_id in ids:
        for ext in (".png", ".mat"):
            path = folder / "gt" / f"{crop_id}{ext}"
            if path.is_file():
                labels[crop_id] = _read_label(path)
                break
    if labels and polarity != "vessel_high":
        fraction_high = np.mean([m.mean() for m in labels.values()])
        if polarity == "vessel_low" or fraction_high > 0.5:
            labels = {k: ~m for k, m in labels.items()}
    splits = {s: _read_ids(folder / f"{s}.txt") for s in SPLIT_FILES}
    return SeedDataset(ids=ids, images=np.stack(images) if images else np.zeros((0, 0, 0), np.float32),
                       labels=labels, splits=splits)
